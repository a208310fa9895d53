"""TALL masks and Consensus Merging (Wang et al., "Localizing Task Information for
Improved Model Merging and Compression", ICML 2024, arXiv:2405.07813: the TALL mask
``m_t = 1{|tau_t| > lambda_t |tau_MTL - tau_t|}`` and the consensus mask ``1{sum_t m_t >= k}``).

Reference code: nik-dim/tall_masks ``src/utils/tallmask_utils.py`` and
``src/eval/aggregation.py``:

* TALL mask of task ``t``: ``|Delta_t| > lambda_t * |Delta_MTL - Delta_t|`` entrywise, with
  the multi-task vector ``Delta_MTL = sum_t Delta_t`` (the reference builds it with the
  TIES merge when Consensus uses TIES; we do the same). The reference compares in weight
  space, ``|theta_0 - theta_t| > |theta_0 + Delta_MTL - theta_t| * lambda``; the two agree
  up to floating-point rounding.
* Consensus mask: ``sum_t mask_t >= k`` (``k = 2`` removes "selfish" and "catastrophic"
  weights); merged ``= base_merge * consensus``, base ``"ta"`` (``sum_t Delta_t``, used by
  the paper) or ``"ties"`` (TIES with ``k = 20`` and ``"dis-sum"``, fixed as in the reference).

Default ``lambdas = 0.4``, the middle of the reference grid {0.2, ..., 0.6}; the workflow
may choose ``lambda_t`` per task on validation and pass a list.
"""

from __future__ import annotations

from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor

from submerge.errors import ConfigError
from submerge.layers import LayerInfo
from submerge.merging.source import TaskVectorSource, as_source
from submerge.merging.task_arithmetic import sum_tensors
from submerge.merging.task_vectors import StateDict
from submerge.merging.ties import ties_items
from submerge.spectral import compute_dtype

__all__ = ["tall_masks", "tall_masks_key", "consensus", "consensus_items", "consensus_key", "BASES"]

BASES = ("ta", "ties")


def _lambdas(lambdas: float | Sequence[float], n_tasks: int) -> list[float]:
    if isinstance(lambdas, (int, float)):
        lambdas = [float(lambdas)] * n_tasks
    lambdas = [float(x) for x in lambdas]
    if len(lambdas) != n_tasks:
        raise ConfigError(f"lambdas: got {len(lambdas)} values for {n_tasks} task vectors")
    for i, lam in enumerate(lambdas):
        if not lam >= 0:
            raise ConfigError(f"lambdas[{i}] must be >= 0, got {lam}")
    return lambdas


def _mask(x: Tensor, lam: float, mtl: Tensor) -> Tensor:
    """One task's TALL mask of one key, compared in ``mtl``'s (compute) dtype."""
    x = x.to(mtl.dtype)
    return x.abs() > (mtl - x).abs() * lam


def _key_masks(tensors: Sequence[Tensor], lambdas: Sequence[float], mtl: Tensor) -> list[Tensor]:
    """The TALL masks of all tasks for one key."""
    return [_mask(x, lam, mtl) for x, lam in zip(tensors, lambdas)]


@torch.no_grad()
def tall_masks_key(tensors: Sequence[Tensor], lambdas: Sequence[float],
                   multi_task: Tensor | None = None) -> list[Tensor]:
    """The TALL masks of one parameter, one boolean tensor per task (``lambdas``: one value per
    task; ``multi_task`` defaults to ``sum_t Delta_t`` of the parameter)."""
    work = compute_dtype(tensors[0].dtype)
    mtl = sum_tensors(tensors) if multi_task is None else multi_task.to(work)
    return _key_masks(tensors, lambdas, mtl)


@torch.no_grad()
def tall_masks(
    task_vectors: Sequence[StateDict] | TaskVectorSource,
    lambdas: float | Sequence[float],
    multi_task: Mapping[str, Tensor] | None = None,
) -> list[dict[str, Tensor]]:
    """TALL masks ``|Delta_t| > lambda_t * |Delta_MTL - Delta_t|`` (Wang et al. 2024, arXiv:2405.07813),
    one boolean state dict per task. ``multi_task`` defaults to ``sum_t Delta_t``."""
    src = as_source(task_vectors)
    lambdas = _lambdas(lambdas, len(src))
    masks: list[dict[str, Tensor]] = [{} for _ in range(len(src))]
    for key in src.iter_keys("TALL masks"):
        key_masks = tall_masks_key(src.read(key), lambdas, None if multi_task is None else multi_task[key])
        for mask, key_mask in zip(masks, key_masks):
            mask[key] = key_mask
    return masks


@torch.no_grad()
def consensus_key(tensors: Sequence[Tensor], lambdas: Sequence[float], k: int,
                  multi_task: Tensor | None = None) -> Tensor:
    """Consensus of one parameter: ``multi_task * [sum_t mask_t >= k]`` in the task vectors'
    dtype (``multi_task`` defaults to ``sum_t Delta_t``; ``lambdas``: one value per task)."""
    work = compute_dtype(tensors[0].dtype)
    mtl = sum_tensors(tensors) if multi_task is None else multi_task.to(work)
    count = None  # tasks whose mask keeps the entry, one task's mask alive at a time
    for x, lam in zip(tensors, lambdas):
        mask = _mask(x, lam, mtl)
        count = mask.to(torch.int32) if count is None else count + mask
    return (mtl * (count >= k)).to(tensors[0].dtype)


@torch.no_grad()
def consensus(
    task_vectors: Sequence[StateDict] | TaskVectorSource,
    layer_info: Mapping[str, LayerInfo],
    *,
    lambdas: float | Sequence[float] = 0.4,
    k: int = 2,
    base: str = "ta",
) -> StateDict:
    """Consensus Merging (Wang et al. 2024, arXiv:2405.07813): ``base_merge * [sum_t mask_t >= k]``
    with TALL masks at ``lambdas``, computed key by key (the masks are never all held).
    ``layer_info`` is unused."""
    return dict(consensus_items(task_vectors, layer_info, lambdas=lambdas, k=k, base=base))


def consensus_items(
    task_vectors: Sequence[StateDict] | TaskVectorSource,
    layer_info: Mapping[str, LayerInfo],
    *,
    lambdas: float | Sequence[float] = 0.4,
    k: int = 2,
    base: str = "ta",
) -> Iterator[tuple[str, Tensor]]:
    """:func:`consensus` one key at a time, in sorted order (the arguments are checked at the
    call)."""
    if base not in BASES:
        raise ConfigError(f"consensus: base must be one of {BASES}, got {base!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ConfigError(f"consensus: k must be a non-negative integer, got {k!r}")
    src = as_source(task_vectors)
    return _consensus_items(src, layer_info, _lambdas(lambdas, len(src)), k, base)


@torch.no_grad()
def _consensus_items(src: TaskVectorSource, layer_info: Mapping[str, LayerInfo],
                     lambdas: list[float], k: int, base: str) -> Iterator[tuple[str, Tensor]]:
    # TIES' merge of each key comes with it (its elect pass runs before the first key)
    ties_merged = ties_items(src, layer_info, k=20, merge="dis-sum") if base == "ties" else None
    for key in src.iter_keys("Consensus"):
        mtl = None
        if ties_merged is not None:
            ties_key, mtl = next(ties_merged)
            assert ties_key == key, (ties_key, key)
        yield key, consensus_key(src.read(key), lambdas, k, mtl)
