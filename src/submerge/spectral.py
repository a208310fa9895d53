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

import math

import torch
from torch import Tensor

__all__ = [
    "compute_dtype",
    "svd",
    "top_svd",
    "top_svd_gram",
    "top_svd_ritz",
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
    ``gesvd`` driver, the robustness trick of the authors' mergekit port. On the CPU a failed
    float32 SVD (LAPACK ``gesdd`` not converging, e.g. on Iso-CTS' stacked bases when two experts
    are identical) is retried in float64 and returned in float32; inputs it does not fail on
    are untouched.
    """
    if matrix.ndim != 2:
        raise ValueError(f"svd expects a 2-D matrix, got shape {tuple(matrix.shape)}")
    work = matrix.to(compute_dtype(matrix.dtype))
    try:
        return torch.linalg.svd(work, full_matrices=False)
    except torch.linalg.LinAlgError:
        if work.device.type == "cuda":
            return torch.linalg.svd(work, full_matrices=False, driver="gesvd")
        if work.dtype == torch.float64:
            raise
        u, s, vh = torch.linalg.svd(work.to(torch.float64), full_matrices=False)
        return u.to(work.dtype), s.to(work.dtype), vh.to(work.dtype)


# Truncated decomposition (top_svd): matrices whose smaller side is below this use the full SVD
# (it costs microseconds there, and small models keep bitwise their earlier results)
TRUNCATED_MIN_DIM = 256


@torch.no_grad()
def top_svd_gram(matrix: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """The top ``r`` singular triplets ``(U_r, S_r, Vh_r)`` of a 2-D tensor ``A`` from the
    eigendecomposition of its smaller Gram matrix (``A^T A`` or ``A A^T``), formed and
    decomposed in float64, or ``None`` where that is not accurate.

    The Gram matrix squares the condition number; in float64 that costs the float32 result
    nothing (measured on TSV-M inputs: 5-10x closer to the float64 SVD than the float32 SVD
    is) and the symmetric eigensolver is 1.5-3x cheaper than the float32 SVD of a 3072x768
    matrix on one CPU thread (as fast for 768x768). Refused (``None``) when

    * ``sigma_r = 0``, or ``sigma_r`` and ``sigma_{r+1}`` coincide to float64 precision
      (``(sigma_r^2 - sigma_{r+1}^2) / sigma_1^2 < 16 eps_64``): no top-``r`` subspace;
    * the other side's vectors ``A v_i / sigma_i`` are not orthonormal to 4096 eps of the
      result's dtype (4.9e-4 for float32, 9.1e-13 for float64 input): too ill-conditioned.

    Singular vectors are determined up to sign (and rotation within equal singular values), as
    for any SVD. Returned in float32 (float64 for float64 input)."""
    if matrix.ndim != 2:
        raise ValueError(f"top_svd_gram expects a 2-D matrix, got shape {tuple(matrix.shape)}")
    out_dtype = compute_dtype(matrix.dtype)
    work = matrix.to(torch.float64)
    m, n = work.shape
    k = min(m, n)
    if not 0 <= r <= k:
        raise ValueError(f"top_svd_gram: r={r} outside 0..{k} for shape {(m, n)}")
    if r == 0:
        return (work.new_zeros(m, 0, dtype=out_dtype), work.new_zeros(0, dtype=out_dtype),
                work.new_zeros(0, n, dtype=out_dtype))
    tall = m >= n
    lam, vecs = torch.linalg.eigh(work.T @ work if tall else work @ work.T)  # ascending
    lam, vecs = lam.flip(0), vecs.flip(1)
    top = float(lam[0])
    gap_ok = r == k or float(lam[r - 1] - lam[r]) >= 16 * torch.finfo(torch.float64).eps * top
    if not (float(lam[r - 1]) > 0 and gap_ok):
        return None
    s = lam[:r].sqrt()
    basis = vecs[:, :r]
    other = (work @ basis) / s if tall else (basis.T @ work) / s[:, None]
    other_gram = other.T @ other if tall else other @ other.T
    eye = torch.eye(r, dtype=torch.float64, device=work.device)
    if not float((other_gram - eye).abs().max()) <= 4096 * torch.finfo(out_dtype).eps:
        return None
    u, vh = (other, basis.T) if tall else (basis, other)
    return u.to(out_dtype), s.to(out_dtype), vh.to(out_dtype)


# Ritz path (top_svd_ritz): extra Gram eigenvectors kept beyond r (the oversampling p = max(16, r)),
# subspace iterations, and the accuracy check's thresholds in units of the result dtype's eps
RITZ_MIN_OVERSAMPLE = 16
RITZ_ITERATIONS = 1
RITZ_RESIDUAL_EPS = 1.5
RITZ_EIGENVALUE_EPS = 16


def _top_gram_eigvecs(work: Tensor, q: int) -> tuple[Tensor, Tensor]:
    """The top ``q`` eigenpairs ``(lam, V)`` (descending) of the smaller Gram matrix of ``work``
    (``A^T A`` if tall, ``A A^T`` if wide), in ``work``'s dtype. CPU: the Gram matrix's upper
    triangle by BLAS ``syrk`` and only the wanted eigenvectors by LAPACK ``syevr`` (SciPy);
    other devices: ``torch.linalg.eigh`` of the full Gram matrix on that device."""
    m, n = work.shape
    k = min(m, n)
    if work.device.type == "cpu":
        from scipy.linalg import blas, eigh

        x = work.detach().contiguous().numpy().T  # Fortran-ordered n x m: no copy for BLAS
        syrk = blas.dsyrk if work.dtype == torch.float64 else blas.ssyrk
        gram = syrk(1.0, x, trans=0 if m >= n else 1)  # upper triangle
        lam, vecs = eigh(gram, lower=False, subset_by_index=[k - q, k - 1], driver="evr",
                         check_finite=False, overwrite_a=True)
        return (torch.from_numpy(lam.copy()).flip(0),
                torch.from_numpy(vecs[:, ::-1].copy()))
    lam, vecs = torch.linalg.eigh(work.T @ work if m >= n else work @ work.T)
    return lam[k - q:].flip(0), vecs[:, k - q:].flip(1)


@torch.no_grad()
def top_svd_ritz(matrix: Tensor, r: int, *, oversample: int | None = None,
                 iterations: int = RITZ_ITERATIONS) -> tuple[Tensor, Tensor, Tensor] | None:
    """The top ``r`` singular triplets ``(U_r, S_r, Vh_r)`` of a 2-D tensor ``A`` by a
    Rayleigh-Ritz step on ``A`` itself, in float32 (float64 for float64 input), or ``None``
    where the a-posteriori check finds them not accurate.

    1. ``q = r + p`` (``p = max(16, r)``) top eigenvectors ``V`` of the smaller Gram matrix,
       formed in the compute dtype, and only those eigenvectors computed (LAPACK ``syevr`` on
       CPU; a full ``eigh`` on other devices);
    2. ``iterations`` (1) subspace iteration(s) ``V <- orth(A^T A V)`` with ``A``, not the Gram
       matrix;
    3. Rayleigh-Ritz: the SVD of ``A V`` (``m x q``) gives ``U``, ``S`` and ``V W``.

    Accuracy check (``None`` when it fails): every returned pair has the residual
    ``||A^T u_i - s_i v_i||`` (the other side for a wide ``A``; computed in float64) at most
    ``1.5 sqrt(k) eps s_1`` (``k`` = smaller side; 42 eps ``s_1`` for k = 768). A singular
    vector's angle error is bounded by its residual over its gap to the next singular value, and
    a float32 SVD's residuals measure 3-17 eps ``s_1`` (0.2-0.6 ``sqrt(k)`` eps) on the same
    inputs, so the accepted vectors are at most ~3-10x as far off as the float32 SVD's (TSV-M's
    polar factors weigh every vector alike, whatever its singular value). Also
    ``|s_i^2 - lam_i| <= 16 sqrt(k) eps lam_1`` against the Gram matrix's eigenvalues (no top
    direction missed by the subspace). Refused, e.g., for a power-law spectrum ``i**-2`` (the
    float32 Gram matrix cannot resolve singular values near ``sqrt(eps) sigma_1``).

    Stated tolerance (relative Frobenius distance of a TSV-M merged layer to the float64
    full-SVD TSV-M, ``bench/bench_tsv.py``, ``bench/stream.md``): where the cut ``r`` lies in a
    noise bulk with ~1 % gaps, 0.5-7x (typically 1.5-3x) the float32 full SVD's own distance
    (1.5e-4-5e-4 there: TSV-M's polar factors amplify per-vector errors), i.e. 2e-4-1.7e-3; on
    a power-law spectrum ``i**-1`` within 2x of it (<= 1.5e-5). ``tests/test_tsv_truncated.py``
    asserts <= 3x on its inputs. Singular vectors are determined up to sign and rotation within
    (near-)equal singular values, as for any SVD."""
    if matrix.ndim != 2:
        raise ValueError(f"top_svd_ritz expects a 2-D matrix, got shape {tuple(matrix.shape)}")
    dtype = compute_dtype(matrix.dtype)
    work = matrix.to(dtype)
    m, n = work.shape
    k = min(m, n)
    if not 0 <= r <= k:
        raise ValueError(f"top_svd_ritz: r={r} outside 0..{k} for shape {(m, n)}")
    if r == 0:
        return work.new_zeros(m, 0), work.new_zeros(0), work.new_zeros(0, n)
    tall = m >= n
    q = min(k, r + max(RITZ_MIN_OVERSAMPLE, r) if oversample is None else r + oversample)
    lam, basis = _top_gram_eigvecs(work, q)
    lam, basis = lam.to(work.device), basis.to(work.device)
    a = work if tall else work.T  # tall view: the basis spans its row space
    for _ in range(iterations):
        basis = torch.linalg.qr(a.T @ (a @ basis)).Q
    ub, sb, wh = torch.linalg.svd(a @ basis, full_matrices=False)
    u, s, v = ub[:, :r], sb[:r], basis @ wh[:r].T
    eps = torch.finfo(dtype).eps
    top = float(sb[0])
    if not top > 0 or not float(s[-1]) > 0:
        return None
    # a v_i = s_i u_i holds by construction; the other side's residual, in float64 (a float32
    # residual would drown in its own rounding, ~sqrt(m) eps s_1)
    a64 = a.to(torch.float64)
    residual = float((a64.T @ u.to(torch.float64) - v.to(torch.float64) * s.to(torch.float64))
                     .norm(dim=0).max())
    eig_gap = float((s.double() ** 2 - lam[:r].double()).abs().max())
    if not (residual <= RITZ_RESIDUAL_EPS * math.sqrt(k) * eps * top
            and eig_gap <= RITZ_EIGENVALUE_EPS * math.sqrt(k) * eps * top ** 2):
        return None
    return (u, s, v.T) if tall else (v, s, u.T)


@torch.no_grad()
def top_svd(matrix: Tensor, r: int, *, truncated: bool | None = None,
            method: str = "ritz") -> tuple[Tensor, Tensor, Tensor]:
    """The top ``r`` singular triplets ``(U[:, :r], S[:r], Vh[:r])`` of a 2-D tensor.

    ``truncated``: ``True`` tries the truncated decomposition and falls back where its check
    finds it not accurate; ``False`` always uses the full :func:`svd`; ``None`` (default) tries
    it when the smaller side is at least ``TRUNCATED_MIN_DIM`` (256) and ``r`` at most a quarter
    of it (TSV-M from 4 tasks on); smaller matrices keep the full SVD bitwise.
    ``method``: ``"ritz"`` (default) :func:`top_svd_ritz`, falling back to :func:`top_svd_gram`
    and then to the full SVD; ``"gram"``: :func:`top_svd_gram`, falling back to the full SVD."""
    if method not in ("ritz", "gram"):
        raise ValueError(f"top_svd: method must be 'ritz' or 'gram', got {method!r}")
    if truncated is None:
        k = min(matrix.shape)
        truncated = k >= TRUNCATED_MIN_DIM and 4 * r <= k
    if truncated:
        out = top_svd_ritz(matrix, r) if method == "ritz" else None
        if out is None:
            out = top_svd_gram(matrix, r)
        if out is not None:
            return out
    u, s, vh = svd(matrix)
    return u[:, :r], s[:r], vh[:r, :]


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
