"""Regularised HO-GSVD, the Alignment Matrix, expert selection and Higher-Order Subspace
Boosting (Skorobogat et al., "Subspace-Boosted Model Merging", arXiv 2506.16506,
Sec. 4.2, Sec. 5.3, Supp. G (Algorithm 2, Eqs. 31-32) and H).

HO-GSVD (Ponnapalli et al. 2011, with the rank-deficiency regularisation of Kempf et al.
2023): N matrices ``A_i`` (``m_i x n``) are written ``A_i = U_i Sigma_i V^T`` (Eq. 5) with
one shared, generally non-orthogonal ``V``:

* ``D_i = A_i^T A_i + pi * A^T A`` with ``A`` the row stack of all ``A_i`` (Eq. 32);
* ``S_pi = 1/(N(N-1)) sum_{i<j} (D_i D_j^-1 + D_j D_i^-1)`` (Eq. 31), ``S_pi V = V Lambda``;
* ``B_i = A_i V^-T``, ``sigma_{i,k} = ||B_i[:, k]||``, ``U_i = B_i / sigma_i``.

How it is computed (:func:`hogsvd`): ``sum_{i!=j} D_i D_j^-1 = P Q - N I`` with
``P = sum_i D_i`` and ``Q = sum_j D_j^-1`` (linear in N instead of quadratic). ``S_pi`` is
not symmetric, and a general eigensolver may return complex eigenvectors in floating point
although theory says they are real. We never form ``S_pi``: with the Cholesky factor
``P = L L^T``, ``L^-1 (P Q) L = L^T Q L = sum_j X_j^T X_j`` where ``X_j = C_j^-1 L`` and
``D_j = C_j C_j^T`` (triangular solves, no explicit inverse). This matrix is symmetric
positive definite and similar to ``P Q``, so a *symmetric* eigensolver gives real
eigenpairs ``L^T Q L = W diag(mu) W^T``, and ``V = L W`` (columns normalised to unit norm)
are eigenvectors of ``S_pi`` with eigenvalues ``(mu - N) / (N (N-1))`` (all >= 1).
``U_i`` and ``sigma_i`` are then computed from ``V`` and the matrices alone
(``B_i = A_i V^-T`` by one LU factorisation of ``V``), so that a stored ``V`` (the HO-GSVD
cache, :mod:`submerge.io.hogsvd_cache`) reproduces them bitwise without the eigenproblem
(``higher_order_factors(..., basis=V)``, ``hogsvd_merge(..., cache=...)``).

Conventions:

* Components are ordered by **descending** eigenvalue of ``S_pi`` (most expert-specific
  directions first; eigenvalue 1 marks directions equally significant in all matrices).
* Columns of ``V`` have unit norm; each column's sign is fixed so that its entry of
  largest magnitude is positive (deterministic across devices).
* Numerically degenerate eigenvalues (relative gap below ``sqrt(eps)``) leave the basis of
  their eigenspace free. Within such a cluster we choose the basis in which ``V``'s columns
  are mutually orthogonal (eigenvectors of ``W_c^T L^T L W_c``, descending). For N copies
  of one matrix (``S_pi = I``) this makes HO-GSVD the ordinary SVD. Note that ``S_pi`` is
  symmetric in the experts: directions that play the same role for different experts (e.g.
  one unique to expert 1 and one unique to expert 2, with equal sigma ratios) share an
  eigenvalue, and HO-GSVD itself cannot tell them apart.
* ``U_i`` columns whose ``sigma_{i,k}`` is zero to working precision
  (``<= n * eps * max_k sigma_{i,k}``) are set to zero.
* Orientation: if all matrices have the same shape ``m x n`` with ``m < n`` (fat), the
  transposes are decomposed (so that ``n`` is the smaller dimension and ``D_i`` can be full
  rank); ``HOGSVDResult.transposed`` says so and ``U_i``, ``V`` then refer to the
  transposes: ``A_i^T = U_i Sigma_i V^T``. ``transpose=True/False`` forces a choice.
* Computation in float64 by default (``dtype``); results stay in that dtype.
* A matrix is *numerically singular* when ``lambda_min <= n * eps * lambda_max``. The
  stacked ``A^T A`` must be non-singular (else no ``pi`` helps); with ``pi`` so small that
  ``pi / (1 + N pi) <= n * eps`` every ``A_i^T A_i`` must be non-singular too, i.e. every
  ``A_i`` must have full column rank (use ``pi > 0`` for rank-deficient inputs).
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from submerge.errors import CheckpointError, ConfigError
from submerge.layers import LayerInfo
from submerge.merging.source import TaskVectorSource, as_source
from submerge.merging.task_arithmetic import sum_tensors
from submerge.merging.task_vectors import StateDict, check_layer_info
from submerge.merging.tsv import polar_factor

if TYPE_CHECKING:
    from submerge.io.hogsvd_cache import HOGSVDCache

log = logging.getLogger(__name__)

__all__ = [
    "HOGSVDResult",
    "hogsvd",
    "s_matrix",
    "alignment_matrix",
    "SubspaceSplit",
    "common_unique_split",
    "common_unique_parts",
    "alignment_objective",
    "select_experts",
    "random_selection",
    "higher_order_factors",
    "higher_order_boost",
    "hogsvd_merge",
    "hogsvd_merge_items",
]

EPS_ALIGN = 1e-12  # Eq. 7
DEFAULT_PI = 1e-2  # regularisation pi of Eq. 32 (config hogsvd.pi)
# hogsvd_merge with a cache: the recomputed sum_i sigma_i must match the cached one to this
# relative (norm-wise) tolerance times sqrt(eps), else the cache is from other task vectors
_SIGMA_TOL = 100.0


@dataclass(frozen=True)
class HOGSVDResult:
    """``A_i = U[i] diag(sigma[i]) V^T`` (of ``A_i^T`` when ``transposed``).

    V:          ``n x n`` shared basis, unit-norm columns (not orthogonal in general).
    sigma:      ``N x n`` generalised singular values.
    U:          list of ``m_i x n`` matrices with unit-norm (or zero) columns.
    eigvals:    ``n`` eigenvalues of ``S_pi``, descending (component order).
    transposed: whether the transposes of the inputs were decomposed.
    """

    V: Tensor
    sigma: Tensor
    U: list[Tensor]
    eigvals: Tensor
    transposed: bool

    def reconstruct(self, i: int) -> Tensor:
        """``U_i diag(sigma_i) V^T`` in the input's orientation."""
        rec = (self.U[i] * self.sigma[i]) @ self.V.T
        return rec.T if self.transposed else rec


# ----------------------------------------------------------------------------- checks


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")


def _check_pi(pi: float) -> None:
    if isinstance(pi, bool) or not (isinstance(pi, (int, float)) and math.isfinite(pi) and pi >= 0):
        raise ValueError(f"pi must be a finite number >= 0, got {pi!r}")


def _oriented(matrices: Sequence[Tensor], transpose: bool | None, dtype: torch.dtype) -> tuple[list[Tensor], bool]:
    """Check the inputs and return them in the decomposed orientation, cast to ``dtype``."""
    _check_dtype(dtype)
    if len(matrices) < 2:
        raise ValueError(f"HO-GSVD needs N >= 2 matrices, got {len(matrices)}")
    for i, a in enumerate(matrices):
        _check_matrix(i, a, matrices[0].device)
    shapes = [tuple(a.shape) for a in matrices]
    if transpose is None:
        _check_same(shapes, 1, "column")
        transpose = len(set(shapes)) == 1 and shapes[0][0] < shapes[0][1]
    elif transpose:
        _check_same(shapes, 0, "row")  # rows become columns
    else:
        _check_same(shapes, 1, "column")
    mats = [(a.T if transpose else a).to(dtype) for a in matrices]
    return mats, bool(transpose)


def _check_matrix(i: int, a: Tensor, device: torch.device) -> None:
    """Input ``i`` is a finite, non-empty 2-D float tensor on ``device``."""
    if not isinstance(a, Tensor) or a.ndim != 2:
        shape = tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__
        raise ValueError(f"matrix {i} must be a 2-D tensor, got {shape}")
    if not a.is_floating_point():
        raise ValueError(f"matrix {i} has non-float dtype {a.dtype}")
    if a.numel() == 0:
        raise ValueError(f"matrix {i} is empty (shape {tuple(a.shape)})")
    if not bool(torch.isfinite(a).all()):
        raise ValueError(f"matrix {i} contains NaN or Inf values")
    if a.device != device:
        raise ValueError(f"matrix {i} is on {a.device}, matrix 0 on {device}")


def _check_same(shapes: list[tuple[int, int]], dim: int, what: str) -> None:
    for i, shape in enumerate(shapes):
        if shape[dim] != shapes[0][dim]:
            raise ValueError(
                f"matrices have different {what} counts: matrix 0 is {shapes[0][0]}x{shapes[0][1]}, "
                f"matrix {i} is {shape[0]}x{shape[1]} (HO-GSVD needs the same number of {what}s)"
            )


def _singular_check(mat: Tensor, what: str) -> None:
    """Raise if the symmetric PSD ``mat`` is singular to working precision."""
    ev = torch.linalg.eigvalsh(mat)
    tol = mat.shape[0] * torch.finfo(mat.dtype).eps * ev[-1].clamp_min(0)
    if not bool(ev[0] > tol):
        raise ValueError(what + f" (smallest/largest eigenvalue {ev[0].item():.3g}/{ev[-1].item():.3g})")


def _regularised(mats: list[Tensor], pi: float) -> tuple[list[Tensor], Tensor]:
    """``D_i`` (Eq. 32) and ``P = sum_i D_i``, with singularity checks."""
    _check_pi(pi)
    n_mat, n = len(mats), mats[0].shape[1]
    grams = [a.T @ a for a in mats]
    gram = torch.stack(grams).sum(0)
    _singular_check(
        gram,
        f"the stacked matrix A (all {n_mat} matrices, {n} columns) is rank-deficient: A^T A is singular, "
        "so D_i = A_i^T A_i + pi A^T A is singular for every pi",
    )
    eps = torch.finfo(mats[0].dtype).eps
    if pi / (1 + n_mat * pi) <= n * eps:
        for i, g in enumerate(grams):
            _singular_check(
                g,
                f"matrix {i} is rank-deficient (A_{i}^T A_{i} is singular; it needs full column rank {n}) "
                f"and pi={pi} does not regularise it: use pi > 0 (e.g. the default 1e-2)",
            )
    d = [g + pi * gram for g in grams]
    p = (1 + n_mat * pi) * gram  # = sum_i D_i
    return d, p


def _cholesky(mat: Tensor, what: str) -> Tensor:
    factor, info = torch.linalg.cholesky_ex(mat)
    if int(info) != 0:
        raise ValueError(f"{what} is not positive definite to working precision (Cholesky failed); use a larger pi")
    return factor


# ----------------------------------------------------------------------------- HO-GSVD


@torch.no_grad()
def s_matrix(
    matrices: Sequence[Tensor],
    *,
    pi: float = DEFAULT_PI,
    pairwise: bool = False,
    dtype: torch.dtype = torch.float64,
    transpose: bool | None = None,
) -> Tensor:
    """``S_pi`` of Eq. 31, formed explicitly (for checks and benchmarks; :func:`hogsvd`
    does not need it).

    ``pairwise=False``: ``((sum_i D_i)(sum_j D_j^-1) - N I) / (N(N-1))``, N Cholesky solves.
    ``pairwise=True``: the literal sum over pairs ``i<j`` of ``D_i D_j^-1 + D_j D_i^-1``,
    ``N(N-1)`` Cholesky solves (``D_i D_j^-1 = (D_j^-1 D_i)^T``).
    """
    mats, _ = _oriented(matrices, transpose, dtype)
    d, p = _regularised(mats, pi)
    n_mat, n = len(mats), mats[0].shape[1]
    chol = [_cholesky(dj, f"D_{j}") for j, dj in enumerate(d)]
    if pairwise:
        total = torch.zeros_like(p)
        for i, j in itertools.combinations(range(n_mat), 2):
            total += torch.cholesky_solve(d[i], chol[j]).T + torch.cholesky_solve(d[j], chol[i]).T
    else:
        total = torch.stack([torch.cholesky_solve(p, c).T for c in chol]).sum(0)  # P D_j^-1, summed
        total -= n_mat * torch.eye(n, dtype=p.dtype, device=p.device)
    return total / (n_mat * (n_mat - 1))


def _orthogonal_within_ties(mu: Tensor, w: Tensor, low: Tensor) -> Tensor:
    """Within clusters of numerically equal ``mu`` (descending), rotate ``w`` so that the
    columns of ``low @ w`` are mutually orthogonal (ordered by descending norm)."""
    tol = math.sqrt(torch.finfo(mu.dtype).eps) * float(mu.abs().max())
    gaps = ((mu[:-1] - mu[1:]) > tol).nonzero().flatten().tolist()
    bounds = [0] + [k + 1 for k in gaps] + [len(mu)]
    gram = None
    for start, stop in zip(bounds[:-1], bounds[1:]):
        if stop - start > 1:
            gram = low.T @ low if gram is None else gram
            wc = w[:, start:stop]
            _, rot = torch.linalg.eigh(wc.T @ gram @ wc)
            w[:, start:stop] = wc @ rot.flip(1)
            log.debug("HO-GSVD: %d numerically equal eigenvalues at component %d", stop - start, start)
    return w


@torch.no_grad()
def hogsvd(
    matrices: Sequence[Tensor],
    *,
    pi: float = DEFAULT_PI,
    dtype: torch.dtype = torch.float64,
    transpose: bool | None = None,
) -> HOGSVDResult:
    """Regularised HO-GSVD (Eqs. 5, 31, 32; Kempf et al. 2023) of N >= 2 matrices.

    See the module docstring for the algorithm (a symmetric eigenproblem similar to
    ``S_pi``, so eigenvectors are real by construction), the component order (descending
    eigenvalue), the orientation rule for fat matrices and the singularity errors.
    Raises ``ValueError`` on N < 2, non-2-D input, different column counts, NaN/Inf,
    ``pi < 0`` and (numerically) singular ``D_i``.
    """
    mats, transposed = _oriented(matrices, transpose, dtype)
    d, p = _regularised(mats, pi)
    n_mat, n = len(mats), mats[0].shape[1]
    low = _cholesky(p, "sum_i D_i")
    whitened = torch.zeros_like(p)
    for j, dj in enumerate(d):
        x = torch.linalg.solve_triangular(_cholesky(dj, f"D_{j}"), low, upper=False)  # C_j^-1 L
        whitened += x.T @ x  # L^T D_j^-1 L
    mu, w = torch.linalg.eigh((whitened + whitened.T) / 2)
    mu, w = mu.flip(0), w.flip(1)  # descending
    w = _orthogonal_within_ties(mu, w, low)
    v = low @ w
    idx = v.abs().argmax(0)
    signs = torch.sign(v.gather(0, idx[None]))
    signs[signs == 0] = 1
    v = v * signs
    v = v / v.norm(dim=0)
    us, sigma = _factors_from_basis(mats, v)
    eigvals = (mu - n_mat) / (n_mat * (n_mat - 1))
    return HOGSVDResult(V=v, sigma=sigma, U=us, eigvals=eigvals, transposed=transposed)


class _BasisFactors:
    """``U_i`` and ``sigma_i`` of ``A_i = U_i diag(sigma_i) V^T`` for a shared basis ``V``, one
    oriented matrix at a time (same dtype and device as ``V``): ``B_i = A_i V^-T`` (one LU
    factorisation of ``V``, one solve per matrix), ``sigma_ik = ||B_i[:, k]||``,
    ``U_i = B_i / sigma_i`` with columns of zero ``sigma_ik`` (to working precision) set to
    zero. The one place these are computed (:func:`hogsvd` and a cached basis alike).

    :meth:`add` keeps only ``sum_i U_i`` (in the order added) and ``sigma`` (``n_matrices x n``,
    filled row by row: one allocation, not one per matrix between the large temporaries), so
    that Algorithm 2's factors need one matrix at a time (the merge streams the experts)."""

    def __init__(self, v: Tensor, n_matrices: int = 0):
        self.v = v
        self.lu, self.pivots, info = torch.linalg.lu_factor_ex(v)
        if int(info) != 0:
            raise ValueError("the shared basis V is singular")
        self.tol = v.shape[0] * torch.finfo(v.dtype).eps
        self.u_sum: Tensor | None = None
        self.sigma = v.new_empty(n_matrices, v.shape[0])
        self.added = 0

    def factor(self, a: Tensor) -> tuple[Tensor, Tensor]:
        """``(U_i, sigma_i)`` of one oriented matrix."""
        b = torch.linalg.lu_solve(self.lu, self.pivots, a.T).T  # V B^T = A^T
        s = b.norm(dim=0)
        nonzero = s > self.tol * s.max()
        return torch.where(nonzero, b / torch.where(nonzero, s, 1), 0), s

    def add(self, a: Tensor) -> None:
        u, s = self.factor(a)
        self.u_sum = u if self.u_sum is None else self.u_sum + u
        self.sigma[self.added] = s
        self.added += 1


def _factors_from_basis(mats: list[Tensor], v: Tensor) -> tuple[list[Tensor], Tensor]:
    """``U_i`` (a list) and ``sigma`` (``N x n``) of the oriented matrices ``mats`` for the
    shared basis ``v`` (:class:`_BasisFactors`)."""
    basis = _BasisFactors(v)
    us, sigmas = zip(*(basis.factor(a) for a in mats))
    return list(us), torch.stack(sigmas)


# ----------------------------------------------------------------------------- alignment


@torch.no_grad()
def alignment_matrix(sigmas: Sequence[Tensor], *, eps: float = EPS_ALIGN) -> Tensor:
    """Alignment Matrix, Eq. 7: ``A_ij = 1/L sum_l 1/M_l sum_p |log((s_ip + eps)/(s_jp + eps))|``.

    ``sigmas``: one ``N x M_l`` tensor of generalised singular values per layer (the
    caller chooses the layers, e.g. one layer kind, or all of them for the mean of
    Fig. 13d). Larger = better aligned = less interference (Sec. 4.2). Computed in
    float64, returned in the dtype of ``sigmas[0]``. Symmetric with zero diagonal.
    """
    if len(sigmas) == 0:
        raise ValueError("alignment_matrix needs at least one layer's sigma tensor")
    total = None
    for layer_idx, s in enumerate(sigmas):
        if not isinstance(s, Tensor) or s.ndim != 2 or s.shape[1] == 0:
            raise ValueError(f"sigma tensor of layer {layer_idx} must be a non-empty 2-D (N x M) tensor")
        if s.shape[0] != sigmas[0].shape[0]:
            raise ValueError(f"layer {layer_idx} has sigmas of {s.shape[0]} experts, layer 0 of {sigmas[0].shape[0]}")
        if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
            raise ValueError(f"sigma tensor of layer {layer_idx} contains NaN/Inf or negative values")
        logs = torch.log(s.to(device=sigmas[0].device, dtype=torch.float64) + eps)
        layer = (logs[:, None, :] - logs[None, :, :]).abs().mean(-1)
        total = layer if total is None else total + layer
    return (total / len(sigmas)).to(sigmas[0].dtype)


@dataclass(frozen=True)
class SubspaceSplit:
    """Direction masks of Eq. 6 over the ``n`` shared directions.

    common: ``(n,)`` bool, every pair of experts within a factor ``threshold``.
    unique: ``(N, n)`` bool, ``unique[i, k]``: expert i's ``sigma_k`` exceeds every other
            expert's by at least the factor ``threshold`` (at most one True per column).
    Directions in neither set are shared by some but not all experts.
    """

    common: Tensor
    unique: Tensor


@torch.no_grad()
def common_unique_split(sigma: Tensor, threshold: float, *, eps: float = EPS_ALIGN) -> SubspaceSplit:
    """Common / unique directions (Eq. 6) from an ``N x n`` sigma tensor.

    Direction k is *common* if ``|log((s_ik+eps)/(s_jk+eps))| <= log(threshold)`` for all
    pairs, and *unique to expert i* if ``(s_ik+eps) >= threshold * (s_jk+eps)`` for all
    ``j != i``. ``threshold > 1``.
    """
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 1):
        raise ValueError(f"threshold must be a finite number > 1, got {threshold!r}")
    if sigma.ndim != 2 or sigma.shape[0] < 2:
        raise ValueError(f"sigma must be an N x n tensor with N >= 2, got shape {tuple(sigma.shape)}")
    if not bool(torch.isfinite(sigma).all()) or bool((sigma < 0).any()):
        raise ValueError("sigma contains NaN/Inf or negative values")
    logs = torch.log(sigma.to(torch.float64) + eps)
    log_t = math.log(threshold)
    common = (logs.max(0).values - logs.min(0).values) <= log_t
    top2 = logs.topk(2, dim=0)
    winner_margin = top2.values[0] - top2.values[1]
    unique = torch.zeros_like(logs, dtype=torch.bool)
    unique.scatter_(0, top2.indices[:1], (winner_margin >= log_t)[None])
    return SubspaceSplit(common=common, unique=unique)


@torch.no_grad()
def common_unique_parts(result: HOGSVDResult, i: int, common: Tensor) -> tuple[Tensor, Tensor]:
    """Eq. 6: ``A_i = common part + unique part`` (input orientation).

    common part = ``sum_{k in common} sigma_ik u_ik v_k^T``; unique part = the same sum over
    all other directions (those unique to expert i and those shared by only some
    experts), so the two parts sum to ``A_i``. ``common``: ``(n,)`` bool mask, e.g.
    ``common_unique_split(...).common``.
    """
    if not 0 <= i < len(result.U):
        raise ValueError(f"expert index {i} out of range for {len(result.U)} matrices")
    if common.shape != result.sigma.shape[1:] or common.dtype != torch.bool:
        raise ValueError(f"common must be a bool mask of shape {tuple(result.sigma.shape[1:])}")
    mask = common.to(result.sigma.device)
    scaled = result.U[i] * result.sigma[i]
    parts = [(scaled * m) @ result.V.T for m in (mask, ~mask)]
    return tuple(p.T if result.transposed else p for p in parts)


# ----------------------------------------------------------------------------- selection


def _check_selection(alignment: Tensor, pool: Sequence[int], candidates: Sequence[int], k: int) -> Tensor:
    if alignment.ndim != 2 or alignment.shape[0] != alignment.shape[1]:
        raise ValueError(f"alignment must be a square matrix, got shape {tuple(alignment.shape)}")
    if not bool(torch.isfinite(alignment).all()):
        raise ValueError("alignment matrix contains NaN or Inf values")
    size = alignment.shape[0]
    for name, idx in (("pool", pool), ("candidates", candidates)):
        bad = [i for i in idx if not 0 <= i < size]
        if bad:
            raise ValueError(f"{name} indices {bad} out of range for a {size}x{size} alignment matrix")
        if len(set(idx)) != len(idx):
            raise ValueError(f"{name} indices contain duplicates: {list(idx)}")
    both = sorted(set(pool) & set(candidates))
    if both:
        raise ValueError(f"indices {both} are both in the pool and among the candidates")
    if not 0 <= k <= len(candidates):
        raise ValueError(f"k={k} must lie in 0..{len(candidates)} (the number of candidates)")
    # the greedy selection indexes this small N x N matrix entry by entry: on the host (one
    # transfer), not one device synchronisation per entry
    a = alignment.detach().to("cpu", torch.float64)
    return (a + a.T) / 2


def _score(a: Tensor, pool: list[int], selected: list[int], within_weight: float) -> float:
    with_pool = float(a[selected][:, pool].sum()) if selected and pool else 0.0
    within = float(a[selected][:, selected].triu(1).sum()) if selected else 0.0
    return with_pool + within_weight * within


def alignment_objective(
    alignment: Tensor, pool: Sequence[int], selected: Sequence[int], *, within_weight: float = 1.0
) -> float:
    """Alignment objective of the expert selection (higher = less interference, Sec. 5.3;
    not the pipeline's validation score of a merged model):
    ``sum_{c in selected, p in pool} A_cp + within_weight * sum_{c<c' in selected} A_cc'``.

    With ``within_weight=1`` this is the total pairwise alignment of the merged set
    ``pool + selected`` minus the constant pool-internal part; ``within_weight=0`` scores
    the alignment with the pool only (the paper's wording).
    """
    a = _check_selection(alignment, pool, selected, len(selected))
    return _score(a, list(pool), list(selected), within_weight)


def select_experts(
    alignment: Tensor,
    pool: Sequence[int],
    candidates: Sequence[int],
    k: int,
    *,
    strategy: str = "greedy",
    within_weight: float = 1.0,
    max_combinations: int = 1_000_000,
) -> list[int]:
    """Choose ``k`` candidates that maximise :func:`alignment_objective` with the pre-selected
    ``pool`` (indices into the alignment matrix over pool + candidates).

    ``strategy="greedy"``: add, one at a time, the candidate with the largest gain
    ``sum_p A_cp + within_weight * sum_{s chosen} A_cs`` (ties: smallest index); returned in
    the order chosen. Exact when ``within_weight=0``.
    ``strategy="exhaustive"``: the best of all ``C(len(candidates), k)`` subsets (ties: the
    lexicographically first), sorted; ``ValueError`` if more than ``max_combinations``.
    """
    a = _check_selection(alignment, pool, candidates, k)
    pool, candidates = list(pool), list(candidates)
    if strategy == "greedy":
        chosen: list[int] = []
        gain = {c: float(a[c, pool].sum()) if pool else 0.0 for c in candidates}
        for _ in range(k):
            best = max(sorted(gain), key=lambda c: gain[c])  # max keeps the first (smallest) on ties
            chosen.append(best)
            del gain[best]
            for c in gain:
                gain[c] += within_weight * float(a[c, best])
        return chosen
    if strategy == "exhaustive":
        count = math.comb(len(candidates), k)
        if count > max_combinations:
            raise ValueError(
                f"exhaustive selection would score {count} subsets (> max_combinations={max_combinations})"
            )
        best_set, best_score = None, -math.inf
        for subset in itertools.combinations(sorted(candidates), k):
            score = _score(a, pool, list(subset), within_weight)
            if score > best_score:
                best_set, best_score = list(subset), score
        return best_set
    raise ValueError(f"strategy must be 'greedy' or 'exhaustive', got {strategy!r}")


def random_selection(candidates: Sequence[int], k: int, draws: int, seed: int) -> list[list[int]]:
    """The random baseline: ``draws`` independent draws of ``k`` distinct candidates
    (each sorted), reproducible from ``seed`` (Python's ``random.Random``)."""
    if not 0 <= k <= len(candidates):
        raise ValueError(f"k={k} must lie in 0..{len(candidates)} (the number of candidates)")
    if draws < 0:
        raise ValueError(f"draws must be >= 0, got {draws}")
    rng = random.Random(seed)
    return [sorted(rng.sample(list(candidates), k)) for _ in range(draws)]


# ----------------------------------------------------------------------------- HO-SB


@torch.no_grad()
def higher_order_factors(
    matrices: Sequence[Tensor],
    *,
    pi: float = DEFAULT_PI,
    dtype: torch.dtype = torch.float64,
    basis: Tensor | None = None,
    transpose: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Orthonormal factors of Algorithm 2 (lines 7-14), as ``(U, S, Vh)`` in the inputs'
    orientation: ``S`` descending, ``U``, ``Vh`` with orthonormal columns / rows.

    * ``U_o`` = the generalised orthogonal Procrustes solution over ``U_1..U_N``: the
      orthonormal matrix nearest to all of them, ``argmin_Q sum_i ||Q - U_i||_F^2 =
      polar(sum_i U_i)`` (closed form; no per-expert rotations, which would break the
      correspondence between columns and ``Sigma``);
    * ``V_o = polar(V)`` (orthogonal Procrustes);
    * ``S = sum_i sigma_i``, sorted descending, ``U_o``/``V_o`` columns permuted alike.

    ``U_o diag(S) V_o^T`` is then itself an SVD, so Subspace Boosting applies directly.
    Computed in ``dtype`` (float64 default); returned in that dtype.

    ``basis``: a precomputed shared basis ``V`` (``n x n``, e.g. from the HO-GSVD cache) in
    the orientation ``transpose`` (as in :func:`hogsvd`; ``None``: its automatic rule). Then
    no eigenproblem is solved and ``pi`` is not used (``V`` already fixes it): ``U_i``,
    ``sigma_i`` are computed from ``V`` and the matrices exactly as :func:`hogsvd` computes
    them, so with ``basis=hogsvd(matrices, pi=pi, transpose=transpose).V`` (float64) the
    result is bitwise that of the call without ``basis``.
    """
    if basis is None:
        res = hogsvd(matrices, pi=pi, dtype=dtype, transpose=transpose)
        u_sum = res.U[0]
        for u in res.U[1:]:
            u_sum = u_sum + u
        return _procrustes(u_sum, res.sigma, res.V, res.transposed)
    mats, transposed = _oriented(matrices, transpose, dtype)
    factors = _BasisFactors(_checked_basis(basis, mats[0], transposed), len(mats))
    for a in mats:
        factors.add(a)
    return _procrustes(factors.u_sum, factors.sigma, factors.v, transposed)


def _checked_basis(basis: Tensor, first: Tensor, transposed: bool) -> Tensor:
    """A given shared basis ``V`` as ``n x n`` in ``first``'s (an oriented matrix's) dtype and
    device, checked."""
    n = first.shape[1]
    if not isinstance(basis, Tensor) or tuple(basis.shape) != (n, n):
        shape = tuple(basis.shape) if isinstance(basis, Tensor) else type(basis).__name__
        raise ValueError(
            f"basis must be a {n}x{n} tensor ({'transposed' if transposed else 'input'} orientation), got {shape}"
        )
    v = basis.to(device=first.device, dtype=first.dtype)
    if not bool(torch.isfinite(v).all()):
        raise ValueError("basis contains NaN or Inf values")
    return v


def _procrustes(u_sum: Tensor, sigma: Tensor, v: Tensor, transposed: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Lines 12-14 of Algorithm 2 from ``sum_i U_i`` (summed in expert order), ``sigma``
    (``N x n``) and ``V``: ``(U_o, S, V_o^T)`` in the inputs' orientation."""
    u_o = polar_factor(u_sum)
    v_o = polar_factor(v)
    s, order = sigma.sum(0).sort(descending=True)
    u_o, v_o = u_o[:, order], v_o[:, order]
    if transposed:  # A^T = U_o S V_o^T  <=>  A = V_o S U_o^T
        u_o, v_o = v_o, u_o
    return u_o, s, v_o.T


@torch.no_grad()
def higher_order_boost(
    matrices: Sequence[Tensor],
    *,
    beta: float | None,
    pi: float = DEFAULT_PI,
    dtype: torch.dtype = torch.float64,
    basis: Tensor | None = None,
    transpose: bool | None = None,
) -> Tensor:
    """Higher-Order Subspace Boosting, Algorithm 2 (Supp. G) for one weight matrix:
    ``U_o boost_beta(Sigma_sum) V_o^T`` with the factors of :func:`higher_order_factors`
    (``basis``, ``transpose``: a precomputed shared basis, see there) and Algorithm 1's rule
    (:func:`submerge.boosting.boost_singular_values`). ``beta=None``: no boosting,
    ``U_o diag(Sigma_sum) V_o^T``. Returned on the inputs' device in the inputs' dtype
    (computed in ``dtype``).
    """
    u, s, vh = higher_order_factors(matrices, pi=pi, dtype=dtype, basis=basis, transpose=transpose)
    if beta is not None:
        from submerge.boosting import boost_singular_values

        s = boost_singular_values(s, beta)
    return _compose(u, s, vh, matrices[0].dtype)


def _compose(u: Tensor, s: Tensor, vh: Tensor, dtype: torch.dtype) -> Tensor:
    return ((u * s) @ vh).to(dtype)


def _cache_bases(
    cache: HOGSVDCache,
    src: TaskVectorSource,
    work: list[tuple[str, int]],
    pi: float | None,
) -> tuple[float, dict[tuple[str, int], object], str]:
    """Check ``cache`` against the merge (π, expert count, every (key, row block) of ``work``
    present with matching shapes and orientation) and index its entries by (key, row block).
    Returns (π of the cache, index, how to name the cache in messages)."""
    path = getattr(cache, "path", None)
    where = f"HO-GSVD cache {path}" if path else "the HO-GSVD cache"
    redo = "delete it and rerun (rule hogsvd)"
    attrs = getattr(cache, "attrs", None)
    if attrs is None:
        raise TypeError(
            "cache must be what read_hogsvd_cache(path, with_basis=True) returns, "
            f"got {type(cache).__name__}"
        )
    experts, entries = cache
    if "pi" not in attrs:
        raise CheckpointError(f"{where} does not record pi (file attribute 'pi'): {redo}")
    cache_pi = float(attrs["pi"])
    if pi is not None and float(pi) != cache_pi:
        raise CheckpointError(f"{where} was computed with pi={cache_pi!r}, the merge asks for pi={pi!r}: {redo}")
    n_mat = len(src)
    if len(experts) != n_mat:
        raise CheckpointError(
            f"{where} holds the HO-GSVD of {len(experts)} experts {list(experts)}, the merge has {n_mat} task vectors"
        )
    index = {(e.key, e.row_block): e for e in entries}
    for key, blocks in work:
        rows, cols = src.meta(key)[0]
        rows //= blocks
        transposed, n = rows < cols, min(rows, cols)  # hogsvd's automatic orientation
        for b in range(blocks):
            e = index.get((key, b))
            if e is None:
                raise CheckpointError(
                    f"{where} has no entry for key {key!r}, row block {b} (written for other layers "
                    f"or another model?): {redo}"
                )
            if e.V.numel() == 0:
                raise ValueError(f"{where}: no basis V loaded; read it with read_hogsvd_cache(path, with_basis=True)")
            got = (tuple(e.V.shape), tuple(e.sigma.shape), bool(e.transposed))
            want = ((n, n), (n_mat, n), transposed)
            if got != want:
                raise CheckpointError(
                    f"{where}, key {key!r}, row block {b}: V {got[0]}, sigma {got[1]}, transposed={got[2]} "
                    f"do not fit {n_mat} task vectors of row block shape {(rows, cols)} "
                    f"(want V {want[0]}, sigma {want[1]}, transposed={want[2]}): {redo}"
                )
    return cache_pi, index, where


@torch.no_grad()
def hogsvd_merge(
    task_vectors: Sequence[StateDict] | TaskVectorSource,
    layer_info: Mapping[str, LayerInfo],
    *,
    pi: float | None = None,
    layers: str = "both",
    attn_mode: str = "per_qkv",
    dtype: torch.dtype = torch.float64,
    cache: HOGSVDCache | None = None,
) -> StateDict:
    """Merge rule "hogsvd": the unboosted Higher-Order reconstruction (Algorithm 2 without
    line 15) for every 2-D attention/MLP target of
    :func:`submerge.boosting.boost_targets` (each row block separately, e.g. W_q, W_k, W_v
    of a fused ``in_proj_weight``), ``sum_t Delta_t`` for every other key (1-D targets too).
    Computed in ``dtype`` (float64 default), returned in the task vectors' dtype.

    Since ``U_o``, ``V_o`` are orthonormal, the SVD of the result is ``(U_o, Sigma_sum, V_o)``,
    so the pipeline's ordinary Subspace Boosting step applied afterwards gives exactly
    Algorithm 2 (``higher_order_boost`` with ``beta``).

    ``cache``: the group's HO-GSVD cache as returned by
    ``submerge.io.hogsvd_cache.read_hogsvd_cache(path, with_basis=True)`` (no file is read here;
    with ``with_basis="lazy"`` each key's bases are read when the key is merged) (experts,
    entries and the file attribute ``pi``). Each target's shared basis ``V`` (and
    orientation) is then taken from the cache and no eigenproblem is solved; ``U_i``,
    ``sigma_i`` are recomputed from ``V`` as :func:`hogsvd` does, so the result is bitwise
    that of the merge without a cache when the cache was written from ``hogsvd(mats, pi=pi)``
    (float64, same device). ``CheckpointError`` (naming the file and the key) when the cache
    lacks ``pi``, was computed with another ``pi``, holds another number of experts, misses
    a target (key, row block) or has shapes that do not fit, or when its ``sigma`` does not
    match the recomputed one (a cache of other task vectors). The experts' identity and
    order are the caller's to check (``cache.experts``).

    ``pi``: regularisation of Eq. 32. ``None`` (default): the cache's π, or
    ``DEFAULT_PI`` (1e-2) without a cache. Given with a cache, it must equal the cache's.
    """
    return dict(hogsvd_merge_items(task_vectors, layer_info, pi=pi, layers=layers,
                                   attn_mode=attn_mode, dtype=dtype, cache=cache))


def hogsvd_merge_items(
    task_vectors: Sequence[StateDict] | TaskVectorSource,
    layer_info: Mapping[str, LayerInfo],
    *,
    pi: float | None = None,
    layers: str = "both",
    attn_mode: str = "per_qkv",
    dtype: torch.dtype = torch.float64,
    cache: HOGSVDCache | None = None,
) -> Iterator[tuple[str, Tensor]]:
    """:func:`hogsvd_merge` one key at a time, in sorted order (the inputs and the cache are
    checked at the call)."""
    from submerge.boosting import boost_targets

    if pi is not None:
        try:
            _check_pi(pi)
        except ValueError as err:
            raise ConfigError(f"merge rule 'hogsvd': hyperparameter {err}") from None
    src = as_source(task_vectors)
    keys = src.keys
    if len(src) < 2:
        raise ValueError(f"hogsvd merge needs at least 2 task vectors, got {len(src)}")
    check_layer_info(keys, layer_info)
    targets = boost_targets(layer_info, layers=layers, attn_mode=attn_mode)
    work = [(key, targets[key]) for key in keys if key in targets and len(src.meta(key)[0]) == 2]
    for key, blocks in work:  # like subspace_boost: only 2-D weights
        rows = src.meta(key)[0][0]
        if rows % blocks:
            raise CheckpointError(f"key {key!r}: {rows} rows cannot be split into {blocks} equal blocks")
    index, where = None, ""
    if cache is not None:
        pi, index, where = _cache_bases(cache, src, work, pi)
    elif pi is None:
        pi = DEFAULT_PI
    return _hogsvd_merge_items(src, dict(work), index, pi, dtype, where)


@torch.no_grad()
def _hogsvd_merge_items(src: TaskVectorSource, blocks_of: Mapping[str, int], index, pi: float,
                        dtype: torch.dtype, where: str) -> Iterator[tuple[str, Tensor]]:
    for key in src.iter_keys("HO-GSVD merge"):
        yield key, _hogsvd_merge_key(key, src.read(key), blocks_of.get(key), index, pi, dtype, where)


def _hogsvd_merge_key(key: str, tensors: Sequence[Tensor], blocks: int | None, index, pi: float,
                      dtype: torch.dtype, where: str) -> Tensor:
    """One parameter of :func:`hogsvd_merge` (``blocks``: its row blocks; None: not a target).
    With cached bases the experts are read one at a time (:func:`_factors_from_cache`); the
    HO-GSVD itself needs all of them at once."""
    first = tensors[0]
    if blocks is None:
        return sum_tensors(tensors).to(first.dtype)
    if index is not None:
        factors = _factors_from_cache(key, tensors, [index[key, b] for b in range(blocks)], dtype)
    else:
        mats = list(tensors)
        factors = []
        for b in range(blocks):
            try:
                factors.append(higher_order_factors([x.chunk(blocks, dim=0)[b] for x in mats], pi=pi,
                                                    dtype=dtype))
            except ValueError as err:
                raise CheckpointError(f"key {key!r}, row block {b}: {err}") from err
    parts = []
    for b, (u, s, vh) in enumerate(factors):
        entry = None if index is None else index[key, b]
        if entry is not None:
            want = entry.sigma.to(s.device, torch.float64).sum(0).sort(descending=True).values
            diff = float((s.to(torch.float64) - want).norm())
            if not diff <= _SIGMA_TOL * math.sqrt(torch.finfo(dtype).eps) * float(want.norm()):
                raise CheckpointError(
                    f"{where}, key {key!r}, row block {b}: the cached sigma does not match the task vectors "
                    f"(relative difference {diff / float(want.norm()):.3g}; a cache of other task vectors?): "
                    "delete it and rerun (rule hogsvd)"
                )
        parts.append(_compose(u, s, vh, first.dtype))
    return torch.cat(parts, dim=0)


def _factors_from_cache(key: str, tensors: Sequence[Tensor], entries: Sequence, dtype: torch.dtype
                        ) -> list[tuple[Tensor, Tensor, Tensor]]:
    """:func:`higher_order_factors` with each row block's cached basis, for every row block of
    one key, reading the experts one at a time (``tensors`` in expert order; a source has
    checked that their shapes agree): the same operations in the same order, so the same
    result, holding one expert's matrix plus ``sum_i U_i`` per block."""
    _check_dtype(dtype)
    blocks = len(entries)
    factors: list[_BasisFactors | None] = [None] * blocks
    device = tensors[0].device
    for i, x in enumerate(tensors):
        for b, (chunk, entry) in enumerate(zip(x.chunk(blocks, dim=0), entries)):
            try:
                _check_matrix(i, chunk, device)
                a = (chunk.T if entry.transposed else chunk).to(dtype)
                if factors[b] is None:  # a cached basis read lazily is loaded now, one key at a time
                    basis = entry.V if isinstance(entry.V, Tensor) else entry.V.load()
                    factors[b] = _BasisFactors(_checked_basis(basis, a, entry.transposed), len(tensors))
                factors[b].add(a)
            except ValueError as err:
                raise CheckpointError(f"key {key!r}, row block {b}: {err}") from err
    return [_procrustes(f.u_sum, f.sigma, f.v, entry.transposed) for f, entry in zip(factors, entries)]
