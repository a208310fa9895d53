"""Stage 7 (``workflow/rules/export.smk``): the merged model of one (group, method) at the
(α, β) chosen on validation, in its source's own format (:mod:`submerge.export`), next to the
results: ``results/{suite}/export/{group}/{method}/``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping, Sequence

from submerge.io.jsonio import read_json
from submerge.recipe import GridPoint, Method, Suite
from submerge.stages.common import PathLike, load_base, merged_module, resolve_device
from submerge.stages.merge import point_delta, reconstruct

log = logging.getLogger(__name__)


def checkpoint_sha256(path: PathLike) -> str:
    """The sha256 of the checkpoint a normalised model came from (its sidecar's
    ``source_sha256``; for a model built here, the normalised file's own ``sha256``)."""
    meta = json.loads(Path(path).with_suffix(".json").read_text(encoding="utf-8"))
    return meta.get("source_sha256") or meta["sha256"]


def chosen_model(suite: Suite, method: Method, point: GridPoint, base_path: PathLike,
                 merged_path: PathLike, device: str = "auto"):
    """``(adapter, module)``: the merged model of ``point`` exactly as the sweep evaluates it
    (:class:`submerge.stages.evaluate.Sweep`: the merged cache on the device, Δ reconstructed at
    β, :func:`~submerge.stages.merge.point_delta` at α, θ = θ_base + coefficient·Δ), returned
    on the CPU."""
    from submerge.io import hdf5

    dev = resolve_device(device)
    dense, factors, layer_info, attrs = hdf5.read_factored(merged_path)
    dense = {k: v.to(dev) for k, v in dense.items()}
    factors = {k: [tuple(t.to(dev) for t in f) for f in fs] for k, fs in factors.items()}
    delta = reconstruct(dense, factors, layer_info, method, point.beta)
    del dense, factors
    delta, coefficient = point_delta(delta, layer_info, method, point.alpha,
                                     attrs.get("lines_scale"))
    adapter, module, _ = merged_module(suite, load_base(base_path, dev), delta, coefficient, dev)
    return adapter, module.cpu()


def _real_heads(experts: Sequence[str], head_paths: Sequence[PathLike]) -> dict[str, Path]:
    """The experts' classification heads (a text-to-text expert's empty head is left out)."""
    from safetensors import safe_open

    heads = {}
    for expert, path in zip(experts, head_paths):
        with safe_open(str(path), "pt") as f:
            if 0 not in f.get_slice("weight").get_shape():
                heads[expert] = Path(path)
    return heads


def export_model(suite: Suite, experts: Sequence[str], method: Method, group: str,
                 base_path: PathLike, merged_path: PathLike, test_path: PathLike,
                 grid_dir: PathLike, head_paths: Sequence[PathLike],
                 expert_paths: Sequence[PathLike], out: PathLike, device: str = "auto") -> None:
    """The merged model of (group, method) at the point its sweep chose on validation
    (``test_path``, :func:`submerge.stages.evaluate.run_sweep`), written to the directory
    ``out`` in the source's format with the heads, a model card (method, α, β, experts with
    their sha256, validation and test accuracy) and a provenance sidecar."""
    from submerge.export import ModelCard, write_export
    from submerge.io.atomic import sha256_file

    test = read_json(test_path)
    if test.get("group") != group or test.get("method") != method.name:
        raise ValueError(f"{test_path}: the test point of {test.get('group')}/{test.get('method')}, "
                         f"not of {group}/{method.name}; delete it and rerun (rule sweep)")
    point = GridPoint(test["alpha"], test["beta"])
    point_file = Path(grid_dir) / f"{point.name}.json"
    val = read_json(point_file)
    adapter, module = chosen_model(suite, method, point, base_path, merged_path, device)
    card = ModelCard(
        title=f"{method.label or method.name} merge of {len(experts)} experts ({suite.name}/{group})",
        method=method, alpha=point.alpha, beta=point.beta,
        experts={e: checkpoint_sha256(p) for e, p in zip(experts, expert_paths)},
        base_sha256=checkpoint_sha256(base_path),
        accuracy={"val": val["accuracy"], "test": test["accuracy"]},
        chosen=(f"on validation: best {test.get('selection_metric', 'normalized')} mean accuracy "
                f"({test['val_score']:.4f}) over the method's α × β grid"),
        extra={"suite / group": f"{suite.name} / {group}", "merged cache sha256":
               f"`{sha256_file(merged_path)}`"})
    heads = _real_heads(experts, head_paths)
    write_export(adapter, module, suite.arch, out, card, heads=heads,
                 inputs=[base_path, merged_path, test_path, point_file, *heads.values()])
    log.info("%s/%s: exported the model at %s to %s", group, method.name, point.name, out)
