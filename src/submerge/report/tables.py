"""Tables of the report: builders (pandas frames) and one writer (CSV + Markdown + LaTeX +
HTML).

Builders take the pipeline's frames and the run's :class:`~submerge.recipe.Recipe` (the
registry's calling convention, :mod:`submerge.report.registry`) and return a frame whose cells
are numbers, ``NaN`` for a **gap** (a method, group or task without results; shown as "—") or
``""`` for **not applicable** (e.g. the Δ of a method without boosting; shown empty).
Accuracies are in percent. :func:`write_table` formats any such frame deterministically.

The scores frame (``results/{suite}/scores.csv``) has the columns of :data:`SCORE_COLUMNS`:
one row per (group, method, alpha, beta, split, task), accuracies as fractions in 0..1,
``beta`` NaN for methods without boosting, test rows only at the grid point chosen on
validation. Everything about a method (label, boosting, its unboosted base, SOTA or not)
comes from the recipe's :class:`~submerge.recipe.Method` objects, in config order.

Averages: *absolute* accuracy = mean over the group's tasks of ``accuracy``; *normalised*
accuracy = mean over tasks of ``accuracy / expert_accuracy`` (Wang et al. 2024). A grid point
is chosen on validation by :func:`submerge.recipe.choose_point` with the config's
``eval.selection_metric`` (:func:`best_on_val`), the same function the test evaluation uses.
An average over fewer tasks than the group has is never reported: it becomes a gap (and a
warning).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from submerge import merges
from submerge.io.atomic import write_text_atomic
from submerge.recipe import GridPoint, Method, Recipe, auto_label, choose_point

log = logging.getLogger(__name__)

SCORE_COLUMNS = (
    "suite",
    "group",
    "n_experts",
    "method",
    "alpha",
    "beta",
    "split",
    "task",
    "accuracy",
    "expert_accuracy",
    "zeroshot_accuracy",
)
SELECTION_COLUMNS = ("setting", "draw", "split", "task", "task_set", "accuracy")
TIMING_COLUMNS = ("method", "group", "n_experts", "merge", "seconds", "max_rss_mb")

GAP = "—"  # missing value in Markdown (LaTeX: ---); empty in CSV
NA = ""  # not applicable (empty everywhere)
CSV_DECIMALS = 4

OURS_LABEL = "TA + LiNeS + SB"  # the paper's method, last row of the SOTA comparison
SELECTION_SETTINGS = {"random": "Random", "hogsvd": "HO-GSVD"}
TASK_SETS = {"pool": "Pool", "ext": "Ext", "all": "All"}

Methods = Mapping[str, Method]
Groups = Mapping[str, Sequence[str]] | Sequence[str] | None


# ------------------------------------------------------------------------ method metadata


def method_labels(methods: Methods) -> dict[str, str]:
    """Display name of each method: its :attr:`~submerge.recipe.Method.label`, with the
    method's name appended in parentheses where labels would collide."""
    counts = Counter(m.label for m in methods.values())
    return {name: (f"{m.label} ({name})" if counts[m.label] > 1 else m.label)
            for name, m in methods.items()}


def base_method(name: str, methods: Methods) -> str | None:
    """The method a boosted method is compared against: the first unboosted method (config
    order) with the same :meth:`~submerge.recipe.Method.without_boost` (same merge function,
    hyperparameters and LiNeS). None if ``name`` is not boosted or there is no such method."""
    method = methods[name]
    if not method.boosted:
        return None
    key = method.without_boost()
    return next((other for other, m in methods.items()
                 if not m.boosted and m.without_boost() == key), None)


# ---------------------------------------------------------------------------- summaries


def require_columns(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    """ValueError naming the missing columns of the ``what`` frame."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} frame lacks column(s) {missing}; has {list(frame.columns)}")


def _prepare_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """Validated copy with a ``norm`` column (accuracy / expert_accuracy)."""
    require_columns(scores, [c for c in SCORE_COLUMNS if c != "suite"], "scores")
    if scores.empty:
        raise ValueError("scores frame is empty: nothing to tabulate")
    df = scores.copy()
    bad_split = sorted(set(df["split"]) - {"val", "test"})
    if bad_split:
        raise ValueError(f"scores: column 'split' has values {bad_split}; expected 'val'/'test'")
    for col in ("accuracy", "expert_accuracy", "zeroshot_accuracy"):
        vals = pd.to_numeric(df[col], errors="raise").astype(float)
        out = df.loc[(vals < 0) | (vals > 1), ["group", "task", col]]
        if len(out):
            row = out.iloc[0]
            raise ValueError(
                f"scores: {col} must be a fraction in 0..1, got {row[col]} for "
                f"group {row['group']!r}, task {row['task']!r}"
            )
        df[col] = vals
    zero = df.loc[df["expert_accuracy"] <= 0]
    if len(zero):
        raise ValueError(
            f"scores: expert_accuracy is 0 for task {zero['task'].iloc[0]!r} "
            "(normalised accuracy undefined)"
        )
    nan = df["accuracy"].isna()
    if nan.any():
        log.warning(
            "scores: dropping %d rows with NaN accuracy (tasks %s)",
            int(nan.sum()),
            sorted(set(df.loc[nan, "task"])),
        )
        df = df.loc[~nan]
    df["norm"] = df["accuracy"] / df["expert_accuracy"]
    return df


def _group_tasks(df: pd.DataFrame) -> dict[str, list[str]]:
    """Each group's tasks, in order of first appearance (any split)."""
    return {g: list(dict.fromkeys(sub["task"])) for g, sub in df.groupby("group", sort=False)}


def group_order(frame: pd.DataFrame, groups: Groups = None) -> list[str]:
    """Groups ordered by number of experts, then name. ``groups`` (the recipe's groups
    mapping or a list of names) adds groups that have no rows; their size comes from the
    mapping's expert lists, or they go last."""
    n = {g: int(v) for g, v in frame.groupby("group", sort=False)["n_experts"].first().items()}
    if isinstance(groups, Mapping):
        for g, experts in groups.items():
            n.setdefault(g, len(experts))
    elif groups is not None:
        for g in groups:
            n.setdefault(g, math.inf)
    return sorted(n, key=lambda g: (n[g], g))


def _n_tasks(frame: pd.DataFrame, tasks: Mapping[str, list[str]]) -> np.ndarray:
    """Number of tasks of each row's group (works on empty frames too)."""
    return np.array([len(tasks[g]) for g in frame["group"]], dtype=np.int64)


def grid_summary(scores: pd.DataFrame, split: str) -> pd.DataFrame:
    """Average accuracy of every (group, method, alpha, beta) on ``split``.

    Columns: group, n_experts, method, alpha, beta, n_tasks, acc, norm (both in %).
    ``acc``/``norm`` are NaN (with a warning) where fewer tasks than the group has were
    scored. For ``split="test"`` each (group, method) must have a single grid point.
    """
    df = _prepare_scores(scores)
    tasks = _group_tasks(df)
    sub = df.loc[df["split"] == split]
    keys = ["group", "n_experts", "method", "alpha", "beta"]
    out = (
        sub.groupby(keys, dropna=False, sort=False)
        .agg(n_tasks=("task", "nunique"), acc=("accuracy", "mean"), norm=("norm", "mean"))
        .reset_index()
    )
    out["acc"] *= 100.0
    out["norm"] *= 100.0
    short = out["n_tasks"] < _n_tasks(out, tasks)
    for _, row in out.loc[short].iterrows():
        log.warning(
            "%s scores of method %r in group %r cover %d of %d tasks: shown as a gap",
            split,
            row["method"],
            row["group"],
            row["n_tasks"],
            len(tasks[row["group"]]),
        )
    out.loc[short, ["acc", "norm"]] = np.nan
    if split == "test":
        dup = out.duplicated(["group", "method"], keep=False)
        if dup.any():
            row = out.loc[dup].iloc[0]
            raise ValueError(
                f"scores: test rows of method {row['method']!r} in group "
                f"{row['group']!r} span several grid points (alpha, beta); "
                "expected only the point chosen on validation"
            )
    return out


def reference_summary(scores: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """Zero-shot and finetuned averages per group (%, one value per task, then the mean).

    Columns: group, n_experts, zeroshot_acc, zeroshot_norm, finetuned_acc, finetuned_norm.
    """
    df = _prepare_scores(scores)
    tasks = _group_tasks(df)
    sub = df.loc[df["split"] == split]
    per_task = (
        sub.groupby(["group", "n_experts", "task"], sort=False)[
            ["expert_accuracy", "zeroshot_accuracy"]
        ]
        .mean()
        .reset_index()
    )
    per_task["zeroshot_norm"] = per_task["zeroshot_accuracy"] / per_task["expert_accuracy"]
    out = (
        per_task.groupby(["group", "n_experts"], sort=False)
        .agg(
            n_tasks=("task", "nunique"),
            zeroshot_acc=("zeroshot_accuracy", "mean"),
            zeroshot_norm=("zeroshot_norm", "mean"),
            finetuned_acc=("expert_accuracy", "mean"),
        )
        .reset_index()
    )
    out["finetuned_norm"] = 1.0
    value_cols = ["zeroshot_acc", "zeroshot_norm", "finetuned_acc", "finetuned_norm"]
    out[value_cols] *= 100.0
    short = out["n_tasks"] < _n_tasks(out, tasks)
    out.loc[short, value_cols] = np.nan
    return out.drop(columns="n_tasks")


def _beta(value: Any) -> float | None:
    """A scores.csv β as a grid point's β (NaN: no boosting)."""
    return None if pd.isna(value) else float(value)


def best_on_val(scores: pd.DataFrame, metric: str,
                by: Sequence[str] = ("group", "method")) -> pd.DataFrame:
    """For each combination of ``by`` (at least group and method; add "beta" for the best α
    per β) the validation grid point chosen by :func:`submerge.recipe.choose_point`, the
    function that chooses the test point, with ``metric`` (the config's
    ``eval.selection_metric``): a point per (α, β) of the val rows (β NaN: no β), its
    accuracy per task, each task's expert accuracy from the ``expert_accuracy`` column.
    Points scored on fewer tasks than the group has are no candidates. Columns as
    :func:`grid_summary`, plus ``score`` (the chosen point's validation score)."""
    by = list(by)
    if not {"group", "method"} <= set(by) or not set(by) <= {"group", "n_experts", "method", "beta"}:
        raise ValueError(f"best_on_val: by must hold 'group' and 'method' (and may hold "
                         f"'n_experts', 'beta'), got {by}")
    summary = grid_summary(scores, "val")
    val = _prepare_scores(scores)
    val = val.loc[val["split"] == "val"]
    accuracy: dict[tuple, dict[str, float]] = {}
    expert: dict[str, dict[str, float]] = {}
    for row in val.itertuples(index=False):
        point = GridPoint(float(row.alpha), _beta(row.beta))
        accuracy.setdefault((row.group, row.method, point), {})[row.task] = float(row.accuracy)
        expert.setdefault(row.group, {})[row.task] = float(row.expert_accuracy)
    complete = summary.dropna(subset=["acc"])
    rows, scores_ = [], []
    for _, sub in complete.groupby(by, dropna=False, sort=False):
        group, method = sub["group"].iloc[0], sub["method"].iloc[0]
        candidates = {GridPoint(float(r.alpha), _beta(r.beta)): i
                      for i, r in zip(sub.index, sub.itertuples(index=False))}
        point, score = choose_point(((p, accuracy[(group, method, p)]) for p in candidates),
                                    expert[group], metric, warn_edges="beta" not in by)
        rows.append(candidates[point])
        scores_.append(score)
    out = complete.loc[rows].copy()
    out["score"] = scores_
    return out.reset_index(drop=True)


# ------------------------------------------------------------------------------- builders


def _lookup(summary: pd.DataFrame, group: str, method: str, col: str) -> float:
    hit = summary.loc[(summary["group"] == group) & (summary["method"] == method), col]
    return float(hit.iloc[0]) if len(hit) else math.nan


def edge_points(scores: pd.DataFrame, methods: Methods) -> dict[tuple[str, str], tuple[str, ...]]:
    """(group, method) -> the axes on which its test point (chosen on validation) sits at the
    edge of the method's grid (:func:`submerge.recipe.grid_edges`); only those on an edge."""
    from submerge.recipe import grid_edges

    test = grid_summary(scores, "test")
    out = {}
    for row in test.itertuples(index=False):
        if row.method not in methods:
            continue
        edges = grid_edges(GridPoint(float(row.alpha), _beta(row.beta)),
                           methods[row.method].grid())
        if edges:
            out[(row.group, row.method)] = edges
    return out


def method_notes(methods: Methods, names: Sequence[str], edges: Mapping) -> list[str]:
    """Footnotes of a table: the LiNeS protocol of each LiNeS method among ``names`` and, if any
    cell is marked, what † means."""
    from submerge.recipe import EDGE_MARK

    notes = []
    labels = method_labels(methods)
    for m in names:
        lines = methods[m].lines if m in methods else None
        if lines is None:
            continue
        if lines.tunes_slope:
            notes.append(f"{labels[m]}: LiNeS reference protocol (wang-kee/LiNeS): scale "
                         f"{lines.scale} (‖Σ τ‖₁/‖τ_merged‖₁/T for 'norm'), LiNeS β tuned on "
                         "validation as the grid's α, merge coefficient 1.0.")
        else:
            notes.append(f"{labels[m]}: LiNeS fixed-slope protocol: scale {lines.scale}, "
                         f"slope {lines.slope:g}, merge coefficient α tuned on validation.")
    if edges:
        notes.append(f"{EDGE_MARK} the α or β chosen on validation is on the edge of its list "
                     "(the optimum may lie outside it): "
                     + "; ".join(f"{labels.get(m, m)} on {g} ({', '.join(ax)})"
                                 for (g, m), ax in edges.items()) + ".")
    return notes


def _summary_table(
    scores: pd.DataFrame,
    methods: Methods,
    rows: Sequence[tuple[str, str | None]],
    refs: Sequence[str],
    groups: Groups,
    split: str,
    metrics: Sequence[str],
    deltas: bool,
) -> pd.DataFrame:
    """Rows: reference rows then (label, method name or None for a placeholder)."""
    summary = grid_summary(scores, split)
    ref = reference_summary(scores, split)
    known = set(summary["method"])
    for m in sorted(known - set(methods)):
        log.warning("scores have method %r that is not in the methods config: not tabulated", m)
    for label, m in rows:
        if m is not None and m not in known:
            log.warning("method %r (%s) has no %s scores: shown as a gap", m, label, split)
    order = group_order(scores, groups)
    names = {"acc": "Acc", "norm": "Norm"}
    cols = [(g, names[k]) for g in order for k in metrics]
    if deltas:
        cols = [
            (g, c)
            for g in order
            for c in [names[k] for k in metrics] + ["Δ" + names[k] for k in metrics]
        ]
    data: dict[str, dict[tuple[str, str], Any]] = {}
    ref_keys = {"Zero-shot": "zeroshot", "Finetuned": "finetuned"}
    for r in refs:
        data[r] = {}
        for g in order:
            for k in metrics:
                hit = ref.loc[ref["group"] == g, f"{ref_keys[r]}_{k}"]
                data[r][(g, names[k])] = float(hit.iloc[0]) if len(hit) else math.nan
                if deltas:
                    data[r][(g, "Δ" + names[k])] = NA
    from submerge.recipe import EDGE_MARK

    present = [m for _, m in rows if m is not None]
    edges = {k: v for k, v in edge_points(scores, methods).items() if k[1] in present}
    for label, m in rows:
        data[label] = {}
        base = base_method(m, methods) if m is not None else None
        if m is not None and methods[m].boosted and base is None:
            log.info("boosted method %r has no configured base method: no Δ", m)
        for g in order:
            for k in metrics:
                v = _lookup(summary, g, m, k) if m is not None else math.nan
                if (g, m) in edges and not math.isnan(v):
                    v = Marked(v, EDGE_MARK)
                data[label][(g, names[k])] = v
                if deltas:
                    if m is None or base is None:  # no boosting, or no base to compare
                        data[label][(g, "Δ" + names[k])] = NA
                    else:
                        data[label][(g, "Δ" + names[k])] = v - _lookup(summary, g, base, k)
    table = pd.DataFrame.from_dict(data, orient="index", dtype=object)
    table = table.reindex(columns=pd.MultiIndex.from_tuples(cols))
    table.index.name = "Method"
    for label, row in data.items():  # the frame's constructor drops the float subclass
        for col, v in row.items():
            if isinstance(v, Marked):
                table.at[label, col] = v
    table.attrs["notes"] = method_notes(methods, present, edges)
    return table


def main_results(scores: pd.DataFrame, recipe: Recipe, *, split: str = "test") -> pd.DataFrame:
    """Paper Table 1: rows Zero-shot, Finetuned and the methods (config order); columns
    (group, Acc | Norm | ΔAcc | ΔNorm), groups by number of experts (the recipe's groups
    without scores are gaps). Values in %; Δ = a boosted method minus its
    :func:`base_method` ("" for methods without boosting or without a configured base; a gap
    where either has no scores)."""
    methods = recipe.methods
    labels = method_labels(methods)
    deltas = any(m.boosted for m in methods.values())
    return _summary_table(
        scores,
        methods,
        [(labels[m], m) for m in methods],
        ["Zero-shot", "Finetuned"],
        recipe.groups,
        split,
        ("acc", "norm"),
        deltas,
    )


def sota_comparison(scores: pd.DataFrame, recipe: Recipe, *, split: str = "test") -> pd.DataFrame:
    """Paper Table 4: Finetuned, then the methods of every merge function marked ``sota`` in
    :mod:`submerge.merges` (TSV-M, Iso-C, Iso-CTS; one not configured is a row of gaps) and
    TA + LiNeS + SB. Columns (group, Acc | Norm)."""
    methods = recipe.methods
    labels = method_labels(methods)
    rows: list[tuple[str, str | None]] = []
    for spec in merges.MERGES.values():
        if spec.sota:
            found = [m for m, meth in methods.items() if meth.merge == spec.name]
            rows += [(labels[m], m) for m in found] or [(spec.label, None)]
    ours = [m for m, meth in methods.items()
            if meth.merge == "task_arithmetic" and meth.lines is not None and meth.boosted]
    rows += [(labels[m], m) for m in ours] or [(OURS_LABEL, None)]
    return _summary_table(
        scores, methods, rows, ["Finetuned"], recipe.groups, split, ("acc", "norm"), deltas=False
    )


def _metric_at(
    summary: pd.DataFrame, group: str, method: str, beta: float | None, metric: str
) -> float:
    sel = (summary["group"] == group) & (summary["method"] == method)
    if beta is not None:
        sel &= np.isclose(summary["beta"].astype(float), beta)
    hit = summary.loc[sel, metric]
    return float(hit.iloc[0]) if len(hit) else math.nan


def beta_ablation(scores: pd.DataFrame, recipe: Recipe, *, metric: str = "acc") -> pd.DataFrame:
    """Paper Tables 3a/7: rows (Method, β) for every boosted method and every β on its
    validation grid; columns (group, val | test). ``val`` is the validation ``metric`` at
    the α chosen for that β (:func:`best_on_val` per β); ``test`` exists only at the β
    chosen on validation (the pipeline evaluates test there), other β are gaps.
    ``metric``: "acc" (absolute) or "norm" (normalised)."""
    methods = recipe.methods
    labels = method_labels(methods)
    boosted = [m for m, meth in methods.items() if meth.boosted]
    best = best_on_val(scores, recipe.eval.selection_metric, by=("group", "method", "beta"))
    test = grid_summary(scores, "test")
    order = group_order(scores, recipe.groups)
    data: dict[tuple[str, float], dict] = {}
    for m in boosted:
        betas = sorted(set(best.loc[best["method"] == m, "beta"].dropna().astype(float)))
        if not betas:
            log.warning("boosted method %r has no validation scores: not in the β ablation", m)
        for b in betas:
            data[(labels[m], b)] = {
                (g, split): _metric_at(best if split == "val" else test, g, m, b, metric)
                for g in order
                for split in ("val", "test")
            }
    return _frame(data, ["Method", "β"], [(g, s) for g in order for s in ("val", "test")])


def layer_ablation(scores: pd.DataFrame, recipe: Recipe, *, metric: str = "acc") -> pd.DataFrame:
    """Paper Table 3b: boosted methods that differ only in ``boost.layers`` (attn, mlp,
    both), rows (Method, Layers); columns (group, val | test) at the grid point chosen on
    validation. Empty when no such family is configured."""
    methods = recipe.methods
    families: dict[tuple, list[str]] = {}
    for m, meth in methods.items():
        if meth.boosted:
            b = meth.boost
            key = (meth.without_boost(), b.attn_mode, b.beta_attn, b.beta_mlp)
            families.setdefault(key, []).append(m)
    best = best_on_val(scores, recipe.eval.selection_metric)
    test = grid_summary(scores, "test")
    order = group_order(scores, recipe.groups)
    data: dict[tuple[str, str], dict] = {}
    for members in families.values():
        if len({methods[m].boost.layers for m in members}) < 2:
            continue
        first = methods[members[0]]
        family = auto_label(first.spec, first.lines is not None, True)
        for m in members:
            data[(family, methods[m].boost.layers)] = {
                (g, split): _metric_at(best if split == "val" else test, g, m, None, metric)
                for g in order
                for split in ("val", "test")
            }
    return _frame(data, ["Method", "Layers"], [(g, s) for g in order for s in ("val", "test")])


def _frame(data: Mapping, index_names: Sequence[str], columns: Sequence[tuple]) -> pd.DataFrame:
    index = (
        pd.MultiIndex.from_tuples(list(data), names=index_names)
        if data
        else pd.MultiIndex.from_tuples([], names=index_names)
    )
    cols = pd.MultiIndex.from_tuples(columns) if columns else pd.Index([])
    return pd.DataFrame([data[k] for k in data], index=index, columns=cols, dtype=object)


def per_task_accuracy(
    scores: pd.DataFrame, recipe: Recipe, *, group: str | None = None, split: str = "test"
) -> pd.DataFrame:
    """Appendix tables: rows tasks (+ "Average"), columns Zero-shot, Finetuned and the
    methods; accuracy in %. One group, or all groups with index (group, task) when
    ``group`` is None. The average is a gap where any task is missing."""
    methods = recipe.methods
    df = _prepare_scores(scores)
    tasks = _group_tasks(df)
    if group is not None and group not in tasks:
        raise ValueError(f"per_task_accuracy: group {group!r} not in scores (has {sorted(tasks)})")
    labels = method_labels(methods)
    sub = df.loc[df["split"] == split]
    blocks = []
    for g in ([group] if group is not None else group_order(df)):
        gsub = sub.loc[sub["group"] == g]
        ref = gsub.groupby("task", sort=False)[["zeroshot_accuracy", "expert_accuracy"]].mean()
        cols = {"Zero-shot": ref["zeroshot_accuracy"], "Finetuned": ref["expert_accuracy"]}
        for m in methods:
            cols[labels[m]] = (
                gsub.loc[gsub["method"] == m].groupby("task", sort=False)["accuracy"].mean()
            )
        block = pd.DataFrame(cols).reindex(tasks[g]) * 100.0
        block.loc["Average"] = block.mean(skipna=False)
        block.index = pd.MultiIndex.from_product([[g], block.index], names=["group", "task"])
        blocks.append(block)
    table = pd.concat(blocks) if blocks else pd.DataFrame()
    if group is not None:
        table.index = table.index.droplevel(0)
        table.index.name = "Task"
    return table


# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (then the normal 1.96)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_half_width(values: Sequence[float]) -> float:
    """Half-width of the two-sided 95% t-interval of the mean of ``values`` (n ≥ 2):
    ``t_{0.975, n-1} · s / √n`` with the sample standard deviation ``s``."""
    n = len(values)
    if n < 2:
        raise ValueError("a confidence interval needs at least two values")
    mean = math.fsum(values) / n
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return (_T975[n - 2] if n - 1 <= len(_T975) else 1.96) * sd / math.sqrt(n)


def expert_selection(selection: pd.DataFrame, recipe: Recipe | None = None, *,
                     split: str = "test") -> pd.DataFrame:
    """Paper Tables 5/10: rows Random / HO-GSVD (with the number of draws), columns
    (Pool | Ext | All, mean | std | ±95% CI): per draw the mean accuracy (%) over the task
    set's tasks, then mean, sample std and the half-width of the 95% t-interval of the mean
    over draws ("" for a single draw); with both settings a row "HO-GSVD − Random" (the
    difference of the means, with the random mean's CI: the HO-GSVD choice is one
    deterministic selection). The recipe is not needed (the registry's calling convention
    passes it)."""
    require_columns(selection, SELECTION_COLUMNS, "selection")
    sub = selection.loc[selection["split"] == split]
    per_draw = (
        sub.groupby(["setting", "draw", "task_set"], sort=False, dropna=False)["accuracy"]
        .mean()
        .mul(100.0)
        .reset_index()
    )
    sets = [s for s in TASK_SETS if s in set(per_draw["task_set"])]
    sets += sorted(set(per_draw["task_set"]) - set(sets))
    settings = [s for s in SELECTION_SETTINGS if s in set(per_draw["setting"])]
    settings += sorted(set(per_draw["setting"]) - set(settings))
    data = {}
    for s in settings:
        rows = per_draw.loc[per_draw["setting"] == s]
        n = rows["draw"].nunique(dropna=False)
        label = f"{SELECTION_SETTINGS.get(s, s)} ({n} draw{'s' if n != 1 else ''})"
        data[label] = {}
        for t in sets:
            vals = rows.loc[rows["task_set"] == t, "accuracy"]
            data[label][(TASK_SETS.get(t, t), "mean")] = (
                float(vals.mean()) if len(vals) else math.nan
            )
            data[label][(TASK_SETS.get(t, t), "std")] = (
                float(vals.std(ddof=1)) if len(vals) > 1 else (NA if len(vals) else math.nan)
            )
            data[label][(TASK_SETS.get(t, t), "±95% CI")] = (
                t_half_width(vals.tolist()) if len(vals) > 1 else (NA if len(vals) else math.nan)
            )
    if "hogsvd" in settings and "random" in settings:
        # the HO-GSVD choice minus the random mean; the CI is that of the random mean (the
        # HO-GSVD choice is one deterministic selection)
        rand = next(k for k in data if k.startswith(SELECTION_SETTINGS["random"]))
        hog = next(k for k in data if k.startswith(SELECTION_SETTINGS["hogsvd"]))
        diff = {}
        for t in sets:
            name = TASK_SETS.get(t, t)
            diff[(name, "mean")] = data[hog][(name, "mean")] - data[rand][(name, "mean")]
            diff[(name, "std")] = NA
            diff[(name, "±95% CI")] = data[rand][(name, "±95% CI")]
        data["HO-GSVD − Random"] = diff
    columns = [(TASK_SETS.get(t, t), stat) for t in sets for stat in ("mean", "std", "±95% CI")]
    table = pd.DataFrame.from_dict(data, orient="index", dtype=object)
    table = table.reindex(columns=pd.MultiIndex.from_tuples(columns) if columns else None)
    table.index.name = "Selection"
    return table


def timing_table(timing: pd.DataFrame, recipe: Recipe) -> pd.DataFrame:
    """Paper Table 6: rows methods (config order), columns (group, Time (s) | Max RSS (MB)),
    groups as in :func:`group_order` with the recipe's groups. Repeated benchmarks of one
    (method, group) are averaged. Rows of unconfigured methods are ignored."""
    require_columns(timing, TIMING_COLUMNS, "timing")
    methods = recipe.methods
    labels = method_labels(methods)
    known = timing.loc[timing["method"].isin(list(methods))]
    total = (
        known.groupby(["method", "group"], sort=False)[["seconds", "max_rss_mb"]]
        .mean()
        .reset_index()
    )
    order = group_order(timing, recipe.groups)
    data = {}
    for m in methods:
        data[labels[m]] = {}
        for g in order:
            data[labels[m]][(g, "Time (s)")] = _lookup(total, g, m, "seconds")
            data[labels[m]][(g, "Max RSS (MB)")] = _lookup(total, g, m, "max_rss_mb")
    cols = [(g, c) for g in order for c in ("Time (s)", "Max RSS (MB)")]
    table = pd.DataFrame.from_dict(data, orient="index", dtype=object)
    table = table.reindex(columns=pd.MultiIndex.from_tuples(cols) if cols else None)
    table.index.name = "Method"
    return table


# -------------------------------------------------------------------------------- writer


class Marked(float):
    """A number shown with a mark after it in Markdown and LaTeX (e.g. † for a chosen point on
    the edge of its grid); the CSV keeps the plain number."""

    mark: str = ""

    def __new__(cls, value: float, mark: str):
        obj = super().__new__(cls, value)
        obj.mark = mark
        return obj


def _is_gap(v: Any) -> bool:
    return v is None or v is pd.NA or (isinstance(v, (float, np.floating)) and math.isnan(v))


def _index_text(v: Any) -> str:
    """Index values: floats (β, α) with two decimals unless that would round them."""
    if isinstance(v, (float, np.floating)) and not _is_gap(v) and round(v, 2) != v:
        return f"{float(v):g}"
    return format_cell(v, 2, gap="")


def format_cell(v: Any, decimals: int, *, signed: bool = False, gap: str = GAP,
                marks: bool = True) -> str:
    """Deterministic text of one cell: fixed decimals, "+" for signed columns, no "-0.0",
    ``gap`` for NaN/None, strings as they are; a :class:`Marked` number with its mark
    (``marks``)."""
    if _is_gap(v):
        return gap
    if isinstance(v, Marked):
        return format_cell(float(v), decimals, signed=signed, gap=gap) + (v.mark if marks else "")
    if isinstance(v, (bool, np.bool_)) or isinstance(v, str):
        return str(v)
    if isinstance(v, (int, np.integer)):
        return f"{int(v):+d}" if signed else str(int(v))
    if isinstance(v, (float, np.floating)):
        text = f"{float(v):{'+' if signed else ''}.{decimals}f}"
        if float(text) == 0.0:  # no "-0.0"
            text = f"{0.0:{'+' if signed else ''}.{decimals}f}"
        return text
    return str(v)


def _leaf(col: Any) -> str:
    return str(col[-1] if isinstance(col, tuple) else col)


def _header(col: Any) -> str:
    parts = col if isinstance(col, tuple) else (col,)
    return " ".join(str(p) for p in parts if str(p) != "")


def _decimals_for(col: Any, decimals: int | Mapping[str, int]) -> int:
    if isinstance(decimals, Mapping):
        return int(decimals.get(_leaf(col), decimals.get("*", 1)))
    return int(decimals)


def _index_rows(df: pd.DataFrame, sparse: bool) -> tuple[list[str], list[list[str]]]:
    names = [str(n) if n is not None else "" for n in df.index.names]
    rows = []
    prev: tuple = ()
    for key in df.index:
        key = key if isinstance(key, tuple) else (key,)
        cells = [_index_text(k) for k in key]
        if sparse:
            # blank leading levels repeated from the previous row
            shown = []
            same = True
            for i, (k, c) in enumerate(zip(key, cells)):
                same = same and i < len(prev) and prev[i] == k and i < len(key) - 1
                shown.append("" if same else c)
            cells = shown
        rows.append(cells)
        prev = key
    return names, rows


def _cells(df: pd.DataFrame, decimals, gap: str, marks: bool = True) -> list[list[str]]:
    out = []
    for _, row in df.iterrows():
        out.append(
            [
                format_cell(v, _decimals_for(c, decimals), signed=_leaf(c).startswith("Δ"), gap=gap,
                            marks=marks)
                for c, v in zip(df.columns, row.tolist())
            ]
        )
    return out


def to_csv_text(df: pd.DataFrame) -> str:
    """CSV: index columns first, one header row (column levels joined by spaces), numbers
    with :data:`CSV_DECIMALS` decimals, gaps and n/a empty."""
    names, idx = _index_rows(df, sparse=False)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(names + [_header(c) for c in df.columns])
    for i, cells in zip(idx, _cells(df, CSV_DECIMALS, gap="", marks=False)):
        writer.writerow(i + cells)
    return buf.getvalue()


def _md_escape(text: str) -> str:
    return text.replace("|", r"\|")


def to_markdown(
    df: pd.DataFrame, decimals: int | Mapping[str, int] = 1, caption: str | None = None
) -> str:
    """GitHub Markdown table; gaps "—"."""
    names, idx = _index_rows(df, sparse=True)
    header = names + [_header(c) for c in df.columns]
    align = [":--"] * len(names) + ["--:"] * len(df.columns)
    lines = [f"**{caption}**", ""] if caption else []
    lines.append("| " + " | ".join(_md_escape(h) for h in header) + " |")
    lines.append("|" + "|".join(align) + "|")
    for i, cells in zip(idx, _cells(df, decimals, gap=GAP)):
        lines.append("| " + " | ".join(_md_escape(c) for c in i + cells) + " |")
    notes = df.attrs.get("notes") or []
    if notes:
        lines += [""] + [_md_escape(n) + "  " for n in notes]
    return "\n".join(lines) + "\n"


_TEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "Δ": r"$\Delta$",
    "±": r"$\pm$",
    "—": "---",
    "†": r"$\dagger$",
    "α": r"$\alpha$",
    "β": r"$\beta$",
    "γ": r"$\gamma$",
    "σ": r"$\sigma$",
}


def tex_escape(text: str) -> str:
    """Escape LaTeX specials; Greek letters, Δ and ± become math, "—" becomes ---."""
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in text)


def to_latex(
    df: pd.DataFrame,
    decimals: int | Mapping[str, int] = 1,
    caption: str | None = None,
    label: str | None = None,
) -> str:
    """booktabs tabular (\\toprule, \\midrule, \\bottomrule); two-level columns get a
    \\multicolumn header with \\cmidrule; gaps "---". Wrapped in a table environment
    when a caption or label is given."""
    names, idx = _index_rows(df, sparse=True)
    n_idx = len(names)
    spec = "l" * n_idx + "r" * len(df.columns)
    lines = [rf"\begin{{tabular}}{{{spec}}}", r"\toprule"]
    cols = list(df.columns)
    if isinstance(df.columns, pd.MultiIndex) and df.columns.nlevels >= 2 and cols:
        top, rules, start = [""] * n_idx, [], n_idx + 1
        i = 0
        while i < len(cols):
            j = i
            while j + 1 < len(cols) and cols[j + 1][0] == cols[i][0]:
                j += 1
            span = j - i + 1
            top.append(rf"\multicolumn{{{span}}}{{c}}{{{tex_escape(str(cols[i][0]))}}}")
            rules.append(rf"\cmidrule(lr){{{start + i}-{start + j}}}")
            i = j + 1
        lines.append(" & ".join(top) + r" \\")
        lines.append(" ".join(rules))
        leaf = [" ".join(str(p) for p in c[1:] if str(p) != "") for c in cols]
    else:
        leaf = [_header(c) for c in cols]
    lines.append(" & ".join(tex_escape(h) for h in names + leaf) + r" \\")
    lines.append(r"\midrule")
    for i, cells in zip(idx, _cells(df, decimals, gap=GAP)):
        lines.append(" & ".join(tex_escape(c) for c in i + cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    for note in df.attrs.get("notes") or []:
        lines.append(r"\par\footnotesize " + tex_escape(note))
    if caption or label:
        inner = [r"\begin{table}[t]", r"\centering"]
        if caption:
            inner.append(rf"\caption{{{tex_escape(caption)}}}")
        if label:
            inner.append(rf"\label{{{label}}}")
        lines = inner + lines + [r"\end{table}"]
    return "\n".join(lines) + "\n"


# the tables' look in the HTML report (scoped to the class, so that a table embedded in the
# report's landing page styles nothing else)
HTML_STYLE = """<style>
table.submerge-table { border-collapse: collapse; font: 13px/1.35 "DejaVu Sans", Arial, sans-serif;
  color: #111; background: #fff; margin: 0.4em 0 1em 0; }
table.submerge-table caption { caption-side: top; text-align: left; font-weight: bold;
  padding: 0 0 0.4em 0; color: #111; }
table.submerge-table th, table.submerge-table td { padding: 0.25em 0.7em; border: 0; }
table.submerge-table thead th { border-bottom: 1px solid #444; text-align: center; }
table.submerge-table thead tr:first-child th { border-top: 2px solid #111; }
table.submerge-table tbody tr:last-child th, table.submerge-table tbody tr:last-child td {
  border-bottom: 2px solid #111; }
table.submerge-table th.index { text-align: left; }
table.submerge-table tbody th { text-align: left; font-weight: normal; white-space: nowrap; }
table.submerge-table td { text-align: right; font-variant-numeric: tabular-nums; }
table.submerge-table tbody tr:nth-child(even) { background: #f3f4f6; }
</style>"""


def to_html(
    df: pd.DataFrame, decimals: int | Mapping[str, int] = 1, caption: str | None = None
) -> str:
    """An HTML fragment: :data:`HTML_STYLE` and one ``<table class="submerge-table">``, the
    cells as in Markdown (gaps "—"), column levels as header rows (a top level spanning its
    columns), index levels as row headers; text escaped. Shown inline by the HTML report."""
    from html import escape

    names, idx = _index_rows(df, sparse=True)
    cols = list(df.columns)
    lines = [HTML_STYLE, '<table class="submerge-table">']
    if caption:
        lines.append(f"<caption>{escape(caption)}</caption>")
    lines.append("<thead>")
    if isinstance(df.columns, pd.MultiIndex) and df.columns.nlevels >= 2 and cols:
        top = [f'<th class="index" rowspan="2">{escape(n)}</th>' for n in names]
        i = 0
        while i < len(cols):
            j = i
            while j + 1 < len(cols) and cols[j + 1][0] == cols[i][0]:
                j += 1
            top.append(f'<th colspan="{j - i + 1}">{escape(str(cols[i][0]))}</th>')
            i = j + 1
        lines.append("<tr>" + "".join(top) + "</tr>")
        leaf = [" ".join(str(p) for p in c[1:] if str(p) != "") for c in cols]
        lines.append("<tr>" + "".join(f"<th>{escape(h)}</th>" for h in leaf) + "</tr>")
    else:
        lines.append("<tr>" + "".join(f'<th class="index">{escape(n)}</th>' for n in names)
                     + "".join(f"<th>{escape(_header(c))}</th>" for c in cols) + "</tr>")
    lines.append("</thead>")
    lines.append("<tbody>")
    for i, cells in zip(idx, _cells(df, decimals, gap=GAP)):
        lines.append("<tr>" + "".join(f"<th>{escape(c)}</th>" for c in i)
                     + "".join(f"<td>{escape(c)}</td>" for c in cells) + "</tr>")
    lines += ["</tbody>", "</table>"]
    return "\n".join(lines) + "\n"


def write_table(
    df: pd.DataFrame,
    stem: str | os.PathLike,
    *,
    decimals: int | Mapping[str, int] = 1,
    caption: str | None = None,
    label: str | None = None,
) -> list[Path]:
    """Write ``df`` as ``<stem>.csv``, ``<stem>.md``, ``<stem>.tex`` and ``<stem>.html`` (an
    HTML fragment, :func:`to_html`; the HTML report's item) atomically and return the four
    paths, CSV first (pass them to ``provenance.write_sidecar``).

    ``decimals`` applies to Markdown, LaTeX and HTML (CSV keeps :data:`CSV_DECIMALS`); a mapping
    is keyed by the column's last level name ("*" = default). Columns whose last level
    starts with "Δ" are printed with a sign. NaN = gap ("—"), "" = not applicable.
    """
    stem = Path(stem)
    paths = [stem.with_name(stem.name + ext) for ext in (".csv", ".md", ".tex", ".html")]
    write_text_atomic(paths[0], to_csv_text(df))
    write_text_atomic(paths[1], to_markdown(df, decimals, caption))
    write_text_atomic(paths[2], to_latex(df, decimals, caption, label))
    write_text_atomic(paths[3], to_html(df, decimals, caption))
    log.info("wrote table %s.{csv,md,tex,html} (%d rows)", stem, len(df))
    return paths


# ------------------------------------------------------------------------ Table 8 (β per kind)


def kind_beta_grid(table8: pd.DataFrame, recipe: Recipe) -> pd.DataFrame:
    """Paper Table 8: rows (β MLP, β attn) of ``experiments.table8``
    (:func:`submerge.stages.beta_grid.run_table8`'s CSV), columns α (chosen on validation for
    the pair), the validation score (%), validation and test accuracy (%) at that α, and
    "chosen" (✓ for the pair chosen on validation). A chosen value on the edge of its list is
    marked † (:data:`submerge.recipe.EDGE_MARK`)."""
    from submerge.recipe import EDGE_MARK

    require_columns(table8, ("beta_attn", "beta_mlp", "alpha", "split", "task", "accuracy",
                             "val_score", "chosen", "edge"), "table8")
    if table8.empty:
        raise ValueError("table8 frame is empty: nothing to tabulate")
    data = {}
    edge_col = table8["edge"].fillna("").astype(str)
    for (mlp, attn), sub in table8.groupby(["beta_mlp", "beta_attn"], sort=True):
        test = sub.loc[sub["split"] == "test"]
        alpha = float(test["alpha"].iloc[0])
        val = sub.loc[(sub["split"] == "val") & np.isclose(sub["alpha"], alpha)]
        edges = set(filter(None, edge_col.loc[sub.index].iloc[0].split("+")))
        chosen = bool(str(sub["chosen"].iloc[0]).lower() == "true")
        data[(float(mlp), float(attn))] = {
            "α": f"{alpha:g}" + (EDGE_MARK if "alpha" in edges else ""),
            "val score": 100.0 * float(sub["val_score"].iloc[0]),
            "val": 100.0 * float(val["accuracy"].mean()),
            "test": 100.0 * float(test["accuracy"].mean()),
            "chosen": ("✓" + (EDGE_MARK if edges & {"beta_attn", "beta_mlp"} else ""))
            if chosen else NA,
        }
    frame = pd.DataFrame.from_dict(data, orient="index", dtype=object)
    frame.index = pd.MultiIndex.from_tuples(list(data), names=["β MLP", "β attn"])
    return frame
