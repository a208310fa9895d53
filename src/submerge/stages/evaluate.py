"""Stage 4-5 (``workflow/rules/evaluate.smk``): grid points on validation, reference
accuracies, the test evaluation at the point chosen on validation, the aggregated scores.csv,
and the expert-selection experiment."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Mapping, Sequence

from submerge.io.jsonio import read_json, write_json
from submerge.recipe import (SCORE_DIGITS, EvalSettings, GridPoint, Method, SelectionExperiment,
                             Suite, choose_point)
from submerge.stages.common import (PathLike, evaluate_on, load_base, load_task_vectors,
                                    merged_module, resolve_device)
from submerge.stages.merge import boost_factors, merged_delta, merged_task_vector, reconstruct

log = logging.getLogger(__name__)


def run_grid_point(suite: Suite, experts: Sequence[str], method: Method, group: str,
                   base_path: PathLike, merged_path: PathLike, point: GridPoint, out: PathLike,
                   settings: EvalSettings, save_merged: bool = False) -> None:
    """Reconstruct θ = θ_base + α·boost_β(Δ_merge) from the cache; validation accuracy per task."""
    device = resolve_device(settings.device)
    delta = merged_delta(merged_path, method, point.beta, device)
    base = load_base(base_path, device)
    adapter, module, theta = merged_module(suite, base, delta, point.alpha, device)
    accuracy = evaluate_on(suite, experts, adapter, module, "val", settings, device)
    if save_merged:
        from submerge.io.checkpoints import save_normalized

        save_normalized({k: v.cpu() for k, v in theta.items()},
                        Path(out).with_suffix(".safetensors"),
                        {"group": group, "method": method.name, "alpha": point.alpha,
                         "beta": point.beta})
    write_json(out, {"group": group, "method": method.name, "alpha": point.alpha,
                     "beta": point.beta, "split": "val", "device": str(device),
                     "accuracy": accuracy})
    log.info("%s/%s %s: mean val accuracy %.4f", group, method.name, point.name,
             sum(accuracy.values()) / len(accuracy))


def run_reference(suite: Suite, expert: str, base_path: PathLike, expert_path: PathLike,
                  out: PathLike, settings: EvalSettings) -> None:
    """Accuracy of the expert itself and of the base (zero-shot) with the expert's head."""
    from submerge.io.checkpoints import load_normalized
    from submerge.models import get_adapter

    device = resolve_device(settings.device)
    adapter = get_adapter(suite.adapter)
    result = {"expert": expert, "device": str(device)}
    for name, path in (("expert", expert_path), ("zeroshot", base_path)):
        sd, _ = load_normalized(path)
        module = adapter.build(suite.arch)
        module.load_state_dict(sd)
        module = module.to(device).eval()
        for split in ("val", "test"):
            acc = evaluate_on(suite, [expert], adapter, module, split, settings, device)
            result.setdefault(split, {})[name] = acc[expert]
    write_json(out, result)


def read_references(reference_paths: Sequence[PathLike]) -> dict[str, dict]:
    return {r["expert"]: r for r in map(read_json, reference_paths)}


def expert_val_accuracy(references: Mapping[str, Mapping]) -> dict[str, float]:
    """Each expert's own validation accuracy (the normaliser of the validation score)."""
    return {task: ref["val"]["expert"] for task, ref in references.items()}


def choose_from_files(grid_paths: Sequence[PathLike], references: Mapping[str, Mapping],
                      metric: str) -> tuple[GridPoint, float]:
    """The point chosen on validation among the grid files of one (group, method)."""
    points = []
    for path in grid_paths:
        p = read_json(path)
        points.append((GridPoint(p["alpha"], p["beta"]), p["accuracy"]))
    return choose_point(points, expert_val_accuracy(references), metric)


def run_test_point(suite: Suite, experts: Sequence[str], method: Method, group: str,
                   grid_paths: Sequence[PathLike], reference_paths: Sequence[PathLike],
                   base_path: PathLike, merged_path: PathLike, out: PathLike,
                   settings: EvalSettings) -> None:
    """Choose (α, β) on validation, evaluate that point on the test split."""
    refs = read_references(reference_paths)
    best, score = choose_from_files(grid_paths, refs, settings.selection_metric)
    device = resolve_device(settings.device)
    delta = merged_delta(merged_path, method, best.beta, device)
    base = load_base(base_path, device)
    adapter, module, _ = merged_module(suite, base, delta, best.alpha, device)
    accuracy = evaluate_on(suite, experts, adapter, module, "test", settings, device)
    write_json(out, {"group": group, "method": method.name, "alpha": best.alpha,
                     "beta": best.beta, "split": "test", "device": str(device),
                     "val_score": score, "selection_metric": settings.selection_metric,
                     "accuracy": accuracy})


def aggregate_scores(suite_name: str, groups: Mapping[str, Sequence[str]],
                     grid_paths: Sequence[PathLike], test_paths: Sequence[PathLike],
                     reference_paths: Sequence[PathLike], out: PathLike) -> None:
    """One row per (group, method, α, β, split, task) with the reference accuracies."""
    import pandas as pd

    from submerge.io.atomic import atomic_path

    refs = read_references(reference_paths)
    rows = []
    for path in list(grid_paths) + list(test_paths):
        point = read_json(path)
        for task, acc in point["accuracy"].items():
            ref = refs[task][point["split"]]
            rows.append({
                "suite": suite_name, "group": point["group"],
                "n_experts": len(groups[point["group"]]), "method": point["method"],
                "alpha": point["alpha"],
                "beta": math.nan if point["beta"] is None else point["beta"],
                "split": point["split"], "task": task, "accuracy": acc,
                "expert_accuracy": ref["expert"], "zeroshot_accuracy": ref["zeroshot"],
            })
    frame = pd.DataFrame(rows).sort_values(
        ["group", "method", "split", "alpha", "beta", "task"], na_position="first")
    with atomic_path(out) as tmp:
        frame.to_csv(tmp, index=False, float_format=f"%.{SCORE_DIGITS}g")


def run_selection(suite: Suite, universe: Sequence[str], experiment: SelectionExperiment,
                  method: Method, alphas: Sequence[float], betas: Sequence[float | None],
                  hogsvd_path: PathLike, tv_paths: Sequence[PathLike],
                  reference_paths: Sequence[PathLike], base_path: PathLike, out: PathLike,
                  settings: EvalSettings) -> None:
    """Expert selection (paper Tables 5 and 10): ``n_select`` candidates chosen to minimise
    interference with the pre-selected pool (the HO-GSVD Alignment Matrix) vs random draws.
    Each selection is merged with ``method`` (α, β chosen among ``alphas`` × ``betas`` on the
    merged tasks' validation splits) and evaluated on the test split of every expert of the universe."""
    import pandas as pd

    from submerge.hogsvd import alignment_matrix, random_selection, select_experts
    from submerge.io.atomic import atomic_path
    from submerge.io.hogsvd_cache import read_hogsvd_cache

    cache = read_hogsvd_cache(hogsvd_path)
    if list(cache.experts) != list(universe):
        raise ValueError(f"{hogsvd_path}: experts {cache.experts} differ from the universe "
                         f"{list(universe)}; delete it and rerun (rule hogsvd)")
    align = alignment_matrix([e.sigma for e in cache.entries])
    index = {e: i for i, e in enumerate(universe)}
    pool = [index[e] for e in experiment.pool]
    ext = set(experiment.ext)
    candidates = [index[e] for e in universe if e not in ext and index[e] not in pool]
    k = experiment.n_select
    chosen = select_experts(align, pool, candidates, k, strategy=experiment.strategy)
    settings_list = [("hogsvd", 0, chosen)] + [
        ("random", d, draw) for d, draw in enumerate(random_selection(
            candidates, k, experiment.draws, experiment.seed))]
    refs = read_references(reference_paths)
    device = resolve_device(settings.device)
    all_tvs, layer_info = load_task_vectors(tv_paths, device)
    base = load_base(base_path, device)
    rows = []
    for setting, draw, picked in settings_list:
        members = [universe[i] for i in pool + list(picked)]
        tvs = [all_tvs[index[e]] for e in members]
        delta_fn = _selection_merger(method, tvs, layer_info)
        grid = []
        for beta in betas:
            delta = delta_fn(beta)
            for alpha in alphas:
                adapter, module, _ = merged_module(suite, base, delta, alpha, device)
                acc = evaluate_on(suite, members, adapter, module, "val", settings, device)
                grid.append((GridPoint(alpha, beta), acc))
        best, _ = choose_point(grid, expert_val_accuracy(refs), settings.selection_metric)
        adapter, module, _ = merged_module(suite, base, delta_fn(best.beta), best.alpha, device)
        test = evaluate_on(suite, list(universe), adapter, module, "test", settings, device)
        for task, acc in test.items():
            sets = ["all"] + (["pool"] if task in experiment.pool else
                              ["ext"] if task in ext else [])
            for task_set in sets:
                rows.append({"setting": setting, "draw": draw, "method": method.name,
                             "experts": "+".join(members), "alpha": best.alpha,
                             "beta": math.nan if best.beta is None else best.beta,
                             "split": "test", "task": task, "task_set": task_set,
                             "accuracy": acc, "expert_accuracy": refs[task]["test"]["expert"]})
        log.info("%s draw %d: %s", setting, draw, members)
    with atomic_path(out) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False, float_format=f"%.{SCORE_DIGITS}g")


def _selection_merger(method: Method, tvs, layer_info):
    """β -> Δ for one selection: merge (+ LiNeS) once, SVD once, boost per β."""
    delta, _ = merged_task_vector(method, tvs, layer_info)
    factors = boost_factors(method, delta, layer_info)
    dense = {k: v for k, v in delta.items() if k not in factors}
    return lambda beta: reconstruct(dense, factors, layer_info, method, beta)
