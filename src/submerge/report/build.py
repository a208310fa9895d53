"""The report stage of the workflow: summaries of the caches, every table and figure, each
with its provenance sidecar. Called by the thin scripts of ``workflow/rules/report.smk``."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from submerge.io.atomic import atomic_path
from submerge.report import figures, provenance, tables

log = logging.getLogger(__name__)

PathLike = str | os.PathLike


def _write_csv(frame: pd.DataFrame, path: PathLike) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")


# --------------------------------------------------------------------------- cache summaries


def spectra_summary(merged: Mapping[tuple[str, str], PathLike], test_points: Mapping[tuple[str, str], PathLike],
                    groups: Mapping[str, Sequence[str]], methods: Mapping[str, Mapping],
                    out_summary: PathLike, out_sigma: PathLike, *, energy_frac: float = 0.9) -> None:
    """Stable rank, cumulative-energy rank and singular values of every attention/MLP matrix
    of each merged task vector (LiNeS included): for unboosted methods as merged, for boosted
    ones after boosting at the β chosen on validation (the singular values of boosted methods
    are also listed before boosting, ``boosted=False``, for the before/after spectra figure).

    ``merged`` / ``test_points``: (group, method) -> path of the merged cache / test JSON."""
    import torch

    from submerge import spectral
    from submerge.boosting import boost_singular_values
    from submerge.io import hdf5
    from submerge.pipeline import boost_betas

    rows, sig_rows = [], []
    for (group, method), path in sorted(merged.items()):
        meta = methods[method]
        dense, factors, layer_info, _ = hdf5.read_factored(path)
        chosen = json.loads(Path(test_points[(group, method)]).read_text())
        betas = boost_betas(meta, chosen["beta"])
        boosted = "boost" in meta
        before: dict[str, torch.Tensor] = {}  # boosted methods: their spectra before boosting
        after: dict[str, torch.Tensor] = {}
        for key, fs in factors.items():
            beta = betas[layer_info[key].kind]
            parts = [boost_singular_values(s, beta) if beta is not None else s for _, s, _ in fs]
            # the singular values of the row-stacked blocks, as in the stable rank of the key
            after[key] = spectral.singular_values(torch.cat([(u * s) @ vh for (u, _, vh), s in zip(fs, parts)]))
            before[key] = spectral.singular_values(torch.cat([(u * s) @ vh for u, s, vh in fs]))
        for key, value in dense.items():
            if layer_info[key].kind in ("attn", "mlp") and value.ndim == 2:
                after[key] = spectral.singular_values(value)
        for key, s in after.items():
            info = layer_info[key]
            base = {"group": group, "n_experts": len(groups[group]), "method": method,
                    "boosted": boosted, "key": key, "block": info.block, "kind": info.kind}
            rows.append({**base, "stable_rank": spectral.stable_rank(s),
                         "energy_rank": spectral.energy_rank(s, energy_frac)})
            states = [(boosted, s)] + ([(False, before[key])] if key in before else [])
            for state, values in states:
                for i, sigma in enumerate(values.tolist()):
                    sig_rows.append({"group": group, "n_experts": base["n_experts"], "method": method,
                                     "boosted": state, "kind": info.kind, "key": key,
                                     "index": i, "sigma": sigma})
    _write_csv(pd.DataFrame(rows), out_summary)
    _write_csv(pd.DataFrame(sig_rows), out_sigma)


def timing_frame(benchmarks: Mapping[tuple[str, str], PathLike],
                 groups: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """Merging time per (group, method) from the ``merged`` rule's benchmark files
    (Snakemake's ``s`` and ``max_rss`` columns)."""
    rows = []
    for (group, method), path in sorted(benchmarks.items()):
        bench = pd.read_csv(path, sep="\t")
        rows.append({"method": method, "group": group, "n_experts": len(groups[group]),
                     "rule": "merged", "seconds": float(bench["s"].iloc[0]),
                     "max_rss_mb": float(pd.to_numeric(bench["max_rss"], errors="coerce").iloc[0])})
    return pd.DataFrame(rows, columns=list(tables.TIMING_COLUMNS))


# --------------------------------------------------------------------------- tables


TABLES = ("main_results", "sota_comparison", "beta_ablation", "layer_ablation", "per_task_accuracy",
          "expert_selection", "merging_time")


def build_tables(scores_path: PathLike, methods: Mapping, groups: Mapping, out_dir: PathLike, *,
                 selection_path: PathLike | None, benchmarks: Mapping[tuple[str, str], PathLike],
                 config: Mapping[str, Any], selection_metric: str = "normalized") -> list[Path]:
    """Every table of the report as CSV + Markdown + LaTeX, each with a sidecar.
    A table whose inputs are absent (e.g. no SOTA methods configured) is written with a
    one-line note instead of being dropped, so the outputs are always the same files."""
    out_dir = Path(out_dir)
    scores = pd.read_csv(scores_path)
    inputs = [scores_path]
    built: dict[str, tuple[pd.DataFrame, str]] = {}

    def attempt(name, caption, fn):
        try:
            built[name] = (fn(), caption)
        except ValueError as err:  # nothing to show for this suite's config
            log.warning("table %s: %s", name, err)
            built[name] = (pd.DataFrame({"note": [str(err)]}), caption)

    attempt("main_results", "Average absolute and normalised test accuracy (%) per group; "
            "Δ = gain of Subspace Boosting over the same method without it.",
            lambda: tables.main_results(scores, methods, groups=groups))
    attempt("sota_comparison", "TSV-M, Iso-C, Iso-CTS next to TA + LiNeS + SB (test accuracy, %).",
            lambda: tables.sota_comparison(scores, methods, groups=groups))
    attempt("beta_ablation", "Accuracy (%) per boosting threshold β (validation; test at the chosen point).",
            lambda: tables.beta_ablation(scores, methods, groups=groups, select_by=selection_metric))
    attempt("layer_ablation", "Accuracy (%) when boosting attention, MLP or both layer kinds.",
            lambda: tables.layer_ablation(scores, methods, groups=groups, select_by=selection_metric))
    attempt("per_task_accuracy", "Test accuracy (%) per task, method and group.",
            lambda: tables.per_task_accuracy(scores, methods))
    if selection_path is not None:
        inputs.append(selection_path)
        attempt("expert_selection", "Expert selection: HO-GSVD alignment vs random draws (test accuracy, %).",
                lambda: tables.expert_selection(pd.read_csv(selection_path)))
    else:
        built["expert_selection"] = (pd.DataFrame({"note": ["experiments.selection not configured"]}), "")
    attempt("merging_time", "Wall time and peak memory of the merge job (Δ_merge + SVD cache) per method.",
            lambda: tables.timing_table(timing_frame(benchmarks, groups), methods, groups=groups))
    written = []
    for name in TABLES:
        frame, caption = built[name]
        paths = tables.write_table(frame, out_dir / name, caption=caption or None,
                                   label=f"tab:{name}")
        extra = list(benchmarks.values()) if name == "merging_time" else []
        provenance.write_sidecar(paths, inputs + extra, config=config)
        written += paths
    return written


# --------------------------------------------------------------------------- figures


FIGURES = ("rank_collapse", "spectra", "accuracy_vs_experts", "alpha_beta_heatmap",
           "alignment_matrix", "subspace_importance")


def _figure(fn, stem: Path, inputs: Sequence[PathLike], config: Mapping, *args, **kwargs) -> list[Path]:
    paths = fn(*args, stem, **kwargs)
    provenance.write_sidecar(paths, inputs, config=config)
    return paths


def _placeholder(stem: Path, message: str, inputs, config) -> list[Path]:
    """A figure that states why there is nothing to plot (the file set stays fixed)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 1.5))
    fig.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    paths = figures.save_figure(fig, stem)
    provenance.write_sidecar(paths, inputs, config=config)
    return paths


def hogsvd_alignment(hogsvd_path: PathLike) -> tuple[list[str], dict[str, np.ndarray], list]:
    """Alignment matrices (Eq. 7) per layer kind and over all layers, from a HO-GSVD cache."""
    from submerge.hogsvd import alignment_matrix
    from submerge.io.hogsvd_cache import read_hogsvd_cache

    experts, entries = read_hogsvd_cache(hogsvd_path)
    matrices = {}
    for kind in ("attn", "mlp"):
        sig = [e.sigma for e in entries if e.kind == kind]
        if sig:
            matrices[kind] = alignment_matrix(sig).numpy()
    matrices["mean"] = alignment_matrix([e.sigma for e in entries]).numpy()
    return experts, matrices, entries


def merged_generalised_sv(hogsvd_path: PathLike, tv_paths: Sequence[PathLike], key: str,
                          row_block: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-expert generalised singular values of one layer and those of the merged (mean)
    task vector in the same shared basis: ‖(mean_i A_i) V^{-T} e_k‖ (Fig. 5a)."""
    import torch

    from submerge.io import hdf5
    from submerge.io.hogsvd_cache import read_hogsvd_cache

    _, entries = read_hogsvd_cache(hogsvd_path, with_basis=True)
    entry = next(e for e in entries if e.key == key and e.row_block == row_block)
    n_blocks = sum(e.key == key for e in entries)  # q/k/v blocks were decomposed separately
    mean = torch.stack([t.to(torch.float64) for t in hdf5.read_key(tv_paths, key)]).mean(0)
    a = mean.chunk(n_blocks, dim=0)[row_block]
    a = a.T if entry.transposed else a
    b = torch.linalg.solve(entry.V, a.T).T  # A V^{-T}
    return entry.sigma.numpy(), b.norm(dim=0).numpy()


def build_figures(scores_path: PathLike, summary_path: PathLike, sigma_path: PathLike,
                  hogsvd_path: PathLike, hogsvd_tvs: Sequence[PathLike], methods: Mapping,
                  groups: Mapping, out_dir: PathLike, *, config: Mapping[str, Any]) -> list[Path]:
    out_dir = Path(out_dir)
    scores = pd.read_csv(scores_path)
    summary = pd.read_csv(summary_path)
    sigma = pd.read_csv(sigma_path)
    written: list[Path] = []
    # paper Fig. 1a: the Task Arithmetic family with and without boosting (TSV-M / Iso change
    # the spectrum by construction and would crowd the plot; their ranks are in the summary CSV)
    family = [m for m, meta in methods.items()
              if meta["rule"] in ("task_arithmetic", "ties", "consensus") and "lines" not in meta]
    written += _figure(figures.rank_collapse, out_dir / "rank_collapse", [summary_path], config,
                       summary[summary["method"].isin(family)], methods={m: methods[m] for m in family},
                       energy_frac=0.9)
    largest = max(groups, key=lambda g: len(groups[g]))
    boosted = [m for m in methods if "boost" in methods[m]]
    spectra_method = next((m for m in boosted if methods[m]["rule"] == "task_arithmetic"
                           and "lines" not in methods[m]), boosted[0] if boosted else None)
    written += _figure(figures.spectra, out_dir / "spectra", [sigma_path], config, sigma,
                       method=spectra_method, methods=methods)
    written += _figure(figures.accuracy_vs_experts, out_dir / "accuracy_vs_experts", [scores_path],
                       config, scores, methods)
    if boosted:
        written += _figure(figures.alpha_beta_heatmap, out_dir / "alpha_beta_heatmap", [scores_path],
                           config, scores, {m: methods[m] for m in boosted})
    else:
        written += _placeholder(out_dir / "alpha_beta_heatmap", "no boosted method configured: "
                                "no α × β grid", [scores_path], config)
    experts, matrices, entries = hogsvd_alignment(hogsvd_path)
    written += _figure(figures.alignment_heatmap, out_dir / "alignment_matrix", [hogsvd_path], config,
                       matrices, experts)
    # Fig. 5a: an attention output projection in the middle of the network
    attn = [e for e in entries if e.kind == "attn"] or entries
    middle = sorted({e.block for e in attn if e.block is not None} or {None})
    block = middle[len(middle) // 2] if middle else None
    pick = next((e for e in attn if e.block == block and "out" in e.key), attn[0])
    sig, merged = merged_generalised_sv(hogsvd_path, hogsvd_tvs, pick.key, pick.row_block)
    written += _figure(figures.subspace_importance, out_dir / "subspace_importance",
                       [hogsvd_path, *hogsvd_tvs], config, sig, experts, merged=merged,
                       title=f"{pick.key} (row block {pick.row_block}), group {largest}")
    return written
