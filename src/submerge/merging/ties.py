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

Memory: the threshold is computed one task at a time (one flattened vector alive, selected in
place), or read from the task-vector file, where extraction recorded it
(:func:`threshold_table`); the merge runs key by key (:func:`ties_elect_key`, then
:func:`ties_disjoint_key`, each walking the tasks' tensors of the key once, in order, so that a
source reading files holds one task's tensor at a time) keeping only the int8 elected signs
between the two passes; the tasks' flattened vectors are never stacked.
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from submerge.errors import ConfigError
from submerge.layers import LayerInfo
from submerge.merging.source import TaskVectorSource, as_source
from submerge.merging.task_vectors import StateDict
from submerge.spectral import compute_dtype

__all__ = ["ties", "ties_items", "trim_thresholds", "threshold_table", "threshold_from_table", "kth_rank",
           "ties_elect_key", "ties_disjoint_key", "MERGE_FUNCS", "TABLE_PERCENTS"]

MERGE_FUNCS = ("dis-mean", "dis-sum", "sum")
# the top-k % for which extraction records the threshold (every integer percentage)
TABLE_PERCENTS = tuple(range(1, 100))


def _flat_dtype(dtypes) -> torch.dtype:
    return torch.float64 if any(d == torch.float64 for d in dtypes) else torch.float32


def check_k(k: float) -> float:
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 100:
        raise ConfigError(f"ties: k must be a percentage in (0, 100], got {k}")
    return k


def kth_rank(d: int, k: float) -> int:
    """1-based rank (ascending magnitude) of the smallest kept magnitude of ``d`` entries."""
    return d - int(d * (k / 100))


def _flatten_task(keys: Sequence[str], sizes: Sequence[int], get: Callable[[str], Tensor],
                  dtype: torch.dtype, device=None) -> Tensor:
    """``|Delta|`` of one task over ``keys`` (sorted), read key by key (``get``) into one flat
    vector of ``dtype`` on ``device`` (default: the first tensor's)."""
    flat = None
    offset = 0
    for key, n in zip(keys, sizes):
        x = get(key)
        if flat is None:
            flat = torch.empty(sum(sizes), dtype=dtype, device=x.device if device is None else device)
        flat[offset : offset + n] = x.reshape(-1).abs()
        offset += n
        del x  # before the next key is read
    return flat


def _kth_smallest(flat: Tensor, rank: int) -> Tensor:
    """The ``rank``-th smallest entry (1-based) of a flat vector, which it may reorder. On the
    CPU numpy's in-place partition (no copy; ``torch.kthvalue`` copies the vector and builds an
    int64 index of it: three more vectors' worth of memory); the same value either way."""
    if flat.device.type != "cpu":
        return torch.kthvalue(flat, rank).values
    array = flat.numpy()
    array.partition(rank - 1)
    return torch.tensor(array[rank - 1], dtype=flat.dtype)


@torch.no_grad()
def _thresholds(src: TaskVectorSource, k: float) -> list[Tensor | None]:
    keys = src.keys
    sizes = [int(np.prod(src.meta(key)[0], dtype=np.int64)) for key in keys]
    dtype = _flat_dtype(src.meta(key)[1] for key in keys)
    d = sum(sizes)
    out: list[Tensor | None] = []
    for i in range(len(src)):
        if d == 0:
            out.append(None)
            continue
        flat = _flatten_task(keys, sizes, lambda key, i=i: src.read_one(i, key), dtype)
        out.append(_kth_smallest(flat, kth_rank(d, k)))
        del flat
    return out


@torch.no_grad()
def trim_thresholds(task_vectors: Sequence[Mapping[str, Tensor]] | TaskVectorSource,
                    k: float) -> list[Tensor | None]:
    """Per task, the magnitude threshold of its top-``k`` % entries over the whole
    flattened task vector (``None`` for ``k = 100``: nothing is trimmed), computed one task at
    a time."""
    check_k(k)
    src = as_source(task_vectors)
    if k == 100:
        return [None] * len(src)
    return _thresholds(src, k)


@torch.no_grad()
def threshold_table(task_vector: Mapping[str, Tensor]) -> dict[str, float]:
    """The trim threshold of one task vector for every top-k % in :data:`TABLE_PERCENTS`
    (``{"<k>": threshold}``), recorded at extraction so that the merge need not flatten the
    task vector; each value equals ``trim_thresholds([task_vector], k)[0]`` exactly (both
    select the same order statistic; one partial sort for all of them). Empty for an empty
    task vector."""
    keys = sorted(task_vector)
    sizes = [task_vector[key].numel() for key in keys]
    d = sum(sizes)
    if d == 0:
        return {}
    dtype = _flat_dtype(task_vector[key].dtype for key in keys)
    # on the host: numpy's partition selects all 99 order statistics in one pass (extraction
    # runs on the CPU; a CUDA task vector is copied key by key into the host vector)
    flat = _flatten_task(keys, sizes, task_vector.__getitem__, dtype, "cpu").numpy()
    ranks = sorted({kth_rank(d, k) - 1 for k in TABLE_PERCENTS})
    flat.partition(ranks)
    return {str(k): float(flat[kth_rank(d, k) - 1]) for k in TABLE_PERCENTS}


def threshold_from_table(table: Mapping[str, float], k: float, dtype: torch.dtype,
                         device) -> Tensor | None:
    """The threshold for top-``k`` % from a :func:`threshold_table` (``None`` for ``k = 100``);
    ``KeyError`` when ``k`` is not tabulated."""
    if k == 100:
        return None
    if float(k) != int(k):
        raise KeyError(k)
    return torch.tensor(table[str(int(k))], dtype=dtype, device=device)


def _trimmed(x: Tensor, threshold: Tensor | None) -> Tensor:
    """``x`` (in its compute dtype) with the entries below the task's threshold zeroed."""
    work = x.to(compute_dtype(x.dtype))
    if threshold is None:
        return work
    keep = x.abs().to(threshold.dtype) >= threshold
    return work * keep


@torch.no_grad()
def ties_elect_key(tensors: Sequence[Tensor], thresholds: Sequence[Tensor | None]) -> Tensor:
    """TIES' elected sign of one parameter: ``sign(sum_t trimmed_t)`` as int8 (0 where the sum
    is 0; :func:`ties_disjoint_key` replaces those by the global majority sign)."""
    total = _trimmed(tensors[0], thresholds[0])
    for x, thr in zip(tensors[1:], thresholds[1:]):
        total = total + _trimmed(x, thr)  # not in place: _trimmed may return the input
    return torch.sign(total).to(torch.int8)


@torch.no_grad()
def ties_disjoint_key(tensors: Sequence[Tensor], thresholds: Sequence[Tensor | None], sign: Tensor,
                      majority: int, merge: str = "dis-mean") -> Tensor:
    """TIES' disjoint merge of one parameter, in the task vectors' dtype. ``sign``: the
    parameter's elected signs (:func:`ties_elect_key`; its zeros are set to ``majority`` in
    place)."""
    sign[sign == 0] = majority
    positive = sign > 0
    acc = count = None
    for x, thr in zip(tensors, thresholds):
        x = _trimmed(x, thr)
        agree = torch.where(positive, x > 0, x < 0)
        acc = x * agree if acc is None else acc + x * agree
        count = agree.to(torch.int32) if count is None else count + agree
    if merge == "dis-mean":
        acc = acc / count.clamp(min=1).to(acc.dtype)
    return acc.to(tensors[0].dtype)


@torch.no_grad()
def ties(
    task_vectors: Sequence[StateDict] | TaskVectorSource,
    layer_info: Mapping[str, LayerInfo],
    *,
    k: float = 20,
    merge: str = "dis-mean",
) -> StateDict:
    """TIES-Merging (Yadav et al. 2023, arXiv:2306.01708, Algorithm 1: trim, elect, disjoint merge).

    ``k``: percentage of entries kept per task (20 in the reference runs; 100 = no trim).
    ``merge``: ``"dis-mean"`` (TIES), ``"dis-sum"`` (used by Consensus/TALL with TIES) or
    ``"sum"`` (FusionBench's name for ``"dis-sum"``). ``layer_info`` is unused.
    ``task_vectors``: state dicts or a source (two passes over the keys; the thresholds are the
    source's recorded ones where it has them).
    """
    return dict(ties_items(task_vectors, layer_info, k=k, merge=merge))


def ties_items(
    task_vectors: Sequence[StateDict] | TaskVectorSource,
    layer_info: Mapping[str, LayerInfo],
    *,
    k: float = 20,
    merge: str = "dis-mean",
) -> Iterator[tuple[str, Tensor]]:
    """:func:`ties` one key at a time, in sorted order (the elect pass over every key runs
    first; the arguments are checked at the call)."""
    if merge not in MERGE_FUNCS:
        raise ConfigError(f"ties: merge must be one of {MERGE_FUNCS}, got {merge!r}")
    check_k(k)
    return _ties_items(as_source(task_vectors), k, merge)


@torch.no_grad()
def _ties_items(src: TaskVectorSource, k: float, merge: str) -> Iterator[tuple[str, Tensor]]:
    thresholds = src.ties_thresholds(k)
    if thresholds is None:
        thresholds = trim_thresholds(src, k)

    # elect: sign of the sum of trimmed task vectors (kept as int8, a quarter of a model)
    elected: dict[str, Tensor] = {}
    sign_total = 0
    for key in src.iter_keys("TIES elect"):
        sign = ties_elect_key(src.read(key), thresholds)
        sign_total += int(sign.sum(dtype=torch.int64))
        elected[key] = sign
    majority = (sign_total > 0) - (sign_total < 0)

    for key in src.iter_keys("TIES merge"):
        yield key, ties_disjoint_key(src.read(key), thresholds, elected.pop(key), majority, merge)
