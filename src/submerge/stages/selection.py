"""The expert-selection experiment (``workflow/rules/selection.smk``, paper Tables 5 and 10):
candidates chosen next to a pool by the HO-GSVD Alignment Matrix vs random draws, each selection
merged, its (α, β) chosen on validation, scored on test."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

from submerge.recipe import (SCORE_DIGITS, EvalSettings, GridPoint, Method, SelectionExperiment,
                             Suite, choose_point)
from submerge.stages.common import (PathLike, evaluate_on, load_base, open_task_vectors,
                                    merged_module, record_provenance, resolve_device)
from submerge.stages.evaluate import expert_val_accuracy, read_references
from submerge.stages.merge import boost_factors, merged_task_vector, point_delta, reconstruct

log = logging.getLogger(__name__)


def picked_experts(universe: Sequence[str], experiment: SelectionExperiment, run: str,
                   hogsvd_path: PathLike) -> list[str]:
    """The experts one run merges: the pool plus ``n_select`` candidates, chosen by the HO-GSVD
    Alignment Matrix (run ``hogsvd-0``) or drawn at random (run ``random-<d>``, seeded)."""
    from submerge.hogsvd import alignment_matrix, random_selection, select_experts
    from submerge.io.hogsvd_cache import read_hogsvd_cache

    index = {e: i for i, e in enumerate(universe)}
    pool = [index[e] for e in experiment.pool]
    candidates = [index[e] for e in universe if e not in experiment.ext and index[e] not in pool]
    setting, draw = experiment.parse_run(run)
    if setting == "hogsvd":
        cache = read_hogsvd_cache(hogsvd_path)
        if list(cache.experts) != list(universe):
            raise ValueError(f"{hogsvd_path}: experts {cache.experts} differ from the universe "
                             f"{list(universe)}; delete it and rerun (rule hogsvd)")
        align = alignment_matrix([e.sigma for e in cache.entries])
        picked = select_experts(align, pool, candidates, experiment.n_select,
                                strategy=experiment.strategy,
                                within_weight=experiment.within_weight)
    else:
        picked = random_selection(candidates, experiment.n_select, experiment.draws,
                                  experiment.seed)[draw]
    return [universe[i] for i in pool + list(picked)]


def run_selection_draw(suite: Suite, universe: Sequence[str], experiment: SelectionExperiment,
                       method: Method, alphas: Sequence[float], betas: Sequence[float | None],
                       run: str, hogsvd_path: PathLike, tv_paths: Sequence[PathLike],
                       reference_paths: Sequence[PathLike], base_path: PathLike, out: PathLike,
                       settings: EvalSettings, eval_data: Sequence[PathLike] = ()) -> None:
    """One run of the expert-selection experiment (paper Tables 5 and 10): the pool plus
    ``n_select`` candidates (:func:`picked_experts`), merged with ``method`` (α, β chosen among
    ``alphas`` × ``betas`` on the merged tasks' validation splits), evaluated on the test split
    of every expert of the universe. One job per run, so that each fits a cluster's time limit
    on ViT-L/14 (:func:`aggregate_selection` collects them)."""
    import pandas as pd

    from submerge.io.atomic import atomic_path

    setting, draw = experiment.parse_run(run)
    members = picked_experts(universe, experiment, run, hogsvd_path)
    paths = dict(zip(universe, tv_paths))
    refs = read_references(reference_paths)
    device = resolve_device(settings.device)
    with open_task_vectors([paths[e] for e in members], device) as source:  # streamed, as the merge stage
        layer_info = source.layer_info
        delta_fn, lines_scale = _selection_merger(method, source, layer_info)
    base = load_base(base_path, device)

    def model(point: GridPoint, delta):
        d, coefficient = point_delta(delta, layer_info, method, point.alpha, lines_scale)
        return merged_module(suite, base, d, coefficient, device)

    grid = []
    for beta in betas:
        delta = delta_fn(beta)
        for alpha in alphas:
            adapter, module, _ = model(GridPoint(alpha, beta), delta)
            acc = evaluate_on(suite, members, adapter, module, "val", settings, device,
                              eval_data)
            grid.append((GridPoint(alpha, beta), acc))
    best, _ = choose_point(grid, expert_val_accuracy(refs), settings.selection_metric,
                           where=f"selection {run}")
    adapter, module, _ = model(best, delta_fn(best.beta))
    test = evaluate_on(suite, list(universe), adapter, module, "test", settings, device,
                       eval_data)
    rows = []
    for task, acc in test.items():
        sets = ["all"] + (["pool"] if task in experiment.pool else
                          ["ext"] if task in experiment.ext else [])
        for task_set in sets:
            rows.append({"setting": setting, "draw": draw, "method": method.name,
                         "experts": "+".join(members), "alpha": best.alpha,
                         "beta": math.nan if best.beta is None else best.beta,
                         "split": "test", "task": task, "task_set": task_set,
                         "accuracy": acc, "expert_accuracy": refs[task]["test"]["expert"]})
    log.info("%s draw %d: %s", setting, draw, members)
    with atomic_path(out) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False, float_format=f"%.{SCORE_DIGITS}g")
    record_provenance([out], [hogsvd_path, base_path, *[paths[e] for e in members],
                              *reference_paths])


def aggregate_selection(run_paths: Sequence[PathLike], out: PathLike) -> None:
    """The runs' rows in one CSV, in the order given (the header once)."""
    from submerge.io.atomic import write_text_atomic

    texts = [Path(p).read_text(encoding="utf-8").splitlines(keepends=True) for p in run_paths]
    write_text_atomic(out, "".join(texts[0][:1] + [line for t in texts for line in t[1:]]))
    record_provenance([out], list(run_paths))


def _selection_merger(method: Method, tvs, layer_info):
    """β -> Δ for one selection: merge (+ LiNeS) once, SVD once, boost per β; and LiNeS' scale
    where the reference protocol applies LiNeS per grid point (:func:`point_delta`)."""
    delta, attrs = merged_task_vector(method, tvs, layer_info)
    factors = boost_factors(method, delta, layer_info)
    dense = {k: v for k, v in delta.items() if k not in factors}
    return (lambda beta: reconstruct(dense, factors, layer_info, method, beta)), attrs.get("lines_scale")
