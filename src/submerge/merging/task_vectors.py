"""Task vectors (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023, arXiv:2212.04089):
``Delta_i = theta_i - theta_base`` and ``theta = theta_base + alpha * Delta``.

Also the input checks every merge rule shares. Non-float entries (int64 position ids,
uint8 buffers) are checked for matching keys, shapes and dtypes but never enter a task
vector.
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import torch
from torch import Tensor

from submerge.errors import CheckpointError
from submerge.layers import LayerInfo
from submerge.spectral import compute_dtype

log = logging.getLogger(__name__)

StateDict = dict[str, Tensor]

__all__ = [
    "StateDict",
    "validate_state_dicts",
    "task_vectors",
    "apply_task_vector",
    "check_task_vectors",
    "check_layer_info",
]

_MAX_LISTED = 5


def _listed(keys) -> str:
    keys = sorted(keys)
    more = f" (and {len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return ", ".join(repr(k) for k in keys[:_MAX_LISTED]) + more


def _check_finite(name: str, state_dict: Mapping[str, Tensor]) -> None:
    for key in sorted(state_dict):
        tensor = state_dict[key]
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{name}: key {key!r} contains NaN or Inf values")


@torch.no_grad()
def validate_state_dicts(base: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]]) -> None:
    """Check that every expert has the base's keys, shapes and dtypes and that no
    checkpoint holds NaN/Inf. Raises :class:`CheckpointError` naming the expert and key,
    or ``ValueError`` when no expert is given."""
    if len(experts) == 0:
        raise ValueError("no experts given: need at least one expert state dict")
    _check_finite("base", base)
    for name, expert in experts.items():
        missing = base.keys() - expert.keys()
        if missing:
            raise CheckpointError(f"expert {name!r} is missing key(s) of the base: {_listed(missing)}")
        extra = expert.keys() - base.keys()
        if extra:
            raise CheckpointError(f"expert {name!r} has key(s) the base lacks: {_listed(extra)}")
        for key in sorted(base):
            b, e = base[key], expert[key]
            if b.shape != e.shape:
                raise CheckpointError(
                    f"expert {name!r}, key {key!r}: shape {tuple(e.shape)} != base shape {tuple(b.shape)}"
                )
            if b.dtype != e.dtype:
                raise CheckpointError(f"expert {name!r}, key {key!r}: dtype {e.dtype} != base dtype {b.dtype}")
        _check_finite(f"expert {name!r}", expert)


@torch.no_grad()
def task_vectors(base: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]]) -> dict[str, StateDict]:
    """``Delta_i = theta_i - theta_base`` for every expert (validated first).

    Differences are taken in float32 (float64 for float64 weights) and stored in the
    weights' dtype; non-float entries are skipped.
    """
    validate_state_dicts(base, experts)
    skipped = sorted(k for k, v in base.items() if not v.is_floating_point())
    if skipped:
        log.debug("task vectors skip %d non-float entries: %s", len(skipped), _listed(skipped))
    out: dict[str, StateDict] = {}
    for name, expert in experts.items():
        out[name] = {
            key: (expert[key].to(compute_dtype(b.dtype)) - b.to(compute_dtype(b.dtype))).to(b.dtype)
            for key, b in base.items()
            if b.is_floating_point()
        }
    return out


@torch.no_grad()
def apply_task_vector(base: Mapping[str, Tensor], delta: Mapping[str, Tensor], alpha: float) -> StateDict:
    """``theta = theta_base + alpha * Delta`` in the base's dtype; keys absent from
    ``delta`` (e.g. non-float buffers) are taken from ``base`` unchanged (same tensors)."""
    out = dict(base)
    for key in sorted(delta):
        if key not in base:
            raise CheckpointError(f"task vector key {key!r} is not in the base state dict")
        b, d = base[key], delta[key]
        if b.shape != d.shape:
            raise CheckpointError(f"key {key!r}: task vector shape {tuple(d.shape)} != base shape {tuple(b.shape)}")
        if not b.is_floating_point():
            raise CheckpointError(f"key {key!r}: cannot add a task vector to a non-float base entry ({b.dtype})")
        work = compute_dtype(b.dtype)
        out[key] = (b.to(work) + alpha * d.to(device=b.device, dtype=work)).to(b.dtype)
    return out


def check_task_vectors(task_vectors: Sequence[Mapping[str, Tensor]]) -> list[str]:
    """Shared input check of the merge rules: a non-empty list of float task vectors
    with identical keys, shapes and dtypes. Returns the sorted keys."""
    if len(task_vectors) == 0:
        raise ValueError("no task vectors given: need at least one expert")
    first = task_vectors[0]
    keys = sorted(first)
    for i, tv in enumerate(task_vectors):
        if tv.keys() != first.keys():
            diff = tv.keys() ^ first.keys()
            raise ValueError(f"task vector {i} differs from task vector 0 in key(s) {_listed(diff)}")
        for key in keys:
            t = tv[key]
            if not t.is_floating_point():
                raise ValueError(f"task vector {i}, key {key!r}: dtype {t.dtype} is not a float dtype")
            if t.shape != first[key].shape or t.dtype != first[key].dtype:
                raise ValueError(
                    f"task vector {i}, key {key!r}: {tuple(t.shape)}/{t.dtype} differs from task vector 0 "
                    f"({tuple(first[key].shape)}/{first[key].dtype})"
                )
    return keys


def check_layer_info(keys, layer_info: Mapping[str, LayerInfo]) -> None:
    """Every key must have a :class:`LayerInfo` (a missing one is an adapter bug)."""
    missing = [k for k in keys if k not in layer_info]
    if missing:
        raise ValueError(f"layer_info has no entry for key(s) {_listed(missing)}")
