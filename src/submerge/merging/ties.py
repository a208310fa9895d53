"""TIES-Merging (Yadav et al., "TIES-Merging: Resolving Interference When Merging
Models", NeurIPS 2023, arXiv:2306.01708, Algorithm 1): trim, elect sign, disjoint merge.

Matches the reference code used by the vision merging literature (nik-dim/tall_masks
``src/utils/ties_utils.py`` and ``topk_values_mask``):

* **trim**: per task, keep the entries whose magnitude is ``>=`` the
  ``(d - int(d * k/100))``-th smallest magnitude of that task's *whole* flattened task
  vector (all keys in sorted order; ties at the threshold are kept); ``k = 100`` keeps all;
* **elect**: ``sign(sum_t trimmed_t)``; where that is 0, the global majority sign
  ``sign(sum of all elected signs)``;
* **disjoint merge**: per entry, the entries agreeing with the elected sign, summed
  (``"dis-sum"``; FusionBench calls the same computation ``"sum"``) or averaged over their
  count clamped at 1 (``"dis-mean"``, the TIES method's default).

Memory: the threshold is computed one task at a time (one flattened vector alive), the
merge key by key with running sums; the tasks' flattened vectors are never stacked.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from submerge.errors import ConfigError
from submerge.layers import LayerInfo
from submerge.merging.task_vectors import StateDict, check_task_vectors
from submerge.spectral import compute_dtype

__all__ = ["ties", "trim_thresholds", "MERGE_FUNCS"]

MERGE_FUNCS = ("dis-mean", "dis-sum", "sum")


def _flat_dtype(task_vector: Mapping[str, Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in task_vector.values()) else torch.float32


@torch.no_grad()
def trim_thresholds(task_vectors: Sequence[Mapping[str, Tensor]], k: float) -> list[Tensor | None]:
    """Per task, the magnitude threshold of its top-``k`` % entries over the whole
    flattened task vector (``None`` for ``k = 100``: nothing is trimmed)."""
    if not 0 < k <= 100:
        raise ConfigError(f"ties: k must be a percentage in (0, 100], got {k}")
    if k == 100:
        return [None] * len(task_vectors)
    keys = sorted(task_vectors[0])
    out: list[Tensor | None] = []
    for tv in task_vectors:
        d = sum(tv[key].numel() for key in keys)
        if d == 0:
            out.append(None)
            continue
        flat = torch.empty(d, dtype=_flat_dtype(tv), device=tv[keys[0]].device)
        offset = 0
        for key in keys:
            n = tv[key].numel()
            flat[offset : offset + n] = tv[key].reshape(-1).abs()
            offset += n
        kth = d - int(d * (k / 100))  # 1-based rank of the smallest kept magnitude
        out.append(torch.kthvalue(flat, kth).values)
        del flat
    return out


def _trimmed(x: Tensor, threshold: Tensor | None) -> Tensor:
    """``x`` (in its compute dtype) with the entries below the task's threshold zeroed."""
    work = x.to(compute_dtype(x.dtype))
    if threshold is None:
        return work
    keep = x.abs().to(threshold.dtype) >= threshold
    return work * keep


@torch.no_grad()
def ties(
    task_vectors: Sequence[StateDict],
    layer_info: Mapping[str, LayerInfo],
    *,
    k: float = 20,
    merge: str = "dis-mean",
) -> StateDict:
    """TIES-Merging (Yadav et al. 2023, arXiv:2306.01708, Algorithm 1: trim, elect, disjoint merge).

    ``k``: percentage of entries kept per task (20 in the reference runs; 100 = no trim).
    ``merge``: ``"dis-mean"`` (TIES), ``"dis-sum"`` (used by Consensus/TALL with TIES) or
    ``"sum"`` (FusionBench's name for ``"dis-sum"``). ``layer_info`` is unused.
    """
    if merge not in MERGE_FUNCS:
        raise ConfigError(f"ties: merge must be one of {MERGE_FUNCS}, got {merge!r}")
    keys = check_task_vectors(task_vectors)
    thresholds = trim_thresholds(task_vectors, k)

    # elect: sign of the sum of trimmed task vectors (kept as int8, a quarter of a model)
    elected: dict[str, Tensor] = {}
    sign_total = 0
    for key in keys:
        total = _trimmed(task_vectors[0][key], thresholds[0])
        for tv, thr in zip(task_vectors[1:], thresholds[1:]):
            total = total + _trimmed(tv[key], thr)  # not in place: _trimmed may return the input
        sign = torch.sign(total).to(torch.int8)
        sign_total += int(sign.sum(dtype=torch.int64))
        elected[key] = sign
    majority = (sign_total > 0) - (sign_total < 0)

    merged: StateDict = {}
    for key in keys:
        sign = elected.pop(key)
        sign[sign == 0] = majority
        positive = sign > 0
        acc = count = None
        for tv, thr in zip(task_vectors, thresholds):
            x = _trimmed(tv[key], thr)
            agree = torch.where(positive, x > 0, x < 0)
            acc = x * agree if acc is None else acc + x * agree
            count = agree.to(torch.int32) if count is None else count + agree
        if merge == "dis-mean":
            acc = acc / count.clamp(min=1).to(acc.dtype)
        merged[key] = acc.to(task_vectors[0][key].dtype)
    return merged
