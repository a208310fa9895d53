"""Tests of submerge.hogsvd: regularised HO-GSVD (Eqs. 5, 31, 32), Alignment Matrix (Eq. 7),
common/unique split (Eq. 6), expert selection and Higher-Order Subspace Boosting (Alg. 2).

Oracles: float64 identities, literal readings of the equations (explicit inverses in the
tests), scipy's generalised symmetric eigensolver (classical GSVD), numpy's general
eigensolver, and planted decompositions ``A_i = Q_i Sigma_i V^T`` with orthonormal ``Q_i``
whose factors HO-GSVD must recover exactly.
"""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from submerge.errors import CheckpointError, ConfigError
from submerge.hogsvd import (
    alignment_matrix,
    alignment_objective,
    common_unique_parts,
    common_unique_split,
    higher_order_boost,
    higher_order_factors,
    hogsvd,
    hogsvd_merge,
    random_selection,
    s_matrix,
    select_experts,
)
from submerge.layers import LayerInfo

F64 = torch.float64
HYP = settings(max_examples=25, deadline=None)


def rand(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def literal_s(mats, pi):
    """Eqs. 31-32 read literally, with explicit inverses."""
    big = torch.cat(mats, 0)
    d = [a.T @ a + pi * big.T @ big for a in mats]
    n = len(mats)
    total = sum(
        d[i] @ torch.linalg.inv(d[j]) + d[j] @ torch.linalg.inv(d[i]) for i, j in itertools.combinations(range(n), 2)
    )
    return total / (n * (n - 1))


def planted(sigmas, m=None, seed=0):
    """``A_i = Q_i diag(sigma_i) Vp^T`` with orthonormal ``Q_i`` and unit-norm columns of ``Vp``."""
    n_mat, n = sigmas.shape
    m = m or n + 3
    vp = rand(n, n, seed=seed)
    vp = vp / vp.norm(dim=0)
    qs = [torch.linalg.qr(rand(m, n, seed=seed + 1 + i)).Q for i in range(n_mat)]
    return [q * s @ vp.T for q, s in zip(qs, sigmas)], qs, vp


def match_columns(v, vp):
    """Permutation p and signs with ``v[:, k] = sign_k * vp[:, p[k]]`` (by largest |cosine|)."""
    cos = v.T @ vp
    p = cos.abs().argmax(1)
    assert sorted(p.tolist()) == list(range(vp.shape[1]))
    return p, torch.sign(cos.gather(1, p[:, None]).squeeze(1))


# ------------------------------------------------------------------------- HO-GSVD


@st.composite
def matrix_sets(draw):
    n_mat = draw(st.integers(2, 4))
    n = draw(st.integers(1, 7))
    fat = draw(st.booleans())
    seed = draw(st.integers(0, 10_000))
    if fat:  # all the same fat shape: decomposed transposed
        m = draw(st.integers(1, max(1, n - 1))) if n > 1 else 1
        shapes = [(m, n + 1 + draw(st.integers(0, 3)))] * n_mat
    else:  # thin or square, possibly different row counts
        shapes = [(n + draw(st.integers(0, 4)), n) for _ in range(n_mat)]
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    return [scale * rand(*s, seed=seed + i) for i, s in enumerate(shapes)], fat


@HYP
@given(matrix_sets(), st.sampled_from([0.0, 1e-2, 0.5]))
def test_hogsvd_identities(case, pi):
    mats, fat = case
    res = hogsvd(mats, pi=pi)
    n = min(mats[0].shape) if fat else mats[0].shape[1]
    assert res.transposed == fat
    assert res.V.shape == (n, n) and res.sigma.shape == (len(mats), n) and res.eigvals.shape == (n,)
    # one shared V reconstructs every matrix (Eq. 5)
    for i, a in enumerate(mats):
        assert rel(res.reconstruct(i), a) < 1e-6
        assert res.U[i].shape == ((a.T if fat else a).shape[0], n)
    torch.testing.assert_close(res.V.norm(dim=0), torch.ones(n, dtype=F64))
    col_norms = torch.stack([u.norm(dim=0) for u in res.U])
    assert bool(((col_norms - 1).abs() < 1e-9).all())
    # eigenpairs of S_pi (Eq. 31), eigenvalues >= 1 and descending
    oriented = [a.T if fat else a for a in mats]
    s = literal_s(oriented, pi)
    assert float((s @ res.V - res.V * res.eigvals).norm()) <= 1e-8 * float(s.norm())
    assert bool((res.eigvals >= 1 - 1e-8).all())
    assert bool((res.eigvals[:-1] >= res.eigvals[1:]).all())


@HYP
@given(st.integers(2, 5), st.integers(1, 6), st.sampled_from([0.0, 1e-2, 1.0]), st.integers(0, 10_000))
def test_s_matrix_linear_form_equals_pairwise_and_literal(n_mat, n, pi, seed):
    mats = [rand(n + i, n, seed=seed + i) for i in range(n_mat)]
    lin = s_matrix(mats, pi=pi)
    pair = s_matrix(mats, pi=pi, pairwise=True)
    assert rel(lin, pair) < 1e-10
    assert rel(pair, literal_s(mats, pi)) < 1e-10


def test_eigenvectors_match_a_general_eigensolver():
    mats = [rand(12, 6, seed=i) for i in range(4)]
    res = hogsvd(mats)
    s = literal_s(mats, 1e-2).numpy()
    vals, vecs = np.linalg.eig(s)
    assert np.abs(vals.imag).max() < 1e-10
    order = np.argsort(-vals.real)
    np.testing.assert_allclose(res.eigvals.numpy(), vals.real[order], rtol=1e-10)
    vecs = vecs.real[:, order]
    vecs /= np.linalg.norm(vecs, axis=0)
    cos = np.abs(np.sum(vecs * res.V.numpy(), axis=0))
    np.testing.assert_allclose(cos, 1.0, atol=1e-9)


@pytest.mark.parametrize("m1, m2, n", [(8, 8, 5), (10, 6, 6), (7, 9, 3)])
def test_pi_zero_two_matrices_is_the_classical_gsvd(m1, m2, n):
    a1, a2 = rand(m1, n, seed=1), rand(m2, n, seed=2)
    res = hogsvd([a1, a2], pi=0.0)
    # classical GSVD: sigma_1k / sigma_2k = sqrt of the generalised eigenvalues of (A1^T A1, A2^T A2)
    gen = scipy.linalg.eigh((a1.T @ a1).numpy(), (a2.T @ a2).numpy(), eigvals_only=True)
    ratios = (res.sigma[0] / res.sigma[1]).numpy()
    np.testing.assert_allclose(np.sort(ratios), np.sqrt(np.sort(gen)), rtol=1e-9)
    # and the eigenvalue of S_0 is (r^2 + r^-2) / 2
    np.testing.assert_allclose(res.eigvals.numpy(), (ratios**2 + ratios**-2) / 2, rtol=1e-9)
    # B_1 = U_1 Sigma_1 has orthogonal columns in the two-matrix case
    gram = res.U[0].T @ res.U[0]
    torch.testing.assert_close(gram, torch.eye(n, dtype=F64), atol=1e-9, rtol=0)


@pytest.mark.parametrize("pi", [0.0, 1e-2])
def test_planted_decomposition_is_recovered(pi):
    sigmas = torch.rand(3, 6, generator=torch.Generator().manual_seed(3), dtype=F64) * 5 + 0.1
    mats, qs, vp = planted(sigmas)
    res = hogsvd(mats, pi=pi)
    p, signs = match_columns(res.V, vp)
    torch.testing.assert_close(res.V, vp[:, p] * signs, atol=1e-9, rtol=0)
    torch.testing.assert_close(res.sigma, sigmas[:, p], atol=1e-9, rtol=1e-9)
    for i in range(3):
        torch.testing.assert_close(res.U[i], qs[i][:, p] * signs, atol=1e-9, rtol=0)


def test_rank_deficient_inputs_need_pi():
    low_rank = [rand(10, 2, seed=i) @ rand(2, 6, seed=10 + i) for i in range(3)]  # rank 2 < 6 columns
    res = hogsvd(low_rank, pi=1e-2)
    for i, a in enumerate(low_rank):
        assert rel(res.reconstruct(i), a) < 1e-6
    assert bool(torch.isfinite(res.sigma).all())
    with pytest.raises(ValueError, match=r"matrix 0 is rank-deficient.*use pi > 0"):
        hogsvd(low_rank, pi=0.0)
    one_bad = [rand(10, 6, seed=1), low_rank[1]]
    with pytest.raises(ValueError, match="matrix 1 is rank-deficient"):
        hogsvd(one_bad, pi=0.0)
    shared_null = [rand(10, 5, seed=i) @ torch.eye(5, 6, dtype=F64) for i in range(3)]  # last column 0 everywhere
    with pytest.raises(ValueError, match="stacked matrix A .* rank-deficient"):
        hogsvd(shared_null, pi=1e-2)


def test_fat_orientation():
    mats = [rand(4, 9, seed=i) for i in range(3)]
    res = hogsvd(mats)
    assert res.transposed and res.V.shape == (4, 4) and res.U[0].shape == (9, 4)
    # forced non-transposed: 12 stacked rows >= 9 columns, so pi > 0 regularises the rank-4 D_i
    forced = hogsvd(mats, transpose=False)
    assert not forced.transposed and forced.V.shape == (9, 9)
    for i, a in enumerate(mats):
        assert rel(res.reconstruct(i), a) < 1e-6 and rel(forced.reconstruct(i), a) < 1e-6
    with pytest.raises(ValueError, match="stacked matrix A"):
        hogsvd(mats[:2], transpose=False)  # 8 stacked rows < 9 columns


def test_float32_and_dtype():
    mats = [rand(9, 5, seed=i, dtype=torch.float32) for i in range(3)]
    res = hogsvd(mats, dtype=torch.float32)
    assert res.V.dtype == torch.float32 and res.sigma.dtype == torch.float32
    assert rel(res.reconstruct(0).double(), mats[0].double()) < 1e-4
    assert hogsvd(mats).V.dtype == F64  # float64 by default
    with pytest.raises(ValueError, match="dtype"):
        hogsvd(mats, dtype=torch.float16)


@pytest.mark.parametrize(
    "mats, kwargs, message",
    [
        ([rand(5, 4), rand(5, 3)], {}, "different column counts.*matrix 1 is 5x3"),
        ([rand(5, 4)], {}, "N >= 2"),
        (
            [
                rand(5, 4),
                rand(5, 4).index_put_((torch.tensor([1]), torch.tensor([2])), torch.tensor(math.nan, dtype=F64)),
            ],
            {},
            "matrix 1 contains NaN",
        ),
        ([rand(5, 4), rand(5, 4)], {"pi": -1e-3}, "pi must be a finite number >= 0"),
        ([rand(5, 4), rand(5)], {}, "matrix 1 must be a 2-D tensor"),
        ([rand(5, 4), rand(6, 4)], {"transpose": True}, "different row counts"),
    ],
)
def test_bad_input(mats, kwargs, message):
    with pytest.raises(ValueError, match=message):
        hogsvd(mats, **kwargs)


# ------------------------------------------------------------------------- alignment, split


def test_alignment_matrix_is_eq7():
    sig = [torch.rand(4, m, generator=torch.Generator().manual_seed(m), dtype=F64) for m in (3, 7, 5)]
    sig[1][2, 4] = 0.0
    got = alignment_matrix(sig)
    eps = 1e-12
    want = torch.zeros(4, 4, dtype=F64)
    for i in range(4):
        for j in range(4):
            want[i, j] = sum(
                sum(abs(math.log((float(s[i, p]) + eps) / (float(s[j, p]) + eps))) for p in range(s.shape[1]))
                / s.shape[1]
                for s in sig
            ) / len(sig)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, got.T)
    assert bool((got.diagonal() == 0).all())
    with pytest.raises(ValueError, match="layer 1 has sigmas of 3 experts"):
        alignment_matrix([sig[0], sig[1][:3]])
    with pytest.raises(ValueError, match="negative"):
        alignment_matrix([-sig[0]])


def planted_experts(important, n=15, low=1.0, seed=0):
    """One expert per entry of ``important``: sigma = low, except on the expert's important
    directions, where it is 10..24 (distinct per direction, so that S_pi has no repeated
    eigenvalue: a repeated eigenvalue would leave HO-GSVD free to mix those directions)."""
    sig = torch.full((len(important), n), low, dtype=F64)
    for i, dirs in enumerate(important):
        sig[i, list(dirs)] = 10.0 + torch.tensor(list(dirs), dtype=F64)
    return planted(sig, seed=seed)[0]


def test_planted_alignment_and_selection():
    # expert 0 (pool) and 1 share their important subspace; 2, 3, 4 each use their own
    important = [range(0, 3), range(0, 3), range(3, 6), range(6, 9), range(9, 12)]
    sigmas = [hogsvd(planted_experts(important, seed=s)).sigma for s in (0, 100)]  # two "layers"
    align = alignment_matrix(sigmas)
    poorly, well = float(align[0, 1]), min(float(align[0, j]) for j in (2, 3, 4))
    assert poorly < 1e-6 and well > math.log(10) * 6 / 15  # poorly vs well aligned
    for strategy in ("greedy", "exhaustive"):
        chosen = select_experts(align, pool=[0], candidates=[1, 2, 3, 4], k=3, strategy=strategy)
        assert sorted(chosen) == [2, 3, 4]


@HYP
@given(
    st.integers(0, 10_000), st.integers(0, 3), st.integers(1, 6), st.integers(0, 6), st.sampled_from([0.0, 0.5, 1.0])
)
def test_greedy_vs_exhaustive(seed, n_pool, n_cand, k, weight):
    k = min(k, n_cand)
    size = n_pool + n_cand
    a = torch.rand(size, size, generator=torch.Generator().manual_seed(seed), dtype=F64)
    a = (a + a.T).fill_diagonal_(0)
    pool, cands = list(range(n_pool)), list(range(n_pool, size))
    greedy = select_experts(a, pool, cands, k, within_weight=weight)
    best = select_experts(a, pool, cands, k, strategy="exhaustive", within_weight=weight)
    assert len(set(greedy)) == k == len(best) and set(greedy) <= set(cands)
    brute = max(alignment_objective(a, pool, c, within_weight=weight) for c in itertools.combinations(cands, k))
    assert alignment_objective(a, pool, best, within_weight=weight) == pytest.approx(brute)
    g = alignment_objective(a, pool, greedy, within_weight=weight)
    assert g <= brute + 1e-12
    if weight == 0.0:  # separable objective: greedy is optimal
        assert g == pytest.approx(brute)


def test_selection_bad_input():
    a = torch.rand(5, 5, dtype=F64)
    with pytest.raises(ValueError, match=r"indices \[2\] are both in the pool and among the candidates"):
        select_experts(a, [0, 2], [2, 3], 1)
    with pytest.raises(ValueError, match="k=3"):
        select_experts(a, [0], [1, 2], 3)
    with pytest.raises(ValueError, match="out of range"):
        select_experts(a, [0], [1, 7], 1)
    with pytest.raises(ValueError, match="max_combinations"):
        select_experts(a, [0], [1, 2, 3, 4], 2, strategy="exhaustive", max_combinations=3)
    with pytest.raises(ValueError, match="strategy"):
        select_experts(a, [0], [1, 2], 1, strategy="best")


def test_random_selection():
    cands = list(range(3, 17))
    draws = random_selection(cands, 5, 10, seed=7)
    assert draws == random_selection(cands, 5, 10, seed=7)  # fixed seed: reproducible
    assert draws != random_selection(cands, 5, 10, seed=8)
    assert len(draws) == 10
    for d in draws:
        assert len(set(d)) == 5 and set(d) <= set(cands) and d == sorted(d)
    assert len({tuple(d) for d in draws}) > 1
    with pytest.raises(ValueError, match="k=15"):
        random_selection(cands, 15, 1, seed=0)


def test_common_unique_split_planted():
    # directions: 0-1 common (equal), 2 unique to expert 0, 3 unique to expert 2, 4-5 shared by experts 0, 1 only
    sig = torch.tensor(
        [[2.0, 1.0, 9.0, 1.0, 5.0, 4.0], [2.0, 1.0, 1.0, 1.0, 5.0, 4.0], [2.0, 1.0, 1.0, 30.0, 1.0, 1.0]], dtype=F64
    )
    split = common_unique_split(
        sig * 1.5 ** torch.rand(3, 6, generator=torch.Generator().manual_seed(0), dtype=F64), 2.0
    )
    assert split.common.tolist() == [True, True, False, False, False, False]
    want_unique = torch.zeros(3, 6, dtype=torch.bool)
    want_unique[0, 2] = want_unique[2, 3] = True
    assert torch.equal(split.unique, want_unique)
    # the parts of Eq. 6 on a planted decomposition: exactly the planted pieces, summing to A_i
    mats, qs, vp = planted(sig)
    res = hogsvd(mats)
    rsplit = common_unique_split(res.sigma, 2.0)
    p, _ = match_columns(res.V, vp)
    assert rsplit.common.tolist() == split.common[p].tolist()
    for i in range(3):
        common, unique = common_unique_parts(res, i, rsplit.common)
        torch.testing.assert_close(common + unique, mats[i], atol=1e-10, rtol=0)
        want = (qs[i][:, :2] * sig[i, :2]) @ vp[:, :2].T
        torch.testing.assert_close(common, want, atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match="threshold"):
        common_unique_split(sig, 1.0)


def test_common_unique_parts_fat():
    mats = [rand(3, 7, seed=i) for i in range(3)]
    res = hogsvd(mats)
    mask = torch.tensor([True, False, True])
    common, unique = common_unique_parts(res, 1, mask)
    assert common.shape == (3, 7)
    torch.testing.assert_close(common + unique, mats[1], atol=1e-10, rtol=0)


# ------------------------------------------------------------------------- Higher-Order SB


@pytest.mark.parametrize("shape", [(6, 6), (9, 5), (4, 8)])
def test_higher_order_factors_are_orthonormal(shape):
    mats = [rand(*shape, seed=i) for i in range(4)]
    u, s, vh = higher_order_factors(mats)
    r = min(shape)
    assert u.shape == (shape[0], r) and s.shape == (r,) and vh.shape == (r, shape[1])
    torch.testing.assert_close(u.T @ u, torch.eye(r, dtype=F64), atol=1e-10, rtol=0)
    torch.testing.assert_close(vh @ vh.T, torch.eye(r, dtype=F64), atol=1e-10, rtol=0)
    assert bool((s[:-1] >= s[1:]).all())
    res = hogsvd(mats)
    torch.testing.assert_close(s, res.sigma.sum(0).sort(descending=True).values)
    merged = higher_order_boost(mats, beta=None)
    # U_o, V_o orthonormal: the singular values of the result are Sigma_sum
    torch.testing.assert_close(torch.linalg.svdvals(merged), s, atol=1e-10, rtol=1e-10)


def test_procrustes_factors_are_nearest_orthonormal():
    # U_o minimises sum_i ||Q - U_i||_F^2 and V_o minimises ||Q - V||_F^2 over orthonormal Q
    mats = [rand(9, 5, seed=20 + i) for i in range(3)]
    res = hogsvd(mats)
    order = res.sigma.sum(0).argsort(descending=True)
    u, _, vh = higher_order_factors(mats)
    us = [ui[:, order] for ui in res.U]
    cost_u = lambda q: sum(float((q - ui).norm() ** 2) for ui in us)  # noqa: E731
    cost_v = lambda q: float((q - res.V[:, order]).norm() ** 2)  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    rivals_u = [torch.linalg.svd(ui, full_matrices=False) for ui in us]
    rivals_u = [p @ q for p, _, q in rivals_u]  # each expert's own nearest orthonormal matrix
    for _ in range(10):
        skew = torch.randn(5, 5, generator=gen, dtype=F64) * 1e-2
        rot = torch.linalg.matrix_exp(skew - skew.T)
        rivals_u.append(u @ rot)
        assert cost_v(vh.T) <= cost_v(vh.T @ rot) + 1e-12
    for q in rivals_u:
        assert cost_u(u) <= cost_u(q) + 1e-12


@pytest.mark.parametrize("shape", [(7, 5), (5, 8)])
def test_copies_of_one_matrix_reduce_to_svd(shape):
    m = rand(*shape, seed=5)
    torch.testing.assert_close(higher_order_boost([m] * 3, beta=None), 3 * m, atol=1e-10, rtol=0)


def test_beta_zero_flattens_the_spectrum():
    # Algorithm 1 with beta = 0: cutoff index 0, every singular value raised to the largest
    mats = [rand(8, 6, seed=i) for i in range(3)]
    _, s, _ = higher_order_factors(mats)
    boosted = higher_order_boost(mats, beta=0.0)
    torch.testing.assert_close(torch.linalg.svdvals(boosted), torch.full_like(s, float(s[0])), atol=1e-10, rtol=1e-10)


def test_device_and_dtype_preserved():
    mats = [rand(8, 6, seed=i, dtype=torch.float32) for i in range(3)]
    out = higher_order_boost(mats, beta=None)
    assert out.dtype == torch.float32 and out.device == mats[0].device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    mats = [rand(12, 8, seed=i) for i in range(3)]
    cpu = hogsvd(mats)
    gpu = hogsvd([m.cuda() for m in mats])
    assert gpu.V.is_cuda
    torch.testing.assert_close(gpu.V.cpu(), cpu.V, atol=1e-9, rtol=0)
    torch.testing.assert_close(gpu.sigma.cpu(), cpu.sigma, atol=1e-9, rtol=1e-9)
    out = higher_order_boost([m.cuda() for m in mats], beta=None)
    torch.testing.assert_close(out.cpu(), higher_order_boost(mats, beta=None), atol=1e-9, rtol=0)


# ------------------------------------------------------------------------- needs submerge.boosting


@pytest.fixture
def boosting():
    return pytest.importorskip("submerge.boosting")


@pytest.mark.parametrize("shape, beta", [((7, 5), 0.5), ((5, 8), 0.9), ((6, 6), 0.0), ((6, 6), 0.99)])
def test_copies_boosted_as_algorithm_1(boosting, shape, beta):
    m = rand(*shape, seed=6)
    got = higher_order_boost([m] * 4, beta=beta)
    torch.testing.assert_close(got, 4 * boosting.boost_matrix(m, beta), atol=1e-9, rtol=0)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.8, 0.99])
def test_beta_as_in_algorithm_1(boosting, beta):
    mats = [rand(9, 6, seed=10 + i) for i in range(3)]
    _, s, _ = higher_order_factors(mats)
    got = torch.linalg.svdvals(higher_order_boost(mats, beta=beta))
    torch.testing.assert_close(got, boosting.boost_singular_values(s, beta), atol=1e-10, rtol=1e-10)


def _toy_task_vectors(n_tasks=3, d=6):
    info = {
        "blocks.0.attn.in_proj_weight": LayerInfo(0, "attn", 3),
        "blocks.0.attn.out_proj.weight": LayerInfo(0, "attn"),
        "blocks.0.mlp.c_fc.weight": LayerInfo(0, "mlp"),
        "blocks.0.mlp.c_proj.weight": LayerInfo(0, "mlp"),
        "blocks.0.ln_1.weight": LayerInfo(0, "norm"),
        "proj": LayerInfo(None, "other"),
    }
    shapes = {
        "blocks.0.attn.in_proj_weight": (3 * d, d),
        "blocks.0.attn.out_proj.weight": (d, d),
        "blocks.0.mlp.c_fc.weight": (2 * d, d),
        "blocks.0.mlp.c_proj.weight": (d, 2 * d),
        "blocks.0.ln_1.weight": (d,),
        "proj": (d, 4),
    }
    tvs = [{k: rand(*s, seed=100 * t + i) for i, (k, s) in enumerate(shapes.items())} for t in range(n_tasks)]
    return tvs, info


def test_hogsvd_merge(boosting):
    tvs, info = _toy_task_vectors()
    merged = hogsvd_merge(tvs, info)
    targets = boosting.boost_targets(info, layers="both", attn_mode="per_qkv")
    assert targets["blocks.0.attn.in_proj_weight"] == 3 and "blocks.0.ln_1.weight" not in targets
    for key, blocks in targets.items():
        want = torch.cat(
            [higher_order_boost([tv[key].chunk(blocks)[b] for tv in tvs], beta=None) for b in range(blocks)]
        )
        torch.testing.assert_close(merged[key], want)
    for key in set(tvs[0]) - set(targets):
        torch.testing.assert_close(merged[key], sum(tv[key] for tv in tvs))
    # the pipeline's Subspace Boosting on the merge is exactly Algorithm 2
    for key, blocks in targets.items():
        for b in range(blocks):
            boosted = boosting.boost_matrix(merged[key].chunk(blocks)[b], 0.4)
            direct = higher_order_boost([tv[key].chunk(blocks)[b] for tv in tvs], beta=0.4)
            torch.testing.assert_close(boosted, direct, atol=1e-9, rtol=0)
    # a 1-D key marked "attn" is summed, as subspace_boost leaves 1-D weights alone
    info_bias = dict(info, **{"blocks.0.ln_1.weight": LayerInfo(0, "attn")})
    torch.testing.assert_close(
        hogsvd_merge(tvs, info_bias)["blocks.0.ln_1.weight"], sum(tv["blocks.0.ln_1.weight"] for tv in tvs)
    )
    uneven = dict(info, **{"blocks.0.attn.out_proj.weight": LayerInfo(0, "attn", 4)})
    with pytest.raises(CheckpointError, match="'blocks.0.attn.out_proj.weight': 6 rows cannot be split into 4"):
        hogsvd_merge(tvs, uneven)
    with pytest.raises(ConfigError, match="pi"):
        hogsvd_merge(tvs, info, pi=-1.0)
    bad = [dict(tv) for tv in tvs]
    bad[1]["blocks.0.mlp.c_fc.weight"] = torch.zeros(2 * 6, 6, dtype=F64)
    bad[0]["blocks.0.mlp.c_fc.weight"] = torch.zeros(2 * 6, 6, dtype=F64)
    bad[2]["blocks.0.mlp.c_fc.weight"] = torch.zeros(2 * 6, 6, dtype=F64)
    with pytest.raises(CheckpointError, match="'blocks.0.mlp.c_fc.weight', row block 0: the stacked matrix"):
        hogsvd_merge(bad, info)


# ------------------------------------------------------------------------- HO-GSVD cache


@pytest.mark.parametrize("shape", [(9, 5), (4, 8), (6, 6)])
def test_higher_order_factors_from_a_precomputed_basis(shape):
    mats = [rand(*shape, seed=30 + i) for i in range(3)]
    res = hogsvd(mats, pi=0.05)
    want = higher_order_factors(mats, pi=0.05)
    got = higher_order_factors(mats, basis=res.V.clone(), transpose=res.transposed)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    torch.testing.assert_close(
        higher_order_boost(mats, beta=0.5, basis=res.V, transpose=res.transposed),
        higher_order_boost(mats, beta=0.5, pi=0.05),
        atol=0,
        rtol=0,
    )
    with pytest.raises(ValueError, match="basis must be a"):
        higher_order_factors(mats, basis=res.V[:-1])


def _write_cache(path, tvs, info, pi, *, drop=(), attrs=None, experts=None):
    """The cache as the pipeline's hogsvd_group writes it: ``hogsvd(mats, pi=pi)`` per target
    (key, row block), file attributes pi and layers."""
    from submerge.boosting import boost_targets
    from submerge.io.hogsvd_cache import HOGSVDEntry, write_hogsvd_cache

    targets = boost_targets(info, layers="both", attn_mode="per_qkv")
    entries = []
    for key in sorted(targets):
        blocks = targets[key]
        for b in range(blocks):
            if (key, b) in drop:
                continue
            res = hogsvd([tv[key].chunk(blocks, dim=0)[b] for tv in tvs], pi=pi)
            entries.append(
                HOGSVDEntry(
                    key=key,
                    row_block=b,
                    kind=info[key].kind,
                    block=info[key].block,
                    V=res.V,
                    sigma=res.sigma,
                    eigvals=res.eigvals,
                    transposed=res.transposed,
                    seconds=0.0,
                )
            )
    experts = experts or [f"e{i}" for i in range(len(tvs))]
    write_hogsvd_cache(path, experts, entries, {"pi": pi, "layers": "both"} if attrs is None else attrs)
    return path


def test_hogsvd_merge_from_cache_is_bitwise(boosting, tmp_path, monkeypatch):
    from submerge.io.hogsvd_cache import read_hogsvd_cache

    tvs, info = _toy_task_vectors()
    pi = 0.05
    path = _write_cache(tmp_path / "g.h5", tvs, info, pi)
    cache = read_hogsvd_cache(path, with_basis=True)
    assert cache.attrs == {"pi": pi, "layers": "both"} and cache.path == str(path)
    want = hogsvd_merge(tvs, info, pi=pi)
    assert any(e.transposed for e in cache.entries)  # the fat c_proj is decomposed transposed

    def no_eigensolver(*args, **kwargs):
        raise AssertionError("eigen-solve with a cache")

    monkeypatch.setattr("submerge.hogsvd.hogsvd", no_eigensolver)
    for name in ("eigh", "eigvalsh", "eig", "eigvals"):
        monkeypatch.setattr(torch.linalg, name, no_eigensolver)
    for got in (
        hogsvd_merge(tvs, info, cache=cache),  # pi from the cache
        hogsvd_merge(tvs, info, cache=cache, pi=pi),
    ):
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), key
    with pytest.raises(AssertionError, match="eigen-solve"):
        hogsvd_merge(tvs, info, pi=pi)  # the check above would see one


def test_hogsvd_merge_cache_errors(boosting, tmp_path):
    from submerge.io.hogsvd_cache import read_hogsvd_cache

    tvs, info = _toy_task_vectors()
    path = _write_cache(tmp_path / "g.h5", tvs, info, 1e-2)
    cache = read_hogsvd_cache(path, with_basis=True)
    name = re.escape(str(path))
    with pytest.raises(CheckpointError, match=rf"{name} holds the HO-GSVD of 3 experts .* 2 task vectors"):
        hogsvd_merge(tvs[:2], info, cache=cache)
    with pytest.raises(CheckpointError, match=rf"{name} was computed with pi=0.01, the merge asks for pi=0.02"):
        hogsvd_merge(tvs, info, cache=cache, pi=0.02)
    with pytest.raises(ValueError, match="with_basis=True"):
        hogsvd_merge(tvs, info, cache=read_hogsvd_cache(path))
    missing = _write_cache(tmp_path / "m.h5", tvs, info, 1e-2, drop={("blocks.0.attn.in_proj_weight", 1)})
    with pytest.raises(
        CheckpointError,
        match=rf"{re.escape(str(missing))} has no entry for key 'blocks.0.attn.in_proj_weight', row block 1",
    ):
        hogsvd_merge(tvs, info, cache=read_hogsvd_cache(missing, with_basis=True))
    no_pi = _write_cache(tmp_path / "p.h5", tvs, info, 1e-2, attrs={})
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(no_pi))} does not record pi.*rule hogsvd"):
        hogsvd_merge(tvs, info, cache=read_hogsvd_cache(no_pi, with_basis=True))
    other_shape, other_info = _toy_task_vectors(d=4)
    with pytest.raises(CheckpointError, match=r"key 'blocks.0.attn.in_proj_weight', row block 0: V \(6, 6\)"):
        hogsvd_merge(other_shape, other_info, cache=cache)
    other = [{k: v.flip(0) for k, v in tv.items()} for tv in tvs]  # same shapes, other task vectors
    with pytest.raises(CheckpointError, match="cached sigma does not match"):
        hogsvd_merge(other, info, cache=cache)


def test_read_hogsvd_cache_checks_completeness(boosting, tmp_path):
    import h5py

    from submerge.io.hogsvd_cache import read_hogsvd_cache

    tvs, info = _toy_task_vectors()
    key = "blocks.0.mlp.c_fc.weight"
    cases = {
        "V": (f"{key}/0/V", True, r"lacks V:"),
        "sigma": (f"{key}/0/sigma", False, r"lacks sigma:"),
        "eigvals": (f"{key}/0/eigvals", False, r"lacks eigvals:"),
        "attr": (f"{key}/0@transposed", False, r"lacks attribute 'transposed'"),
        "experts": ("@experts", False, r"has no file attribute 'experts'"),
    }
    for label, (target, with_basis, message) in cases.items():
        path = _write_cache(tmp_path / f"{label}.h5", tvs, info, 1e-2)
        with h5py.File(path, "a") as f:
            obj, _, attr = target.partition("@")
            if attr:
                del (f[obj] if obj else f).attrs[attr]
            else:
                del f[obj]
        where = rf"HO-GSVD cache {re.escape(str(path))}" + (
            "" if label == "experts" else rf": key '{key}', row block 0"
        )
        with pytest.raises(CheckpointError, match=rf"{where} {message}.*delete it and rerun \(rule hogsvd\)"):
            read_hogsvd_cache(path, with_basis=with_basis)
    assert len(read_hogsvd_cache(tmp_path / "V.h5")[1]) == 6  # V is needed only with the basis
    path = _write_cache(tmp_path / "t.h5", tvs, info, 1e-2)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        CheckpointError, match=rf"HO-GSVD cache {re.escape(str(path))} is unreadable or truncated.*rule hogsvd"
    ):
        read_hogsvd_cache(path)
    (tmp_path / "junk.h5").write_bytes(b"not an HDF5 file")
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        read_hogsvd_cache(tmp_path / "junk.h5")
    with pytest.raises(FileNotFoundError):
        read_hogsvd_cache(tmp_path / "absent.h5")
