"""Helpers shared by the stage modules: devices, checkpoint sources, task vectors, merged
models and their evaluation."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

import torch

from submerge.recipe import EvalSettings, Suite

log = logging.getLogger(__name__)

PathLike = str | os.PathLike


def cache_dir() -> Path:
    """Download cache: $SUBMERGE_CACHE or ~/.cache/submerge."""
    return Path(os.environ.get("SUBMERGE_CACHE", Path.home() / ".cache" / "submerge"))


def resolve_device(spec: str = "auto") -> torch.device:
    """The job's device (``auto``: CUDA when present), with deterministic CUDA settings."""
    from submerge.evaluate import resolve_device as _resolve

    device = _resolve(spec)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    log.info("device: %s%s", device,
             f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    return device


def load_source(spec: Mapping, what: str) -> tuple[dict, dict]:
    """Fetch and load a checkpoint source (``{"source": {...}, "trust_pickle": ...}``)."""
    from submerge.io.checkpoints import load_checkpoint, sha256_file
    from submerge.io.download import fetch

    source = spec["source"]
    pinned = source.get("sha256")
    path = fetch(source, cache_dir())  # verifies a pinned sha256
    trust = bool(spec.get("trust_pickle", False))
    # load_checkpoint only needs the pin to allow full pickle; fetch has checked it already
    raw = load_checkpoint(path, trust_pickle=trust, sha256=pinned if trust else None)
    log.info("%s: loaded %s (%d entries)", what, path, len(raw))
    digest = str(pinned).strip().lower() if pinned else sha256_file(path)
    # "source_*": the normalised file's sidecar keeps "sha256" for its own hash (save_normalized)
    return raw, {"source": dict(source), "source_sha256": digest, "source_file": str(path)}


def record_provenance(outputs: Sequence[PathLike], inputs: Sequence[PathLike]) -> None:
    """The provenance sidecar of ``outputs`` (``<first output>.json``: the sha256 of every
    input, with a pointer to the input's own sidecar, the code version, the command), so that
    ``submerge audit --chain`` follows a result down to the checkpoints."""
    from submerge.report.provenance import write_sidecar

    write_sidecar(list(outputs), inputs=list(inputs))


def load_base(base_path: PathLike, device: torch.device) -> dict:
    """The normalised base state dict on ``device`` (read once per job, reused per model)."""
    from submerge.io.checkpoints import load_normalized

    base, _ = load_normalized(base_path)
    return {k: v.to(device) for k, v in base.items()}


def open_task_vectors(tv_paths: Sequence[PathLike], device: torch.device | str = "cpu"):
    """The task vectors of ``tv_paths`` as a source the merge rules stream from, one parameter
    of every expert at a time (:class:`submerge.io.hdf5.TaskVectorFiles`; a context manager;
    its ``layer_info`` is the shared layer info)."""
    from submerge.io.hdf5 import TaskVectorFiles

    return TaskVectorFiles(tv_paths, device)


def merged_module(suite: Suite, base: Mapping, delta: Mapping, alpha: float,
                  device: torch.device, module: torch.nn.Module | None = None):
    """θ = θ_base + α·Δ loaded into a fresh tower module on ``device`` (``base`` from
    :func:`load_base`), or into ``module``, a tower this function built before (strict: every
    parameter and persistent buffer is overwritten; a random init costs seconds)."""
    from submerge.merging.task_vectors import apply_task_vector
    from submerge.models import get_adapter

    adapter = get_adapter(suite.adapter)
    theta = apply_task_vector(base, {k: v.to(base[k].dtype) for k, v in delta.items()}, alpha)
    if module is None:
        module = adapter.build(suite.arch)
    module.load_state_dict(theta)
    return adapter, module.to(device).eval(), theta


def load_tasks(suite: Suite, experts: Sequence[str], eval_data: Sequence[PathLike] = ()) -> list:
    """The evaluation task of each expert (built once per job, reused for every model), reading
    the prepared evaluation data files ``eval_data`` (rule eval_data) where given."""
    from submerge.evaluate import load_eval_task
    from submerge.stages.evaldata import attach_eval_data

    tasks = [load_eval_task(suite.view, e, root=suite.root) for e in experts]
    attach_eval_data(tasks, eval_data)
    return tasks


def evaluate_tasks(tasks: Sequence, adapter, module, split: str, settings: EvalSettings,
                   device) -> dict[str, float]:
    """Accuracy of ``module`` on the ``split`` of each task."""
    from submerge.evaluate import evaluate

    return evaluate(adapter, module, tasks, split, device=device, batch_size=settings.batch_size,
                    max_examples=settings.max_examples(split))


def evaluate_on(suite: Suite, experts: Sequence[str], adapter, module, split: str,
                settings: EvalSettings, device, eval_data: Sequence[PathLike] = ()
                ) -> dict[str, float]:
    """Accuracy of ``module`` on the ``split`` of each expert's task."""
    return evaluate_tasks(load_tasks(suite, experts, eval_data), adapter, module, split,
                          settings, device)
