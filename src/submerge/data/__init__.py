"""Evaluation tasks and classification heads.

An evaluation task (:class:`EvalTask`) measures the top-1 accuracy of an encoder on one
expert's task; :func:`load_eval_task` builds the right one from a suite config:

* ``{"build": "digits", "task": ...}``  → :class:`submerge.suites.digits.DigitsTask`
* ``{"dataset": {...}}``                 → :class:`submerge.data.vision.VisionTask`
* ``{"dataset": {..., "kind": "text"}}`` → :class:`submerge.data.language.LanguageTask`

Classification heads live at ``{root}/heads/{expert}.safetensors`` (tensors ``weight``
(C×d) and optional ``bias`` (C,)) with a JSON sidecar ``{expert}.json`` holding
``{"normalize": bool, "logit_scale": float, "classes": [...]}``; the logits are
``logit_scale · normalize?(features) @ weightᵀ + bias`` (:func:`head_logits`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Protocol, runtime_checkable

import torch

from submerge.errors import CheckpointError, ConfigError


@runtime_checkable
class EvalTask(Protocol):
    """One expert's evaluation task."""

    name: str

    def accuracy(self, adapter, module, split: str, *, device="cpu", batch_size: int = 256,
                 max_examples: int | None = None) -> float:
        """Top-1 accuracy in [0, 1] of ``module`` (encoded through ``adapter``) on ``split``.

        ``max_examples`` evaluates a deterministic subset (the first n of a seeded
        permutation), the same on every call.
        """
        ...


def head_path(root: str | Path, expert: str) -> Path:
    """Where the head of ``expert`` lives under a suite's results root."""
    return Path(root) / "heads" / f"{expert}.safetensors"


def load_head(root: str | Path, expert: str) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """The head of ``expert``: (weight (C, d) float32, bias (C,) float32 or None, meta).

    ``meta`` has ``normalize`` (bool), ``logit_scale`` (float) and ``classes`` (list or
    None) from the JSON sidecar. Raises :class:`CheckpointError` naming the file when the
    head or its sidecar is missing or malformed.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = head_path(root, expert)
    sidecar = path.with_suffix(".json")
    if not path.is_file():
        raise CheckpointError(f"head of expert {expert!r} not found: {path}")
    if not sidecar.is_file():
        raise CheckpointError(f"head sidecar of expert {expert!r} not found: {sidecar}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: cannot read head of expert {expert!r}: {err}") from err
    try:
        raw = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{sidecar}: cannot read head sidecar: {err}") from err
    if not isinstance(raw, dict):
        raise CheckpointError(f"{sidecar}: expected a JSON object")

    weight, bias = tensors.get("weight"), tensors.get("bias")
    extra = set(tensors) - {"weight", "bias"}
    if weight is None or extra:
        raise CheckpointError(f"{path}: a head holds 'weight' and optional 'bias', "
                              f"got {sorted(tensors)}")
    if weight.ndim != 2 or not weight.is_floating_point():
        raise CheckpointError(f"{path}: 'weight' must be a 2-D float tensor, got "
                              f"{tuple(weight.shape)} {weight.dtype}")
    if bias is not None and (bias.shape != weight.shape[:1] or not bias.is_floating_point()):
        raise CheckpointError(f"{path}: 'bias' must be a float tensor of shape "
                              f"({weight.shape[0]},), got {tuple(bias.shape)} {bias.dtype}")
    normalize, scale, classes = raw.get("normalize", False), raw.get("logit_scale", 1.0), raw.get("classes")
    if not isinstance(normalize, bool):
        raise CheckpointError(f"{sidecar}: 'normalize' must be true or false, got {normalize!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise CheckpointError(f"{sidecar}: 'logit_scale' must be a finite number, got {scale!r}")
    if classes is not None and (not isinstance(classes, list) or len(classes) != weight.shape[0]):
        raise CheckpointError(f"{sidecar}: 'classes' must list the head's {weight.shape[0]} "
                              f"classes, got {classes!r:.200}")
    meta = {"normalize": normalize, "logit_scale": float(scale), "classes": classes}
    return weight.float(), (None if bias is None else bias.float()), meta


def head_logits(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                meta: Mapping) -> torch.Tensor:
    """``logit_scale · normalize?(features) @ weightᵀ + bias``, in float32 (float64 kept)."""
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    feats = features.to(dtype)
    if meta.get("normalize", False):
        feats = feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    logits = float(meta.get("logit_scale", 1.0)) * (feats @ weight.to(feats.device, dtype).T)
    if bias is not None:
        logits = logits + bias.to(feats.device, dtype)
    return logits


def load_eval_task(suite_cfg: Mapping, expert: str, *, root: str | Path) -> EvalTask:
    """The evaluation task of ``expert`` in ``suite_cfg`` (``suite_cfg["experts"][expert]``).

    ``root`` is the suite's results folder; heads are read from ``root/heads``.
    """
    experts = suite_cfg.get("experts")
    if not isinstance(experts, Mapping) or expert not in experts:
        raise ConfigError(f"experts.{expert}: not in the suite config")
    entry = experts[expert]
    if not isinstance(entry, Mapping):
        raise ConfigError(f"experts.{expert}: expected a mapping, got {type(entry).__name__}")
    if entry.get("build") == "digits":
        from submerge.suites import digits

        task = entry.get("task", expert)
        if task not in digits.TASKS:
            raise ConfigError(f"experts.{expert}.task: unknown digits task {task!r} "
                              f"(known: {', '.join(digits.TASKS)})")
        return digits.TASKS[task].bind(suite_cfg.get("digits"), root, name=expert)
    dataset = entry.get("dataset")
    if isinstance(dataset, Mapping):
        if dataset.get("kind", "image") == "text":
            from submerge.data.language import LanguageTask

            return LanguageTask(suite_cfg, expert, root=Path(root))
        from submerge.data.vision import VisionTask

        return VisionTask(suite_cfg, expert, root=Path(root))
    raise ConfigError(f"experts.{expert}: no evaluation data (need build: digits or a dataset)")
