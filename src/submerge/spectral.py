"""Spectral measures of (merged) task vectors and the SVD the pure math shares.

* Stable rank, Eq. (2) of Skorobogat et al., "Subspace-Boosted Model Merging"
  (arXiv 2506.16506): ``sum_i sigma_i^2 / max_i sigma_i^2 = ||A||_F^2 / ||A||_2^2``.
* Cumulative energy rank (Supp. Sec. D): the number of leading singular values needed
  to cover a fraction of the energy ``sum_i sigma_i^2``.
* Normalised spectrum (Supp. Sec. E.4): ``S / N**gamma``.

All functions accept a matrix, or (where noted) a vector of singular values, on any
device; they compute in float32 (float64 for float64 input).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "compute_dtype",
    "svd",
    "singular_values",
    "stable_rank",
    "energy_rank",
    "normalized_spectrum",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the pure math computes in: float64 for float64 input, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.no_grad()
def svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Reduced SVD ``(U, S, Vh)`` of a 2-D tensor in float32 (float64 for float64 input).

    On CUDA a failed default-driver SVD (ill-conditioned input) is retried with the
    ``gesvd`` driver, the robustness trick of the authors' mergekit port.
    """
    if matrix.ndim != 2:
        raise ValueError(f"svd expects a 2-D matrix, got shape {tuple(matrix.shape)}")
    work = matrix.to(compute_dtype(matrix.dtype))
    try:
        return torch.linalg.svd(work, full_matrices=False)
    except torch.linalg.LinAlgError:
        if work.device.type != "cuda":
            raise
        return torch.linalg.svd(work, full_matrices=False, driver="gesvd")


@torch.no_grad()
def singular_values(matrix: Tensor) -> Tensor:
    """Singular values of a 2-D tensor, descending, in float32 (float64 for float64 input)."""
    if matrix.ndim != 2:
        raise ValueError(f"singular_values expects a 2-D matrix, got shape {tuple(matrix.shape)}")
    return torch.linalg.svdvals(matrix.to(compute_dtype(matrix.dtype)))


def _spectrum(m_or_s: Tensor) -> Tensor:
    """Singular values of a matrix, or a given 1-D vector of singular values (float64)."""
    if m_or_s.ndim == 1:
        if bool((m_or_s < 0).any()):
            raise ValueError("a vector of singular values must be non-negative")
        return m_or_s.to(torch.float64)
    return singular_values(m_or_s).to(torch.float64)


@torch.no_grad()
def stable_rank(m_or_s: Tensor) -> float:
    """Stable rank ``||A||_F^2 / ||A||_2^2`` (Eq. 2) of a matrix or of its singular values.

    The zero matrix has stable rank 0.
    """
    s = _spectrum(m_or_s)
    if s.numel() == 0 or float(s.max()) == 0.0:
        return 0.0
    return float((s**2).sum() / s.max() ** 2)


@torch.no_grad()
def energy_rank(m_or_s: Tensor, frac: float = 0.9) -> int:
    """Cumulative energy rank (Supp. Sec. D): the smallest ``k`` with
    ``sum_{i<=k} sigma_i^2 / sum_i sigma_i^2 >= frac``. The zero matrix has rank 0.
    """
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"energy_rank: frac must be in (0, 1], got {frac}")
    s = torch.sort(_spectrum(m_or_s), descending=True).values
    energy = s**2
    total = float(energy.sum())
    if total == 0.0:
        return 0
    ratio = torch.cumsum(energy, dim=0) / total
    reached = torch.nonzero(ratio >= frac)
    # rounding may leave the last ratio a hair below 1: then all values are needed
    return int(reached[0]) + 1 if reached.numel() else int(s.numel())


def normalized_spectrum(s: Tensor, n_experts: int, gamma: float) -> Tensor:
    """``S / N**gamma`` (Supp. Sec. E.4): curves for different ``N`` collapse onto one
    where the singular values scale as ``O(N**gamma)``."""
    if n_experts < 1:
        raise ValueError(f"normalized_spectrum: n_experts must be >= 1, got {n_experts}")
    return s / float(n_experts) ** gamma
