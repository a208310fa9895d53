"""TSV-Merge (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in
Model Merging", CVPR 2025, arXiv:2412.00081: per-task low-rank compression, then
decorrelation of the stacked singular vectors by orthogonal Procrustes).

Matches the official code (AntoAndGar/task_singular_vectors
``src/utils/TSVM_utils.py::compute_and_sum_svd_mem_reduction``):

* every 2-D key: per task the top ``r = int(min_dim / T)`` singular triplets, placed in
  slot ``t`` of stacked ``U`` (columns), ``S`` and ``Vh`` (rows); trailing slots stay zero
  when ``T`` does not divide ``min_dim`` (``r = 0`` when ``T > min_dim``: the key merges to 0);
* decorrelation with the polar factors (orthogonal Procrustes): ``svd(U) = P S Q -> P Q``,
  same for ``Vh``; merged ``= polar(U) diag(S) polar(Vh)``;
* all other keys: the mean over tasks.

``r`` is computed as ``min_dim // T``; the reference's ``int(min_dim * (1/T))`` gives the
same value for every ``T <= 48`` and ``min_dim <= 8192``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from submerge.layers import LayerInfo
from submerge.merging.task_arithmetic import sum_key
from submerge.merging.task_vectors import StateDict, check_task_vectors
from submerge.spectral import svd

__all__ = ["tsv_m", "polar_factor"]


def polar_factor(matrix: Tensor) -> Tensor:
    """The orthogonal polar factor ``P Q`` of ``matrix = P S Q`` (reduced SVD)."""
    p, _, q = svd(matrix)
    return p @ q


@torch.no_grad()
def tsv_m(task_vectors: Sequence[StateDict], layer_info: Mapping[str, LayerInfo]) -> StateDict:
    """TSV-Merge (Gargiulo et al. 2025, arXiv:2412.00081; see the module docstring).
    ``layer_info`` is unused."""
    keys = check_task_vectors(task_vectors)
    n_tasks = len(task_vectors)
    merged: StateDict = {}
    for key in keys:
        dtype = task_vectors[0][key].dtype
        if task_vectors[0][key].ndim != 2:
            merged[key] = (sum_key(task_vectors, key) / n_tasks).to(dtype)
            continue
        r = min(task_vectors[0][key].shape) // n_tasks
        sum_u = sum_s = sum_vh = None
        for i, tv in enumerate(task_vectors):
            u, s, vh = svd(tv[key])
            if sum_u is None:
                sum_u, sum_s, sum_vh = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(vh)
            sum_u[:, i * r : (i + 1) * r] = u[:, :r]
            sum_s[i * r : (i + 1) * r] = s[:r]
            sum_vh[i * r : (i + 1) * r, :] = vh[:r, :]
        merged[key] = (polar_factor(sum_u) @ torch.diag(sum_s) @ polar_factor(sum_vh)).to(dtype)
    return merged
