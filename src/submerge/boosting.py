"""Subspace Boosting (Skorobogat et al., "Subspace-Boosted Model Merging",
arXiv 2506.16506, Sec. 4.1, Algorithm 1).

Per 2-D weight of the merged task vector: ``U S Vh = svd(W)``; ``idx`` = the first index
with ``cumsum(S) / sum(S) >= beta`` (the last index if there is none, as in the FusionBench
and mergekit ports); ``S' = clamp(S, min=S[idx])``; ``W' = U diag(S') Vh``. ``beta = 0``
gives ``S' = S[0]``, i.e. ``sigma_max * U Vh``; a zero matrix stays zero. The SVD runs in
float32 (float64 for float64 input) and the result is cast back.

Targets: only 2-D weights whose :class:`~submerge.layers.LayerInfo` kind is ``attn`` or
``mlp`` (never embeddings, norms, heads, biases), filtered by ``layers`` in
{"attn", "mlp", "both"}. ``attn_mode``: ``"per_qkv"`` (default) boosts each of the
``stacked`` equal row blocks of a fused matrix (open_clip's ``in_proj_weight`` = [Q; K; V])
separately, ``"full"`` boosts the fused matrix as one, ``"none"`` leaves attention alone.
Row-block splitting applies to attention only; MLP weights are boosted whole. Whether a
final projection such as open_clip's ``visual.proj`` is boosted (FusionBench does, the
paper speaks of "linear layers and attention layers") is the adapter's choice of its kind.

Boosting is odd and positively homogeneous, ``SB(a W) = a SB(W)``, so the merging
coefficient alpha and boosting commute: :func:`svd_factors` computes the SVDs once and
:func:`boost_from_factors` rebuilds ``alpha * SB_beta(W)`` for any grid point.

**The polar form.** With ``c = S[idx]``, ``S' = clamp(S, min=c)`` differs from the constant
``c`` only in its first ``idx`` entries, so ``U diag(S') Vh = c (U Vh) + U[:, :idx]
diag(S[:idx] - c) Vh[:idx]``. :func:`boost_from_factors` uses this form when ``idx <
POLAR_MAX_FRACTION * k`` (``k`` singular values): with the polar factor ``P = U Vh`` of each
row block computed once (:class:`BoostFactors` keeps it), every further beta costs a rank-idx
update and a scaling instead of a full product (for beta = 0, ``idx = 0``: ``S[0] P``); for
larger ``idx`` it rebuilds with the full product, as the literal :func:`boost_matrix` does.
The two forms are equal in exact arithmetic, not bitwise: the polar form agrees with the
literal :func:`subspace_boost` within ``‖a - b‖_F <= POLAR_RTOL[dtype] * ‖b‖_F`` (tested:
``tests/test_boosting.py``). Which form a block gets depends only on ``(S, beta)``, never on
whether ``P`` is cached, so every caller gets the same bits. ``beta=None`` (no boosting) is the
full product ``U diag(S) Vh``, unchanged. Memory: ``P`` is one dense matrix per boosted row
block, the size of the boosted matrix itself (about one model when every attention and MLP
weight is boosted).
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import torch
from torch import Tensor

from submerge.errors import ConfigError
from submerge.layers import LayerInfo
from submerge.merging.task_vectors import StateDict, check_layer_info
from submerge.spectral import compute_dtype, svd

log = logging.getLogger(__name__)

__all__ = [
    "LAYERS",
    "ATTN_MODES",
    "boost_cutoff",
    "boost_singular_values",
    "boost_matrix",
    "boost_targets",
    "subspace_boost",
    "svd_factors",
    "boost_from_factors",
    "BoostFactors",
    "POLAR_MAX_FRACTION",
    "POLAR_RTOL",
]

LAYERS = ("attn", "mlp", "both")
ATTN_MODES = ("per_qkv", "full", "none")

Factors = list[tuple[Tensor, Tensor, Tensor]]

POLAR_MAX_FRACTION = 0.5
"""The polar form rebuilds a block boosted at ``idx < POLAR_MAX_FRACTION * k``: a rank-idx
update (``2 m idx n`` flops) plus a scaling instead of ``2 m k n``; with ``P`` not yet computed
it costs at most 1.5 full products, once."""

POLAR_RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}
"""Relative Frobenius difference allowed between the polar form and the full product, by the
dtype of the factors (a few units of rounding times ``sqrt(k)``)."""


def _check_beta(beta: float, name: str = "beta") -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {beta!r}")
    return float(beta)


def boost_cutoff(s: Tensor, beta: float) -> int:
    """First index with ``cumsum(S) / sum(S) >= beta``; the last index if there is none
    (including ``sum(S) = 0``)."""
    beta = _check_beta(beta)
    if s.ndim != 1 or s.numel() == 0:
        raise ValueError(f"boost_cutoff expects a non-empty 1-D tensor of singular values, got shape {tuple(s.shape)}")
    work = s.to(compute_dtype(s.dtype))
    total = work.sum()
    if float(total) == 0.0:
        return s.numel() - 1
    reached = torch.nonzero(torch.cumsum(work, dim=0) / total >= beta)
    return int(reached[0]) if reached.numel() else s.numel() - 1


def boost_singular_values(s: Tensor, beta: float) -> Tensor:
    """``clamp(S, min=S[idx])`` with ``idx = boost_cutoff(S, beta)``; zero ``S`` stays zero."""
    return torch.clamp(s, min=s[boost_cutoff(s, beta)])


@torch.no_grad()
def boost_matrix(matrix: Tensor, beta: float) -> Tensor:
    """Algorithm 1 on one 2-D matrix, in its dtype."""
    _check_beta(beta)
    if matrix.ndim != 2:
        raise ValueError(f"boost_matrix expects a 2-D matrix, got shape {tuple(matrix.shape)}")
    if not bool(matrix.any()):
        return torch.zeros_like(matrix)
    u, s, vh = svd(matrix)
    return ((u * boost_singular_values(s, beta)) @ vh).to(matrix.dtype)


def _check_modes(layers: str, attn_mode: str) -> None:
    if layers not in LAYERS:
        raise ConfigError(f"layers must be one of {LAYERS}, got {layers!r}")
    if attn_mode not in ATTN_MODES:
        raise ConfigError(f"attn_mode must be one of {ATTN_MODES}, got {attn_mode!r}")


def boost_targets(
    layer_info: Mapping[str, LayerInfo], *, layers: str = "both", attn_mode: str = "per_qkv"
) -> dict[str, int]:
    """The keys to boost, each with the number of row blocks boosted separately."""
    _check_modes(layers, attn_mode)
    targets: dict[str, int] = {}
    for key in sorted(layer_info):
        info = layer_info[key]
        if info.kind == "mlp" and layers in ("mlp", "both"):
            targets[key] = 1
        elif info.kind == "attn" and layers in ("attn", "both") and attn_mode != "none":
            targets[key] = info.stacked if attn_mode == "per_qkv" else 1
    return targets


def _betas(beta: float | Mapping[str, float], kinds: set[str]) -> dict[str, float]:
    """``beta`` as ``{kind: beta}`` for the kinds being boosted."""
    if not isinstance(beta, Mapping):
        value = _check_beta(beta)
        return {kind: value for kind in ("attn", "mlp")}
    unknown = sorted(set(beta) - {"attn", "mlp"})
    if unknown:
        raise ConfigError(f"beta mapping has unknown key(s) {unknown}; allowed: 'attn', 'mlp'")
    missing = sorted(kinds - set(beta))
    if missing:
        raise ConfigError(f"beta mapping lacks a value for {missing}")
    return {kind: _check_beta(value, f"beta[{kind!r}]") for kind, value in beta.items()}


def _targets(delta: Mapping[str, Tensor], layer_info, layers: str, attn_mode: str):
    """(key, row blocks of delta[key]) for every 2-D target present in ``delta``."""
    check_layer_info(delta.keys(), layer_info)
    for key, blocks in boost_targets(layer_info, layers=layers, attn_mode=attn_mode).items():
        if key not in delta:
            continue
        matrix = delta[key]
        if matrix.ndim != 2:
            log.debug("not boosting %s: %d-D, only 2-D weights are boosted", key, matrix.ndim)
            continue
        if matrix.shape[0] % blocks:
            raise ValueError(f"key {key!r}: {matrix.shape[0]} rows cannot be split into {blocks} equal blocks")
        yield key, torch.chunk(matrix, blocks, dim=0)


@torch.no_grad()
def subspace_boost(
    delta: Mapping[str, Tensor],
    layer_info: Mapping[str, LayerInfo],
    *,
    beta: float | Mapping[str, float],
    layers: str = "both",
    attn_mode: str = "per_qkv",
) -> StateDict:
    """Subspace Boosting (Algorithm 1) of every target weight of ``delta``; other keys are
    returned unchanged. ``beta`` is one value or ``{"attn": b1, "mlp": b2}``."""
    _check_modes(layers, attn_mode)
    kinds = {"attn"} if layers == "attn" else {"mlp"} if layers == "mlp" else {"attn", "mlp"}
    if attn_mode == "none":
        kinds.discard("attn")
    betas = _betas(beta, kinds)
    out = dict(delta)
    for key, blocks in _targets(delta, layer_info, layers, attn_mode):
        b = betas[layer_info[key].kind]
        out[key] = torch.cat([boost_matrix(block, b) for block in blocks], dim=0)
    return out


@torch.no_grad()
def svd_factors(
    delta: Mapping[str, Tensor],
    layer_info: Mapping[str, LayerInfo],
    *,
    layers: str = "both",
    attn_mode: str = "per_qkv",
) -> dict[str, Factors]:
    """Per target key, the reduced SVD ``(U, S, Vh)`` of each row block (float32, or
    float64 for float64 input), for :func:`boost_from_factors`, as :class:`BoostFactors`."""
    return {key: BoostFactors(svd(block) for block in blocks)
            for key, blocks in _targets(delta, layer_info, layers, attn_mode)}


class BoostFactors(list):
    """The reduced SVDs ``(U, S, Vh)`` of the row blocks of one matrix (a list of 3-tuples,
    as :func:`svd_factors` returns and :mod:`submerge.io.hdf5` stores them), with the polar
    factor ``P = U Vh`` of each block computed on first use and kept, so that rebuilding the
    matrix at several betas (:func:`boost_from_factors`) computes it once. A cached ``P`` is
    used only while its block still holds the same ``U`` and ``Vh`` tensors."""

    def __init__(self, blocks=()):
        super().__init__(tuple(b) for b in blocks)
        for i, block in enumerate(self):
            if len(block) != 3:
                raise ValueError(f"BoostFactors: block {i} is not (U, S, Vh)")
        self._polar: dict[int, tuple[Tensor, Tensor, Tensor]] = {}

    @torch.no_grad()
    def polar(self, i: int) -> Tensor:
        """``U Vh`` of block ``i`` (cached)."""
        u, _, vh = self[i]
        cached = self._polar.get(i)
        if cached is not None and cached[0] is u and cached[1] is vh:
            return cached[2]
        p = u @ vh
        self._polar[i] = (u, vh, p)
        return p

    def polar_bytes(self) -> int:
        """Bytes held by the cached polar factors."""
        return sum(p.numel() * p.element_size() for _, _, p in self._polar.values())


def _boost_block(u: Tensor, s: Tensor, vh: Tensor, beta: float | None, alpha: float, polar) -> Tensor:
    """``alpha * U diag(boost_beta(S)) Vh`` of one block; ``polar()`` gives ``U Vh``."""
    if beta is None:
        return (u * (alpha * s)) @ vh
    idx = boost_cutoff(s, beta)
    if idx >= POLAR_MAX_FRACTION * s.numel():
        return (u * (alpha * torch.clamp(s, min=s[idx]))) @ vh
    c = s[idx]
    out = polar() * (alpha * c)
    if idx:
        out.addmm_(u[:, :idx] * (alpha * (s[:idx] - c)), vh[:idx])
    return out


@torch.no_grad()
def boost_from_factors(
    factors: Sequence[tuple[Tensor, Tensor, Tensor]],
    *,
    beta: float | None,
    alpha: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``alpha * U diag(boost_beta(S)) Vh`` per row block, blocks stacked along rows and
    cast to ``dtype``; ``beta=None`` rebuilds without boosting (the full product). Blocks
    boosted at a small cutoff use the polar form (module docstring): equal to
    ``alpha * subspace_boost(delta)[key]`` within :data:`POLAR_RTOL`. ``factors`` a
    :class:`BoostFactors` keeps each ``U Vh`` for the next call; a plain sequence computes
    it on the spot (same result, bitwise)."""
    if len(factors) == 0:
        raise ValueError("boost_from_factors: no factors given")
    if beta is not None:
        _check_beta(beta)
    cached = isinstance(factors, BoostFactors)
    blocks = []
    for i, (u, s, vh) in enumerate(factors):
        polar = (lambda i=i: factors.polar(i)) if cached else (lambda u=u, vh=vh: u @ vh)
        blocks.append(_boost_block(u, s, vh, beta, alpha, polar))
    out = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=0)  # one block: no copy
    return out.to(dtype)
