"""Stage 4-5 (``workflow/rules/evaluate.smk``): the sweep of each (group, method) over its
(α, β) grid on validation with the test evaluation at the chosen point, reference accuracies,
the aggregated scores.csv."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Mapping, Sequence

from submerge.io.jsonio import read_json, write_json
from submerge.recipe import SCORE_DIGITS, EvalSettings, GridPoint, Method, Suite, choose_point
from submerge.stages.common import (PathLike, evaluate_on, evaluate_tasks, load_base, load_tasks,
                                    merged_module, record_provenance, resolve_device)
from submerge.stages.merge import point_delta, reconstruct

log = logging.getLogger(__name__)


class Sweep:
    """The validation grid of one (group, method) and its test point, evaluated in one process:
    the base, the merged cache and each task's evaluation data are loaded once (and only if a
    point is missing from the results cache), Δ is reconstructed per β (the polar factors of the
    boosted matrices kept for the next β, :class:`submerge.boosting.BoostFactors`; only the
    latest β's Δ is held, :func:`by_beta` orders the points) and α is applied as a scalar.
    Every point's result is kept in a content-addressed cache (:mod:`submerge.io.
    results_cache`) keyed by what determines it, so adding a point evaluates only that point
    and a rerun whose points are cached evaluates nothing."""

    def __init__(self, suite: Suite, experts: Sequence[str], method: Method, group: str,
                 base_path: PathLike, merged_path: PathLike, head_paths: Sequence[PathLike],
                 settings: EvalSettings, cache_dir: PathLike, eval_data: Sequence[PathLike] = ()):
        from submerge.fingerprint import code_fingerprint
        from submerge.io.atomic import sha256_file
        from submerge.io.results_cache import ResultsCache

        self.suite, self.experts, self.method, self.group = suite, list(experts), method, group
        self.base_path, self.merged_path, self.settings = base_path, merged_path, settings
        self.eval_data = list(eval_data)
        self.cache = ResultsCache(cache_dir)
        # what determines a point's accuracy, besides (α, β, split); not the device, batch size
        # or selection metric
        self.identity = {
            "base": sha256_file(base_path), "merged": sha256_file(merged_path),
            "heads": {e: sha256_file(h) for e, h in zip(self.experts, head_paths)},
            "suite": suite.view, "experts": self.experts,
            "boost": None if method.boost is None else method.boost.to_params(),
            "code": code_fingerprint(__name__),
        }
        if self.eval_data:  # prepared evaluation data (rule eval_data / eval_text): its content
            self.identity["eval_data"] = sorted(sha256_file(p) for p in self.eval_data)
        if method.lines is not None and method.lines.tunes_slope:  # α is LiNeS' β here
            self.identity["lines"] = method.lines.to_params()
        self.evaluated = 0  # points computed in this job (not served from the cache)
        self._code = None
        self._loaded = None
        # the latest Δ (keyed by its per-kind β) and the tower module, shared by share_loaded
        self._shared: dict = {"deltas": {}, "module": None}
        self.lines_scale = None  # LiNeS' scale from the merged cache (reference protocol)

    def share_loaded(self, other: "Sweep") -> None:
        """Use ``other``'s loaded base, merged cache and data (same group and merged cache;
        Table 8 evaluates several per-kind β variants of one method from one load)."""
        if (other.merged_path, other.experts) != (self.merged_path, self.experts):
            raise ValueError("share_loaded: sweeps of different merged caches or groups")
        self._loaded = other._load()
        self.lines_scale = other.lines_scale
        self._shared = other._shared

    def code(self) -> dict:
        """The code version that computes this job's evaluations (git commit, package hash)."""
        if self._code is None:
            from submerge.report.provenance import code_version

            self._code = code_version()
        return self._code

    def _what(self, point: GridPoint, split: str) -> dict:
        return {**self.identity, "alpha": point.alpha, "beta": point.beta, "split": split,
                "max_examples": self.settings.max_examples(split)}

    def _load(self):
        if self._loaded is None:
            device = resolve_device(self.settings.device)
            from submerge.boosting import BoostFactors
            from submerge.io import hdf5

            dense, factors, layer_info, attrs = hdf5.read_factored(self.merged_path)
            self.lines_scale = attrs.get("lines_scale")
            dense = {k: v.to(device) for k, v in dense.items()}
            factors = {k: BoostFactors(tuple(t.to(device) for t in f) for f in fs)
                       for k, fs in factors.items()}
            self._loaded = (device, load_base(self.base_path, device), dense, factors, layer_info,
                            load_tasks(self.suite, self.experts, self.eval_data))
        return self._loaded

    def delta(self, beta: float | None) -> dict:
        """Δ boosted at ``beta`` (the latest Δ is kept: one model, not one per β; keyed by the
        per-kind β it is boosted at, which is all that :func:`reconstruct` takes from the
        method)."""
        betas = self.method.boost.betas(beta) if self.method.boost is not None else {}
        key = tuple(sorted(betas.items()))
        deltas = self._shared["deltas"]
        if key not in deltas:
            _, _, dense, factors, layer_info, _ = self._load()
            deltas.clear()
            deltas[key] = reconstruct(dense, factors, layer_info, self.method, beta)
        return deltas[key]

    def model(self, point: GridPoint):
        """``(adapter, module, θ)`` of ``point``. The tower is built once (a random init of
        seconds) and each later call loads the point's θ into it (strict: every parameter and
        persistent buffer is overwritten), so a module returned earlier (by this sweep or one
        that shares its load) then holds the latest point's weights."""
        device, base, _, _, layer_info, _ = self._load()
        delta, coefficient = point_delta(self.delta(point.beta), layer_info, self.method,
                                         point.alpha, self.lines_scale)
        adapter, module, theta = merged_module(self.suite, base, delta, coefficient, device,
                                               self._shared["module"])
        self._shared["module"] = module
        return adapter, module, theta

    def accuracy(self, point: GridPoint, split: str) -> dict:
        """``{"accuracy": {task: acc}, "device": ...}`` of ``point`` on ``split``, from the
        cache or evaluated now."""
        from submerge.io.results_cache import result_key

        what = self._what(point, split)
        key = result_key(what)
        result = self.cache.get(key)
        if result is None:
            device, _, _, _, _, tasks = self._load()
            adapter, module, _ = self.model(point)
            accuracy = evaluate_tasks(tasks, adapter, module, split, self.settings, device)
            result = {"accuracy": accuracy, "device": str(device), "code": self.code()}
            self.cache.put(key, what, result)
            self.evaluated += 1
            log.info("%s/%s %s %s: mean accuracy %.4f", self.group, self.method.name, point.name,
                     split, sum(accuracy.values()) / len(accuracy))
        return result

    def point_record(self, point: GridPoint, split: str, result: Mapping) -> dict:
        return {"group": self.group, "method": self.method.name, "alpha": point.alpha,
                "beta": point.beta, "split": split, "device": result["device"],
                "accuracy": result["accuracy"], "code": result.get("code")}


def by_beta(points: Sequence[GridPoint]) -> list[int]:
    """The indices of ``points`` grouped by β (no boosting first, then β ascending; stable
    within a β), the order in which :class:`Sweep` builds each β's Δ once."""
    return sorted(range(len(points)),
                  key=lambda i: (points[i].beta is not None, points[i].beta or 0.0))


def run_sweep_part(suite: Suite, experts: Sequence[str], method: Method, group: str,
                   points: Sequence[GridPoint], base_path: PathLike, merged_path: PathLike,
                   head_paths: Sequence[PathLike], out: PathLike, settings: EvalSettings,
                   cache_dir: PathLike, eval_data: Sequence[PathLike] = ()) -> None:
    """A chunk of a grid on validation, into the results cache (``out``: what it holds)."""
    sweep = Sweep(suite, experts, method, group, base_path, merged_path, head_paths, settings,
                  cache_dir, eval_data)
    results = {i: sweep.accuracy(points[i], "val") for i in by_beta(points)}
    records = [sweep.point_record(p, "val", results[i]) for i, p in enumerate(points)]
    log.info("%s/%s: %d of %d points evaluated, the rest cached", group, method.name,
             sweep.evaluated, len(points))
    write_json(out, {"points": records, "evaluated": sweep.evaluated})


def run_sweep(suite: Suite, experts: Sequence[str], method: Method, group: str,
              points: Sequence[GridPoint], base_path: PathLike, merged_path: PathLike,
              head_paths: Sequence[PathLike], reference_paths: Sequence[PathLike],
              grid_dir: PathLike, test_out: PathLike, settings: EvalSettings,
              cache_dir: PathLike, save_merged: bool = False,
              eval_data: Sequence[PathLike] = ()) -> None:
    """Every (α, β) of one (group, method) on validation (``grid_dir/<point>.json``, one file
    per point), the point chosen on validation (:func:`submerge.recipe.choose_point`) and its
    test accuracy (``test_out``). ``eval_data``: the prepared evaluation data (rule eval_data)."""
    sweep = Sweep(suite, experts, method, group, base_path, merged_path, head_paths, settings,
                  cache_dir, eval_data)
    grid_dir = Path(grid_dir)
    grid_dir.mkdir(parents=True, exist_ok=True)
    accuracies = {}
    for i in by_beta(points):  # each β's Δ built once
        point = points[i]
        result = sweep.accuracy(point, "val")
        accuracies[i] = result["accuracy"]
        write_json(grid_dir / f"{point.name}.json", sweep.point_record(point, "val", result))
        if save_merged:
            from submerge.io.checkpoints import save_normalized

            _, _, theta = sweep.model(point)
            # <name>.model.safetensors: its sidecar (<name>.model.json) must not overwrite the
            # point's record <name>.json (it did, as <name>.safetensors)
            save_normalized({k: v.cpu() for k, v in theta.items()},
                            grid_dir / f"{point.name}.model.safetensors",
                            {"group": group, "method": method.name, "alpha": point.alpha,
                             "beta": point.beta})
    results = [(point, accuracies[i]) for i, point in enumerate(points)]  # in the order of points
    point_files = [grid_dir / f"{point.name}.json" for point in points]
    refs = read_references(reference_paths)
    best, score = choose_point(results, expert_val_accuracy(refs), settings.selection_metric,
                               where=f"{group}/{method.name}")
    test = sweep.accuracy(best, "test")
    write_json(test_out, {**sweep.point_record(best, "test", test), "val_score": score,
                          "selection_metric": settings.selection_metric})
    inputs = [base_path, merged_path, *head_paths, *reference_paths]
    record_provenance(point_files, inputs)
    record_provenance([test_out], inputs)
    log.info("%s/%s: %d of %d evaluations computed, the rest cached; chosen %s",
             group, method.name, sweep.evaluated, len(points) + 1, best.name)


def run_reference(suite: Suite, expert: str, base_path: PathLike, expert_path: PathLike,
                  out: PathLike, settings: EvalSettings, eval_data: Sequence[PathLike] = ()
                  ) -> None:
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
            acc = evaluate_on(suite, [expert], adapter, module, split, settings, device,
                              eval_data)
            result.setdefault(split, {})[name] = acc[expert]
    write_json(out, result)


def read_references(reference_paths: Sequence[PathLike]) -> dict[str, dict]:
    return {r["expert"]: r for r in map(read_json, reference_paths)}


def expert_val_accuracy(references: Mapping[str, Mapping]) -> dict[str, float]:
    """Each expert's own validation accuracy (the normaliser of the validation score)."""
    return {task: ref["val"]["expert"] for task, ref in references.items()}


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
    record_provenance([out], [*grid_paths, *test_paths, *reference_paths])
