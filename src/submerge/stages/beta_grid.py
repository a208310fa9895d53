"""Paper Table 8 (``workflow/rules/table8.smk``): a β_attn × β_mlp grid of one boosted method
on one group. The method's merged cache holds the SVD factors of every boosted matrix (one SVD
per matrix, rule ``merged``); each (β_attn, β_mlp) only moves the cutoff of the attention and
MLP matrices and rebuilds them (:func:`submerge.stages.merge.reconstruct`), so the grid costs
no SVD. Each pair's α is chosen on validation, the pair with the best validation score is the
one chosen, and every pair is evaluated on test at its α (the paper's table lists every pair)."""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Mapping, Sequence

from submerge.recipe import (SCORE_DIGITS, EvalSettings, GridPoint, Method, Suite,
                             Table8Experiment, choose_point, grid_edges)
from submerge.stages.common import PathLike, record_provenance

log = logging.getLogger(__name__)

COLUMNS = ("group", "method", "beta_attn", "beta_mlp", "alpha", "split", "task", "accuracy",
           "expert_accuracy", "val_score", "chosen", "edge")


def kind_beta_method(method: Method, beta_attn: float, beta_mlp: float) -> Method:
    """``method`` with both kinds' β fixed (``boost.beta_attn`` / ``beta_mlp``)."""
    if method.boost is None:
        raise ValueError(f"method {method.name!r} is not boosted: no β per layer kind")
    boost = dataclasses.replace(method.boost, beta_attn=float(beta_attn), beta_mlp=float(beta_mlp))
    return dataclasses.replace(method, boost=boost)


def kind_beta_deltas(delta: Mapping, layer_info: Mapping, method: Method,
                     pairs: Sequence[tuple[float, float]]) -> dict[tuple[float, float], dict]:
    """Δ boosted at every (β_attn, β_mlp) of ``pairs`` from one SVD per boosted matrix (block):
    the factors are computed once (:func:`submerge.stages.merge.boost_factors`) and only the
    cutoff changes with β. Equals ``subspace_boost(delta, beta={"attn": β_attn, "mlp": β_mlp})``
    for each pair (up to rounding)."""
    from submerge.stages.merge import boost_factors, reconstruct

    factors = boost_factors(method, delta, layer_info)
    dense = {k: v for k, v in delta.items() if k not in factors}
    return {(a, m): reconstruct(dense, factors, layer_info, kind_beta_method(method, a, m), 0.0)
            for a, m in pairs}


def choose_pair(per_pair: Mapping[tuple[float, float], tuple[GridPoint, float]]
                ) -> tuple[float, float]:
    """The (β_attn, β_mlp) with the highest validation score (each at its chosen α); ties go
    to the smaller β_mlp, then the smaller β_attn. A pair on the edge of the β lists is logged
    (β = 0 is the end of the domain, not an edge)."""
    best = min(per_pair, key=lambda p: (-per_pair[p][1] if per_pair[p][1] == per_pair[p][1]
                                        else math.inf, p[1], p[0]))
    edges = grid_edges(GridPoint(best[0], best[1]), (GridPoint(a, m) for a, m in per_pair))
    if edges:
        names = {"alpha": "β_attn", "beta": "β_mlp"}
        log.warning("table8: chosen pair β_attn=%g, β_mlp=%g is on the edge of its grid (%s)",
                    best[0], best[1], ", ".join(names[e] for e in edges))
    return best


def run_table8(suite: Suite, experts: Sequence[str], method: Method,
               experiment: Table8Experiment, base_path: PathLike, merged_path: PathLike,
               head_paths: Sequence[PathLike], reference_paths: Sequence[PathLike],
               out: PathLike, settings: EvalSettings, cache_dir: PathLike,
               eval_data: Sequence[PathLike] = ()) -> None:
    """The Table 8 grid (see the module docstring) into ``out`` (CSV, :data:`COLUMNS`): every
    validation point, and the test accuracy of every pair at its α chosen on validation;
    ``chosen`` marks the pair chosen on validation, ``edge`` the axes on which a chosen α or
    pair sits at the edge of its list."""
    import pandas as pd

    from submerge.io.atomic import atomic_path
    from submerge.stages.evaluate import Sweep, expert_val_accuracy, read_references

    refs = read_references(reference_paths)
    expert_val = expert_val_accuracy(refs)
    group = experiment.group
    sweeps: dict[tuple[float, float], Sweep] = {}
    for pair in experiment.pairs():
        sweep = Sweep(suite, experts, kind_beta_method(method, *pair), group, base_path,
                      merged_path, head_paths, settings, cache_dir, eval_data)
        if sweeps:  # base, merged cache and data loaded once for the whole grid
            sweep.share_loaded(next(iter(sweeps.values())))
        sweeps[pair] = sweep
    rows, per_pair, val = [], {}, {}
    for pair, sweep in sweeps.items():
        # β = 0.0 stands for "the method's per-kind β" (both fixed by kind_beta_method)
        points = [(GridPoint(a, 0.0), sweep.accuracy(GridPoint(a, 0.0), "val")["accuracy"])
                  for a in experiment.alphas]
        val[pair] = points
        per_pair[pair] = choose_point(points, expert_val, settings.selection_metric,
                                      where=f"table8 β_attn={pair[0]:g} β_mlp={pair[1]:g}")
    chosen = choose_pair(per_pair)
    for pair, sweep in sweeps.items():
        best, score = per_pair[pair]
        edge = list(grid_edges(best, (p for p, _ in val[pair])))
        if pair == chosen:
            edge += [{"alpha": "beta_attn", "beta": "beta_mlp"}[e] for e in grid_edges(
                GridPoint(*pair), (GridPoint(*p) for p in sweeps))]
        common = {"group": group, "method": method.name, "beta_attn": pair[0],
                  "beta_mlp": pair[1], "val_score": score, "chosen": pair == chosen,
                  "edge": "+".join(edge)}
        for point, accuracy in val[pair]:
            rows += [{**common, "alpha": point.alpha, "split": "val", "task": t, "accuracy": acc,
                      "expert_accuracy": refs[t]["val"]["expert"]} for t, acc in accuracy.items()]
        test = sweep.accuracy(best, "test")["accuracy"]
        rows += [{**common, "alpha": best.alpha, "split": "test", "task": t, "accuracy": acc,
                  "expert_accuracy": refs[t]["test"]["expert"]} for t, acc in test.items()]
    evaluated = sum(s.evaluated for s in sweeps.values())
    log.info("table8 %s/%s: %d pairs x %d α, %d evaluations computed, the rest cached; "
             "chosen β_attn=%g β_mlp=%g", group, method.name, len(sweeps), len(experiment.alphas),
             evaluated, *chosen)
    with atomic_path(out) as tmp:
        pd.DataFrame(rows, columns=list(COLUMNS)).to_csv(tmp, index=False,
                                                         float_format=f"%.{SCORE_DIGITS}g")
    record_provenance([out], [base_path, merged_path, *head_paths, *reference_paths])
