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

from typing import Mapping, Sequence

import torch
from torch import Tensor

from submerge.errors import ConfigError
from submerge.layers import LayerInfo
from submerge.merging.task_arithmetic import sum_key
from submerge.merging.task_vectors import StateDict, check_task_vectors
from submerge.merging.ties import ties
from submerge.spectral import compute_dtype

__all__ = ["tall_masks", "consensus", "BASES"]

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


def _key_masks(
    task_vectors: Sequence[Mapping[str, Tensor]], key: str, lambdas: list[float], mtl: Tensor
) -> list[Tensor]:
    """The TALL masks of all tasks for one key, compared in ``mtl``'s (compute) dtype."""
    out = []
    for tv, lam in zip(task_vectors, lambdas):
        x = tv[key].to(mtl.dtype)
        out.append(x.abs() > (mtl - x).abs() * lam)
    return out


@torch.no_grad()
def tall_masks(
    task_vectors: Sequence[StateDict],
    lambdas: float | Sequence[float],
    multi_task: Mapping[str, Tensor] | None = None,
) -> list[dict[str, Tensor]]:
    """TALL masks ``|Delta_t| > lambda_t * |Delta_MTL - Delta_t|`` (Wang et al. 2024, arXiv:2405.07813),
    one boolean state dict per task. ``multi_task`` defaults to ``sum_t Delta_t``."""
    keys = check_task_vectors(task_vectors)
    lambdas = _lambdas(lambdas, len(task_vectors))
    masks: list[dict[str, Tensor]] = [{} for _ in task_vectors]
    for key in keys:
        work = compute_dtype(task_vectors[0][key].dtype)
        mtl = sum_key(task_vectors, key) if multi_task is None else multi_task[key].to(work)
        for mask, key_mask in zip(masks, _key_masks(task_vectors, key, lambdas, mtl)):
            mask[key] = key_mask
    return masks


@torch.no_grad()
def consensus(
    task_vectors: Sequence[StateDict],
    layer_info: Mapping[str, LayerInfo],
    *,
    lambdas: float | Sequence[float] = 0.4,
    k: int = 2,
    base: str = "ta",
) -> StateDict:
    """Consensus Merging (Wang et al. 2024, arXiv:2405.07813): ``base_merge * [sum_t mask_t >= k]``
    with TALL masks at ``lambdas``, computed key by key (the masks are never all held).
    ``layer_info`` is unused."""
    if base not in BASES:
        raise ConfigError(f"consensus: base must be one of {BASES}, got {base!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ConfigError(f"consensus: k must be a non-negative integer, got {k!r}")
    keys = check_task_vectors(task_vectors)
    lambdas = _lambdas(lambdas, len(task_vectors))
    ties_merged = ties(task_vectors, layer_info, k=20, merge="dis-sum") if base == "ties" else None
    out: StateDict = {}
    for key in keys:
        work = compute_dtype(task_vectors[0][key].dtype)
        mtl = sum_key(task_vectors, key) if ties_merged is None else ties_merged.pop(key).to(work)
        count = sum(m.to(torch.int32) for m in _key_masks(task_vectors, key, lambdas, mtl))
        out[key] = (mtl * (count >= k)).to(task_vectors[0][key].dtype)
    return out
