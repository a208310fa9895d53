"""Iso-C and Iso-CTS (Marczak et al., "No Task Left Behind: Isotropic Model Merging with
Common and Task-Specific Subspaces", ICML 2025, arXiv:2502.04959).

Matches the official code (danielm1405/iso-merging ``src/utils/iso.py``, copied in
FusionBench ``isotropic_merging/iso_utils.py``). Every 2-D key is merged in its spectrum;
all other keys become the mean over tasks.

* Iso-C: ``M = sum_t Delta_t = U S Vh``; merged ``= mean(S) * U Vh`` (a flat spectrum).
* Iso-CTS: common size ``k_c = int(min_dim * f)`` then
  ``k_c = min_dim - round((min_dim - k_c) / T) * T`` (Python ``round``, half to even) and
  ``n = (min_dim - k_c) / T`` per task; the common block is the top-``k_c`` SVD of
  ``sum_t Delta_t``; task ``t`` contributes the top-``n`` SVD of
  ``Delta_t - U_c U_c^T Delta_t``; the stacked ``[task blocks | common block]`` bases are
  orthogonalised with their polar factors and all singular values set to the mean of the
  stacked singular values.
"""

from __future__ import annotations

from functools import partial
from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor

from submerge.errors import ConfigError
from submerge.layers import LayerInfo
from submerge.merging.source import TaskVectorSource, map_keys
from submerge.merging.task_arithmetic import sum_tensors
from submerge.merging.task_vectors import StateDict
from submerge.merging.tsv import polar_factor
from submerge.spectral import svd

__all__ = ["iso_c", "iso_c_items", "iso_c_key", "iso_cts", "iso_cts_items", "iso_cts_key", "iso_cts_sizes"]


@torch.no_grad()
def iso_c_key(tensors: Sequence[Tensor]) -> Tensor:
    """Iso-C of one parameter (the mean over tasks for a key that is not 2-D)."""
    dtype = tensors[0].dtype
    total = sum_tensors(tensors)
    if total.ndim != 2:
        return (total / len(tensors)).to(dtype)
    u, s, vh = svd(total)
    return ((u * s.mean()) @ vh).to(dtype)


@torch.no_grad()
def iso_c(task_vectors: Sequence[StateDict] | TaskVectorSource,
          layer_info: Mapping[str, LayerInfo]) -> StateDict:
    """Iso-C (Marczak et al. 2025, arXiv:2502.04959): ``mean(S) U Vh`` of ``sum_t Delta_t``,
    key by key. ``layer_info`` is unused."""
    return dict(iso_c_items(task_vectors, layer_info))


def iso_c_items(task_vectors: Sequence[StateDict] | TaskVectorSource,
                layer_info: Mapping[str, LayerInfo]) -> Iterator[tuple[str, Tensor]]:
    """:func:`iso_c` one key at a time, in sorted order."""
    return map_keys(task_vectors, "Iso-C", iso_c_key)


def iso_cts_sizes(min_dim: int, n_tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """``(k_c, n)``: the common-subspace size and the per-task size, as in the reference."""
    k_c = int(min_dim * common_space_fraction)
    k_c = min_dim - round((min_dim - k_c) / n_tasks) * n_tasks
    if k_c < 0:
        raise ValueError(
            f"iso_cts: no valid split of {min_dim} dimensions for {n_tasks} tasks at "
            f"common_space_fraction={common_space_fraction}"
        )
    return k_c, (min_dim - k_c) // n_tasks


def _check_fraction(common_space_fraction: float) -> None:
    if not 0.0 <= common_space_fraction <= 1.0:
        raise ConfigError(f"iso_cts: common_space_fraction must be in [0, 1], got {common_space_fraction}")


@torch.no_grad()
def iso_cts_key(tensors: Sequence[Tensor], common_space_fraction: float = 0.8) -> Tensor:
    """Iso-CTS of one parameter (the mean over tasks for a key that is not 2-D)."""
    _check_fraction(common_space_fraction)
    n_tasks = len(tensors)
    dtype = tensors[0].dtype
    total = sum_tensors(tensors)
    if total.ndim != 2:
        return (total / n_tasks).to(dtype)
    k_c, n = iso_cts_sizes(min(total.shape), n_tasks, common_space_fraction)
    u, s, vh = svd(total)
    u_c = u[:, :k_c]
    stacked_u, stacked_s, stacked_vh = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(vh)
    for i, x in enumerate(tensors):
        w = x.to(total.dtype)
        u_t, s_t, vh_t = svd(w - u_c @ (u_c.T @ w))
        stacked_u[:, i * n : (i + 1) * n] = u_t[:, :n]
        stacked_s[i * n : (i + 1) * n] = s_t[:n]
        stacked_vh[i * n : (i + 1) * n, :] = vh_t[:n, :]
    start = n_tasks * n
    stacked_u[:, start : start + k_c] = u_c
    stacked_s[start : start + k_c] = s[:k_c]
    stacked_vh[start : start + k_c, :] = vh[:k_c, :]
    return ((polar_factor(stacked_u) * stacked_s.mean()) @ polar_factor(stacked_vh)).to(dtype)


@torch.no_grad()
def iso_cts(
    task_vectors: Sequence[StateDict] | TaskVectorSource,
    layer_info: Mapping[str, LayerInfo],
    *,
    common_space_fraction: float = 0.8,
) -> StateDict:
    """Iso-CTS (Marczak et al. 2025, arXiv:2502.04959; see the module docstring), key by key.
    ``layer_info`` is unused."""
    return dict(iso_cts_items(task_vectors, layer_info, common_space_fraction=common_space_fraction))


def iso_cts_items(task_vectors: Sequence[StateDict] | TaskVectorSource,
                  layer_info: Mapping[str, LayerInfo], *,
                  common_space_fraction: float = 0.8) -> Iterator[tuple[str, Tensor]]:
    """:func:`iso_cts` one key at a time, in sorted order (the fraction is checked at the call)."""
    _check_fraction(common_space_fraction)
    return map_keys(task_vectors, "Iso-CTS", partial(iso_cts_key, common_space_fraction=common_space_fraction))
