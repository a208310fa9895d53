"""TSV-Merge (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in
Model Merging", CVPR 2025, arXiv:2412.00081: per-task low-rank compression, then
decorrelation of the stacked singular vectors by orthogonal Procrustes).

Matches the official code (AntoAndGar/task_singular_vectors
``src/utils/TSVM_utils.py::compute_and_sum_svd_mem_reduction``):

* every 2-D key: per task the top ``r = int(min_dim / T)`` singular triplets (for a matrix whose
  smaller side is >= 256: a truncated decomposition, :func:`submerge.spectral.top_svd_ritz`,
  checked a posteriori, with fall backs to the float64 Gram path and the full SVD; the full SVD
  otherwise, bitwise as before), placed in
  slot ``t`` of stacked ``U`` (columns), ``S`` and ``Vh`` (rows); trailing slots stay zero
  when ``T`` does not divide ``min_dim`` (``r = 0`` when ``T > min_dim``: the key merges to 0);
* decorrelation with the polar factors (orthogonal Procrustes): ``svd(U) = P S Q -> P Q``,
  same for ``Vh``; merged ``= polar(U) diag(S) polar(Vh)``;
* all other keys: the mean over tasks.

``r`` is computed as ``min_dim // T``; the reference's ``int(min_dim * (1/T))`` gives the
same value for every ``T <= 48`` and ``min_dim <= 8192``.
"""

from __future__ import annotations

from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor

from submerge.layers import LayerInfo
from submerge.merging.source import TaskVectorSource, map_keys
from submerge.merging.task_arithmetic import sum_tensors
from submerge.merging.task_vectors import StateDict
from submerge.spectral import svd, top_svd

__all__ = ["tsv_m", "tsv_m_items", "tsv_m_key", "polar_factor"]


def polar_factor(matrix: Tensor) -> Tensor:
    """The orthogonal polar factor ``P Q`` of ``matrix = P S Q`` (reduced SVD)."""
    p, _, q = svd(matrix)
    return p @ q


@torch.no_grad()
def tsv_m_key(tensors: Sequence[Tensor], *, truncated: bool | None = None,
              method: str = "ritz") -> Tensor:
    """TSV-Merge of one parameter (the mean over tasks for a key that is not 2-D), in the task
    vectors' dtype. ``truncated`` and ``method``: how each task's top ``r`` triplets are computed
    (:func:`submerge.spectral.top_svd`: by default a Rayleigh-Ritz step on a partial Gram
    eigendecomposition for matrices whose smaller side is >= 256, with fall backs where its check
    finds it not accurate; the merged layer is then typically within 1.5-3x, at worst ~7x, of the
    float32 full SVD's own distance to the float64 result: the tolerance stated in
    :func:`submerge.spectral.top_svd_ritz`). ``truncated=False``: the full SVDs."""
    n_tasks = len(tensors)
    dtype = tensors[0].dtype
    if tensors[0].ndim != 2:
        return (sum_tensors(tensors) / n_tasks).to(dtype)
    r = min(tensors[0].shape) // n_tasks
    rows, cols = tensors[0].shape
    k = min(rows, cols)
    sum_u = sum_s = sum_vh = None
    for i, x in enumerate(tensors):
        u, s, vh = top_svd(x, r, truncated=truncated, method=method)
        if sum_u is None:
            sum_u, sum_s, sum_vh = u.new_zeros(rows, k), s.new_zeros(k), vh.new_zeros(k, cols)
        sum_u[:, i * r : (i + 1) * r] = u
        sum_s[i * r : (i + 1) * r] = s
        sum_vh[i * r : (i + 1) * r, :] = vh
    return (polar_factor(sum_u) @ torch.diag(sum_s) @ polar_factor(sum_vh)).to(dtype)


@torch.no_grad()
def tsv_m(task_vectors: Sequence[StateDict] | TaskVectorSource,
          layer_info: Mapping[str, LayerInfo]) -> StateDict:
    """TSV-Merge (Gargiulo et al. 2025, arXiv:2412.00081; see the module docstring), key by
    key. ``layer_info`` is unused."""
    return dict(tsv_m_items(task_vectors, layer_info))


def tsv_m_items(task_vectors: Sequence[StateDict] | TaskVectorSource,
                layer_info: Mapping[str, LayerInfo]) -> Iterator[tuple[str, Tensor]]:
    """:func:`tsv_m` one key at a time, in sorted order."""
    return map_keys(task_vectors, "TSV-M", tsv_m_key)
