"""Figures of the report (matplotlib, no pyplot: every function builds its own
:class:`~matplotlib.figure.Figure`, so no global backend or state is touched).

Each function is a figure of :data:`submerge.report.registry.FIGURES`: it takes the report
inputs its registry entry names (pandas frames, the HO-GSVD summary dict), the run's
:class:`~submerge.recipe.Recipe` and a path ``stem``, writes ``<stem>.pdf`` and ``<stem>.png``
atomically and returns ``[pdf, png]`` (pass them to ``provenance.write_sidecar``). Method
labels, boosting and base methods come from the recipe (:mod:`submerge.report.tables`).

Style lives in one place, :data:`RC` (applied with ``rc_context`` around each figure):
DejaVu Sans (bundled with matplotlib), the Okabe–Ito colour-blind-safe palette
(:data:`PALETTE`), viridis for heatmaps, fixed ``svg.hashsalt`` and file metadata without
dates or versions (:data:`PDF_METADATA`, :data:`PNG_METADATA`), so the same inputs give
byte-identical files.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib
import numpy as np
import pandas as pd
from cycler import cycler
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.colors import LogNorm
from matplotlib.patches import Rectangle

from submerge.io.atomic import atomic_path
from submerge.recipe import Recipe
from submerge.report import tables

log = logging.getLogger(__name__)

# Okabe & Ito (2008), "Color Universal Design": blue, orange, bluish green, vermillion,
# reddish purple, sky blue, black, yellow (yellow last: weak on white).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442")
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
HEATMAP_CMAP = "viridis"
# rank collapse (paper Fig. 1a) shows the Task Arithmetic family without LiNeS, with and without
# boosting (TSV-M / Iso change the spectrum by construction and would crowd the plot; their
# ranks are in the summary CSV)
RANK_COLLAPSE_MERGES = ("task_arithmetic", "ties", "consensus")
HEATMAP_COLUMNS = 4  # α × β heatmap: panels per row
KIND_TITLES = {
    "attn": "attention",
    "mlp": "MLP",
    "embed": "embedding",
    "norm": "norm",
    "head": "head",
    "other": "other",
}

RC: dict[str, Any] = {
    "font.family": "DejaVu Sans",
    "mathtext.fontset": "dejavusans",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "axes.prop_cycle": cycler(color=PALETTE),
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.6,
    "lines.markersize": 5,
    "image.cmap": HEATMAP_CMAP,
    "figure.dpi": 100,
    "savefig.dpi": 200,
    "figure.constrained_layout.use": True,
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
    "pdf.compression": 6,
    "svg.fonttype": "path",
    "svg.hashsalt": "submerge",
    "text.usetex": False,
}
PDF_METADATA = {"Creator": None, "Producer": None, "CreationDate": None}
PNG_METADATA = {"Software": None}


def _styled(fn):
    """Run a figure function under :data:`RC`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(RC):
            return fn(*args, **kwargs)

    return wrapper


def save_figure(fig: Figure, stem: str | os.PathLike) -> list[Path]:
    """Write ``fig`` to ``<stem>.pdf`` and ``<stem>.png`` (atomically, no timestamps)."""
    stem = Path(stem)
    paths = []
    for fmt, meta in (("pdf", PDF_METADATA), ("png", PNG_METADATA)):
        path = stem.with_name(f"{stem.name}.{fmt}")
        with matplotlib.rc_context(RC), atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, metadata=meta)
        paths.append(path)
    log.info("wrote figure %s.{pdf,png}", stem)
    return paths


def _method_order(present: Sequence[str], methods: tables.Methods) -> list[str]:
    present = list(dict.fromkeys(present))
    return [m for m in methods if m in present] + [m for m in present if m not in methods]


def _labels(order: Sequence[str], methods: tables.Methods) -> dict[str, str]:
    labels = tables.method_labels(methods)
    return {m: labels.get(m, m) for m in order}


def _outside_legend(fig: Figure, handles: list, title: str | None = None) -> None:
    fig.legend(handles=handles, loc="outside right upper", title=title)


def _style_handles(markers: bool = True) -> list[Line2D]:
    return [
        Line2D(
            [],
            [],
            color="0.3",
            linestyle="-",
            marker="o" if markers else None,
            label="before boosting",
        ),
        Line2D(
            [],
            [],
            color="0.3",
            linestyle="--",
            marker="s" if markers else None,
            label="after boosting",
        ),
    ]


# ------------------------------------------------------------------------- rank collapse


@_styled
def rank_collapse(
    summary: pd.DataFrame,
    recipe: Recipe,
    stem: str | os.PathLike,
    *,
    methods: Sequence[str] | None = None,
    kinds: Sequence[str] = ("attn", "mlp"),
    energy_frac: float | None = 0.9,
) -> list[Path]:
    """Paper Figs. 1a/2d/7/8: mean stable rank (top row) and cumulative-energy rank
    (bottom row) of the merged task vector per layer kind (columns) against the number of
    experts N; one colour per method, solid before and dashed after boosting.

    ``summary``: columns group, n_experts, method, boosted, kind, stable_rank,
    energy_rank (one row per weight key). Means are over keys and over groups of equal N.
    ``methods``: the methods shown (default: those whose merge is in
    :data:`RANK_COLLAPSE_MERGES`, without LiNeS). ``energy_frac`` only labels the axis
    (e.g. 0.9 → "90 % energy"; the rule ``spectra_summary`` uses 0.9).
    """
    tables.require_columns(
        summary,
        ["group", "n_experts", "method", "boosted", "kind", "stable_rank", "energy_rank"],
        "spectra summary",
    )
    if methods is None:
        methods = [m for m, meth in recipe.methods.items()
                   if meth.merge in RANK_COLLAPSE_MERGES and meth.lines is None]
    summary = summary.loc[summary["method"].isin(list(methods))]
    if summary.empty:
        raise ValueError(f"rank_collapse: no spectra of the methods {list(methods)}")
    kinds = [k for k in kinds if k in set(summary["kind"])]
    if not kinds:
        raise ValueError(
            f"rank_collapse: none of the layer kinds is in the summary "
            f"(has {sorted(set(summary['kind']))})"
        )
    agg = (
        summary.groupby(["method", "boosted", "kind", "n_experts"], sort=False)[
            ["stable_rank", "energy_rank"]
        ]
        .mean()
        .reset_index()
    )
    order = _method_order(summary["method"], recipe.methods)
    labels = _labels(order, recipe.methods)
    colors = {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(order)}
    markers = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(order)}
    ns = sorted(set(summary["n_experts"].astype(int)))
    # curves that coincide (boosted methods often reach the same rank) are drawn side by side:
    # each method's points shifted along N by its own small offset, and named in a note
    step = 0.5 * (min(np.diff(ns)) if len(ns) > 1 else 1) / max(len(order), 1)
    offsets = {m: (i - (len(order) - 1) / 2) * step for i, m in enumerate(order)}
    fig = Figure(figsize=(3.0 * len(kinds) + 2.2, 5.4))
    axes = fig.subplots(2, len(kinds), squeeze=False, sharex=True)
    energy = "cumulative-energy rank" + (
        f"\n({energy_frac:.0%} of the energy)" if energy_frac else ""
    )
    coincide: dict[tuple, list[str]] = {}  # (metric, methods) -> layer kinds where equal
    for col, kind in enumerate(kinds):
        for row, (metric, ylabel) in enumerate(
            (("stable_rank", "mean stable rank"), ("energy_rank", f"mean {energy}"))
        ):
            ax = axes[row][col]
            curves = {}
            for m in order:
                for boosted in (False, True):
                    sel = agg.loc[
                        (agg["method"] == m) & (agg["boosted"] == boosted) & (agg["kind"] == kind)
                    ].sort_values("n_experts")
                    if len(sel):
                        curves[(m, boosted)] = sel
                        ax.plot(
                            sel["n_experts"] + offsets[m],
                            sel[metric],
                            color=colors[m],
                            linestyle="--" if boosted else "-",
                            marker=markers[m],
                            markerfacecolor="white" if boosted else colors[m],
                            markeredgewidth=1.3,
                            alpha=0.9,
                        )
            for same in _coinciding(curves, metric):
                key = (metric, tuple(labels[m] + (" (boosted)" if b else "") for m, b in same))
                coincide.setdefault(key, []).append(KIND_TITLES.get(kind, kind))
            if row == 0:
                ax.set_title(f"{KIND_TITLES.get(kind, kind)} layers")
            else:
                ax.set_xlabel("number of merged experts N")
            if col == 0:
                ax.set_ylabel(ylabel)
            ax.set_xticks(ns)
            ax.set_ylim(bottom=0)
    fig.align_ylabels(axes[:, 0])
    handles = [Line2D([], [], color=colors[m], marker=markers[m], label=labels[m]) for m in order]
    style = [Line2D([], [], color="0.3", linestyle="-", marker="o", label="before boosting"),
             Line2D([], [], color="0.3", linestyle="--", marker="o", markerfacecolor="white",
                    label="after boosting")]
    _outside_legend(fig, handles + style)
    if coincide:
        names = {"stable_rank": "stable rank", "energy_rank": "energy rank"}
        lines = [f"{names[metric]}, {' and '.join(kinds_)} layers: {' = '.join(methods_)}"
                 for (metric, methods_), kinds_ in coincide.items()]
        fig.supxlabel("equal curves (points drawn side by side, shifted along N):\n"
                      + "\n".join(lines), x=0.02, ha="left", fontsize=7.5)
    return save_figure(fig, stem)


def _coinciding(curves: Mapping[tuple, pd.DataFrame], metric: str) -> list[list[tuple]]:
    """Sets of two or more curves (key -> rows with n_experts and ``metric``) with the same
    values (relative tolerance 1e-3) at every N they share, each set in the curves' order."""
    sets: list[list[tuple]] = []
    for key, sel in curves.items():
        series = sel.set_index("n_experts")[metric]
        for group in sets:
            ref = curves[group[0]].set_index("n_experts")[metric]
            shared = series.index.intersection(ref.index)
            if len(shared) and np.allclose(series[shared], ref[shared], rtol=1e-3, atol=0):
                group.append(key)
                break
        else:
            sets.append([key])
    return [g for g in sets if len(g) > 1]


# ------------------------------------------------------------------------------- spectra


def default_spectra_method(recipe: Recipe, present: Sequence[str]) -> str:
    """The method whose spectra are shown: the first boosted Task Arithmetic method without
    LiNeS, else the first boosted method, else the only method of the frame."""
    present = [m for m in recipe.methods if m in set(present)] or list(dict.fromkeys(present))
    boosted = [m for m in present if m in recipe.methods and recipe.methods[m].boosted]
    plain_ta = [m for m in boosted if recipe.methods[m].merge == "task_arithmetic"
                and recipe.methods[m].lines is None]
    if plain_ta or boosted:
        return (plain_ta or boosted)[0]
    if len(present) != 1:
        raise ValueError(f"spectra: several methods in the frame ({present}) and none is "
                         "boosted; pass method=")
    return present[0]


@_styled
def spectra(
    sv: pd.DataFrame,
    recipe: Recipe,
    stem: str | os.PathLike,
    *,
    method: str | None = None,
    kinds: Sequence[str] = ("attn", "mlp"),
    key: str | None = None,
    gammas: Sequence[float] = (1.0, 0.5),
    max_index: int | None = None,
) -> list[Path]:
    """Paper Fig. 3 / Figs. 10–12: singular values of the merged task vector of ``method``
    per layer kind (columns), one colour per N, solid before / dashed after boosting (top
    row); then one row per γ with the unboosted spectra divided by N^γ (Supp. E.4: the
    common leading values overlap at γ = 1, the unique tail at γ = 0.5).

    ``sv``: columns group, n_experts, method, boosted, kind, key, index, sigma. The
    spectrum shown is the mean over the kind's keys (or only ``key``) and over groups of
    equal N, at each index. ``method`` defaults to :func:`default_spectra_method`.
    """
    tables.require_columns(
        sv,
        ["group", "n_experts", "method", "boosted", "kind", "key", "index", "sigma"],
        "singular values",
    )
    present = list(dict.fromkeys(sv["method"]))
    if method is None:
        method = default_spectra_method(recipe, present)
    if method not in present:
        raise ValueError(f"spectra: method {method!r} not in the frame (has {present})")
    sub = sv.loc[sv["method"] == method]
    if key is not None:
        if key not in set(sub["key"]):
            raise ValueError(f"spectra: key {key!r} not in the frame for method {method!r}")
        sub = sub.loc[sub["key"] == key]
        kinds = list(dict.fromkeys(sub["kind"]))
    kinds = [k for k in kinds if k in set(sub["kind"])]
    if not kinds:
        raise ValueError(f"spectra: none of the layer kinds is in the frame for {method!r}")
    if max_index is not None:
        sub = sub.loc[sub["index"] < max_index]
    mean = (
        sub.groupby(["kind", "boosted", "n_experts", "index"], sort=True)["sigma"]
        .mean()
        .reset_index()
    )
    ns = sorted(set(mean["n_experts"].astype(int)))
    colors = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(ns)}
    rows = [None, *gammas]
    fig = Figure(figsize=(3.2 * len(kinds) + 1.8, 2.5 * len(rows) + 0.4))
    axes = fig.subplots(len(rows), len(kinds), squeeze=False, sharex="col")
    for col, kind in enumerate(kinds):
        for row, gamma in enumerate(rows):
            ax = axes[row][col]
            for n in ns:
                for boosted in ((False, True) if gamma is None else (False,)):
                    sel = mean.loc[
                        (mean["kind"] == kind)
                        & (mean["n_experts"] == n)
                        & (mean["boosted"] == boosted)
                    ]
                    if not len(sel):
                        continue
                    y = sel["sigma"].to_numpy(dtype=float)
                    if gamma is not None:
                        y = y / float(n) ** gamma  # Supp. E.4: S / N**gamma
                    y = np.where(y > 0, y, np.nan)  # log axis: zeros are not drawn
                    ax.plot(
                        sel["index"].to_numpy() + 1,
                        y,
                        color=colors[n],
                        linestyle="--" if boosted else "-",
                        linewidth=1.3,
                    )
            ax.set_yscale("log")
            if row == 0:
                ax.set_title(f"{KIND_TITLES.get(kind, kind)} layers" + (f"\n{key}" if key else ""))
            if row == len(rows) - 1:
                ax.set_xlabel("singular value index i")
            if col == 0:
                ax.set_ylabel(
                    r"singular value $\sigma_i$"
                    if gamma is None
                    else rf"$\sigma_i\,/\,N^{{{gamma:g}}}$ (before boosting)"
                )
    fig.align_ylabels(axes[:, 0])
    handles = [Line2D([], [], color=colors[n], label=f"N = {n}") for n in ns]
    _outside_legend(
        fig, handles + _style_handles(markers=False), title=_labels([method], recipe.methods)[method]
    )
    return save_figure(fig, stem)


# ---------------------------------------------------------------- accuracy vs experts


@_styled
def accuracy_vs_experts(
    scores: pd.DataFrame,
    recipe: Recipe,
    stem: str | os.PathLike,
    *,
    split: str = "test",
    metric: str = "acc",
) -> list[Path]:
    """Average accuracy (``metric`` "acc" absolute or "norm" normalised, %) on ``split``
    against the number of experts N. A method and its boosted variant share a colour
    (solid without, dashed with boosting); zero-shot and finetuned are grey references.
    Groups of equal N are averaged."""
    if metric not in ("acc", "norm"):
        raise ValueError(f"accuracy_vs_experts: metric must be 'acc' or 'norm', got {metric!r}")
    methods = recipe.methods
    summary = tables.grid_summary(scores, split)
    ref = tables.reference_summary(scores, split)
    labels = tables.method_labels(methods)
    colors: dict[str, str] = {}
    for m in methods:
        base = tables.base_method(m, methods)
        colors[m] = (
            colors[base] if base in colors else PALETTE[len(set(colors.values())) % len(PALETTE)]
        )
    fig = Figure(figsize=(6.8, 3.8))
    ax = fig.subplots()
    for col, label, color in (("finetuned", "Finetuned", "0.35"), ("zeroshot", "Zero-shot", "0.6")):
        r = ref.groupby("n_experts")[f"{col}_{metric}"].mean()
        ax.plot(r.index, r.values, color=color, linestyle=":", marker=".", label=label)
    for m, meth in methods.items():
        sel = summary.loc[summary["method"] == m].groupby("n_experts")[metric].mean()
        if not len(sel):
            log.warning("accuracy_vs_experts: method %r has no %s scores", m, split)
            continue
        boosted = meth.boosted
        ax.plot(
            sel.index,
            sel.values,
            color=colors[m],
            linestyle="--" if boosted else "-",
            marker="s" if boosted else "o",
            label=labels[m],
        )
    ax.set_xticks(sorted(set(scores["n_experts"].astype(int))))
    ax.set_xlabel("number of merged experts N")
    kind = "normalised accuracy" if metric == "norm" else "accuracy"
    ax.set_ylabel(f"average {split} {kind} (%)")
    fig.legend(loc="outside right upper")
    return save_figure(fig, stem)


# -------------------------------------------------------------------------- α × β heatmap


def _annotate(ax, values: np.ndarray, fmt: str, fontsize: float) -> None:
    finite = values[np.isfinite(values)]
    lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    for (i, j), v in np.ndenumerate(values):
        if not np.isfinite(v):
            continue
        light = hi == lo or (v - lo) / (hi - lo) > 0.6  # viridis is bright at the top
        ax.text(
            j,
            i,
            format(v, fmt),
            ha="center",
            va="center",
            fontsize=fontsize,
            color="black" if light else "white",
        )


@_styled
def alpha_beta_heatmap(
    scores: pd.DataFrame, recipe: Recipe, stem: str | os.PathLike, *, metric: str = "acc"
) -> list[Path]:
    """Validation accuracy (%) over the α × β grid: one panel per (boosted method, group)
    with validation scores (only those: a method configured for some groups has no empty
    panels), in method then group order, at most :data:`HEATMAP_COLUMNS` per row; β across,
    α down, cells annotated; the grid point chosen for test is outlined. ``metric``: "acc"
    (absolute) or "norm" (normalised)."""
    if metric not in ("acc", "norm"):
        raise ValueError(f"alpha_beta_heatmap: metric must be 'acc' or 'norm', got {metric!r}")
    val = tables.grid_summary(scores, "val")
    test = tables.grid_summary(scores, "test")
    boosted = [
        m for m, meth in recipe.methods.items() if meth.boosted and m in set(val["method"])
    ]
    if not boosted:
        raise ValueError("alpha_beta_heatmap: no boosted method has validation scores")
    labels = tables.method_labels(recipe.methods)
    groups = [g for g in tables.group_order(scores) if g in set(val["group"])]
    grids = {}
    for g in groups:
        for m in boosted:
            sel = val.loc[(val["group"] == g) & (val["method"] == m)]
            if len(sel):
                grids[(g, m)] = sel.pivot_table(
                    index="alpha", columns="beta", values=metric, aggfunc="first", dropna=False
                )
    pairs = [(g, m) for m in boosted for g in groups if (g, m) in grids]
    n_alpha = max((grid.shape[0] for grid in grids.values()), default=1)
    n_beta = max((grid.shape[1] for grid in grids.values()), default=1)
    panel_w, panel_h = max(3.6, 0.75 * n_beta + 2.2), 0.32 * n_alpha + 1.3
    ncols = min(len(pairs), HEATMAP_COLUMNS)
    nrows = math.ceil(len(pairs) / ncols)
    fig = Figure(figsize=(panel_w * ncols, panel_h * nrows + 0.6))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[len(pairs):]:
        ax.remove()
    for ax, (g, m) in zip(axes.flat, pairs):
        ax.grid(False)
        grid = grids[(g, m)]
        values = grid.to_numpy(dtype=float)
        im = ax.imshow(values, aspect="auto", cmap=HEATMAP_CMAP, interpolation="nearest")
        _annotate(ax, values, ".1f", fontsize=7 if values.size > 12 else 8)
        ax.set_xticks(range(grid.shape[1]), [f"{b:g}" for b in grid.columns])
        ax.set_yticks(range(grid.shape[0]), [f"{a:g}" for a in grid.index])
        ax.set_xlabel("boosting threshold β")
        ax.set_ylabel("scaling coefficient α")
        ax.set_title(f"{labels[m]} · {g}")
        chosen = test.loc[(test["group"] == g) & (test["method"] == m)]
        if len(chosen):
            a, b = float(chosen["alpha"].iloc[0]), float(chosen["beta"].iloc[0])
            ia = np.flatnonzero(np.isclose(grid.index.to_numpy(dtype=float), a))
            ib = np.flatnonzero(np.isclose(grid.columns.to_numpy(dtype=float), b))
            if ia.size and ib.size:
                ax.add_patch(
                    Rectangle(
                        (ib[0] - 0.5, ia[0] - 0.5),
                        1,
                        1,
                        fill=False,
                        edgecolor="#D55E00",
                        linewidth=2.2,
                    )
                )
        cbar = fig.colorbar(im, ax=ax, shrink=0.9)
        cbar.set_label(f"val {'normalised ' if metric == 'norm' else ''}accuracy (%)")
    fig.suptitle("validation accuracy over the α × β grid\n(outlined: point chosen for test)")
    return save_figure(fig, stem)


# ---------------------------------------------------------------------------- HO-GSVD


@_styled
def alignment_heatmap(
    hogsvd: Mapping[str, Any],
    recipe: Recipe,
    stem: str | os.PathLike,
    *,
    annotate: bool | None = None,
) -> list[Path]:
    """Paper Figs. 5b/13: HO-GSVD alignment matrices (Eq. 7), one panel per entry of
    ``hogsvd["alignment"]`` (e.g. "attn", "mlp", "mean"), the experts ``hogsvd["experts"]``
    on both axes (``hogsvd``: the HO-GSVD summary,
    :func:`submerge.stages.report.hogsvd_summary`). Cells are annotated when ``annotate``
    (default: N ≤ 10)."""
    names, matrices = list(hogsvd["experts"]), hogsvd["alignment"]
    n = len(names)
    if not matrices:
        raise ValueError("alignment_heatmap: no matrices given")
    mats = {}
    for title, mat in matrices.items():
        mat = np.asarray(mat, dtype=float)
        if mat.shape != (n, n):
            raise ValueError(
                f"alignment_heatmap: matrix {title!r} has shape {mat.shape}, "
                f"expected ({n}, {n}) for {n} expert names"
            )
        mats[title] = mat
    annotate = n <= 10 if annotate is None else annotate
    ncols = min(len(mats), 3 if n <= 10 else 2)
    nrows = math.ceil(len(mats) / ncols)
    side = max(2.4, 0.3 * n)  # the square heatmap itself
    fig = Figure(figsize=(ncols * (side + 2.0), nrows * (side + 1.4) + 0.4))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[len(mats) :]:
        ax.set_axis_off()
    for ax, (title, mat) in zip(axes.flat, mats.items()):
        ax.grid(False)
        im = ax.imshow(mat, cmap=HEATMAP_CMAP, interpolation="nearest")
        if annotate:
            _annotate(ax, mat, ".2f", fontsize=7 if n > 6 else 8)
        ax.set_xticks(range(n), names, rotation=60, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(n), names)
        ax.set_title(KIND_TITLES.get(title, title))
        fig.colorbar(im, ax=ax, shrink=0.85).set_label("alignment score")
    group = f", group {hogsvd['group']}" if hogsvd.get("group") else ""
    fig.suptitle(f"HO-GSVD alignment matrix{group} (higher = better aligned, easier to merge)")
    return save_figure(fig, stem)


@_styled
def subspace_importance(
    hogsvd: Mapping[str, Any],
    recipe: Recipe,
    stem: str | os.PathLike,
    *,
    merged_label: str = "merged (mean)",
    threshold: float | None = 1.0,
) -> list[Path]:
    """Paper Fig. 5a: generalised singular values of each expert (rows of
    ``hogsvd["importance"]["sigma"]``, N × M, in the shared HO-GSVD basis order of one
    matrix) and, if given, of the merged task vector (``...["merged"]``, M values); experts
    ``hogsvd["experts"]`` (the HO-GSVD summary, :func:`submerge.stages.report.hogsvd_summary`).
    Left, top: the experts' median and interquartile band per shared direction, the merged
    values and ``threshold`` (dashed; log scale); left, bottom: every expert's values as a
    heatmap (one row per expert, log colours), readable for twenty experts. Right: their
    distribution per expert (box plots)."""
    names, imp = list(hogsvd["experts"]), hogsvd["importance"]
    merged = imp.get("merged")
    title = None
    if imp.get("key"):
        title = f"{imp['key']} (row block {imp.get('row_block', 0)})" + (
            f", group {hogsvd['group']}" if hogsvd.get("group") else "")
    sig = np.asarray(imp["sigma"], dtype=float)
    if sig.ndim != 2 or sig.shape[0] != len(names):
        raise ValueError(
            f"subspace_importance: sigmas has shape {sig.shape}, expected "
            f"({len(names)}, M) for {len(names)} expert names"
        )
    series = {str(name): sig[i] for i, name in enumerate(names)}
    if merged is not None:
        merged = np.asarray(merged, dtype=float).ravel()
        if merged.shape[0] != sig.shape[1]:
            raise ValueError(
                f"subspace_importance: merged has {merged.shape[0]} values, "
                f"experts have {sig.shape[1]}"
            )
    n, m = sig.shape
    positive = np.where(sig > 0, sig, np.nan)
    # left: the experts' spread per shared direction (median and interquartile band) with the
    # merged task vector's values and the threshold (top), every expert's values as a heatmap
    # (one row per expert, log colour scale: twenty overlapping lines could not be read); right:
    # each expert's distribution (box plots)
    fig = Figure(figsize=(11.5, 3.2 + 0.2 * n))
    left, right = fig.subfigures(1, 2, width_ratios=(1.7, 1.0))
    ax_line, ax_heat = left.subplots(2, 1, sharex=True, height_ratios=(1.0, max(1.2, 0.09 * n)))
    ax_box = right.subplots()
    x = np.arange(1, m + 1)
    with np.errstate(all="ignore"):
        q25, q50, q75 = np.nanpercentile(positive, [25, 50, 75], axis=0)
    ax_line.fill_between(x, q25, q75, color=PALETTE[0], alpha=0.25, linewidth=0,
                         label="experts: 25–75 %")
    ax_line.plot(x, q50, color=PALETTE[0], linewidth=1.4, label="experts: median")
    box_data = [v[v > 0] for v in series.values()]
    box_labels = list(series)
    if merged is not None:
        ax_line.plot(x, np.where(merged > 0, merged, np.nan), color="black", linewidth=1.8,
                     label=merged_label)
        box_data.append(merged[merged > 0])
        box_labels.append(merged_label)
    if threshold is not None:
        for ax in (ax_line, ax_box):
            ax.axhline(threshold, color="0.4", linestyle="--", linewidth=1.0,
                       label=f"threshold {threshold:g}")
    ax_line.set_yscale("log")
    ax_line.set_ylabel("generalised\nsingular value")
    ax_line.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncols=4, fontsize=7.5,
                   borderaxespad=0.2)  # above the values: none is hidden
    finite = positive[np.isfinite(positive)]
    norm = LogNorm(vmin=finite.min(), vmax=finite.max()) if finite.size else None
    ax_heat.grid(False)
    im = ax_heat.imshow(positive, aspect="auto", cmap=HEATMAP_CMAP, norm=norm,
                        interpolation="nearest", extent=(0.5, m + 0.5, n - 0.5, -0.5))
    ax_heat.set_yticks(range(n), box_labels[:n], fontsize=7 if n > 10 else 8)
    ax_heat.set_xlabel("shared right singular vector index (HO-GSVD)")
    left.colorbar(im, ax=ax_heat, shrink=0.9, pad=0.01).set_label("generalised s.v.")
    ax_box.boxplot(
        box_data, tick_labels=box_labels, showfliers=False, medianprops={"color": "black"}
    )
    ax_box.set_yscale("log")
    ax_box.tick_params(axis="x", rotation=60)
    for lab in ax_box.get_xticklabels():
        lab.set_horizontalalignment("right")
        lab.set_rotation_mode("anchor")
    ax_box.set_ylabel("generalised singular value")
    ax_box.set_title("distribution per expert")
    if title:
        fig.suptitle(title)
    return save_figure(fig, stem)


# ------------------------------------------------------------------------ Proposition 1


@_styled
def proposition1(decay: Mapping[str, Any], recipe: Recipe, stem: str | os.PathLike) -> list[Path]:
    """Paper Proposition 1 on the suite's own task vectors (``decay``: the summary of
    :func:`submerge.stages.decay.decay_summary`). Left: the Frobenius norm of the common and
    unique parts (HO-GSVD split, Eq. 6) of the mean of the first N task vectors, relative to
    N = 1, median over the group's matrices with the 25–75 % band, against N, with the 1/√N
    reference. Right: the singular values of both parts of one matrix at several N."""
    n = np.asarray(decay["n"], dtype=float)
    rel = {}
    for part in ("common", "unique"):
        rows = [np.asarray(m[f"{part}_fro"], dtype=float) for m in decay["matrices"]]
        rows = [r / r[0] for r in rows if r[0] > 0]
        if not rows:
            raise ValueError(f"proposition1: no matrix has a non-zero {part} part")
        rel[part] = np.stack(rows)
    fig = Figure(figsize=(10.0, 3.9))
    ax, ax_sv = fig.subplots(1, 2)
    for color, part in zip(PALETTE, ("common", "unique")):
        r = rel[part]
        ax.plot(n, np.median(r, axis=0), color=color, marker="o", markersize=3,
                label=f"{part} part ({r.shape[0]} matrices, median)")
        ax.fill_between(n, np.quantile(r, 0.25, axis=0), np.quantile(r, 0.75, axis=0),
                        color=color, alpha=0.2, linewidth=0)
    ax.plot(n, 1.0 / np.sqrt(n), color="0.3", linestyle="--", label="1/√N")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("number of averaged task vectors N")
    ax.set_ylabel("Frobenius norm relative to N = 1")
    ax.set_title(f"common vs unique energy, group {decay.get('group', '')}")
    ax.legend(loc="lower left")
    spectra = decay.get("spectra")
    if spectra:
        for i, size in enumerate(spectra["n"]):
            color = PALETTE[i % len(PALETTE)]
            for part, style in (("common", "-"), ("unique", "--")):
                sv = np.asarray(spectra[f"{part}_sv"][i], dtype=float)
                sv = sv[sv > 1e-12 * max(sv.max(), 1e-300)]
                ax_sv.plot(np.arange(1, sv.size + 1), sv, color=color, linestyle=style,
                           linewidth=1.2, label=f"N = {size}" if part == "common" else None)
        ax_sv.set_yscale("log")
        ax_sv.set_xlabel("singular value index")
        ax_sv.set_ylabel("singular value")
        ax_sv.set_title(f"{spectra['key']} (block {spectra['row_block']})\n"
                        "solid: common part, dashed: unique part")
        ax_sv.legend(loc="upper right")
    else:
        ax_sv.set_axis_off()
        ax_sv.set_title("(no matrix with both common and unique directions)")
    fig.suptitle(f"Proposition 1 check: common and unique parts of the mean of N task vectors\n"
                 f"(HO-GSVD split: common = σ within ×{decay.get('threshold', 0):g} for every "
                 f"pair of experts, {100 * decay.get('common_fraction', 0):.0f}% of directions)")
    return save_figure(fig, stem)
