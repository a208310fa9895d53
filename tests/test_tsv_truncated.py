"""TSV-M's truncated decomposition (spectral.top_svd_ritz): the known top triplets, the accuracy
of the merged layer against an independent float64 full-SVD TSV-M, and the fall backs."""

from __future__ import annotations

import math

import pytest
import torch

from submerge.merging.tsv import tsv_m_key
from submerge.spectral import top_svd, top_svd_gram, top_svd_ritz


def orthonormal(rows, k, g):
    return torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64))[0]


def known_svd(m, n, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, v = orthonormal(m, len(s), g), orthonormal(n, len(s), g)
    s = torch.tensor(s, dtype=torch.float64)
    return (u * s) @ v.T, u, s, v


def noise_bulk(m, n, t, seed=0):
    """Shared rank-16 + own rank-8 parts + Gaussian noise: the cut r = min(m, n) // t lies in the
    noise bulk (~1 % gaps between neighbouring singular values), as in bench/bench_real_shape.py."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(m, 16, generator=g) @ torch.randn(16, n, generator=g)
    return [(0.1 * torch.randn(m, n, generator=g)
             + (shared + torch.randn(m, 8, generator=g) @ torch.randn(8, n, generator=g)) / math.sqrt(24))
            for _ in range(t)]


def power_law(m, n, t, alpha, seed=0):
    """Singular values i**-alpha with random singular vectors, one matrix per task."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    s = torch.arange(1, k + 1, dtype=torch.float64) ** -alpha
    return [((orthonormal(m, k, g) * s) @ orthonormal(n, k, g).T).float() for _ in range(t)]


def reference_tsv_m(tvs):
    """TSV-M written out from the paper with float64 full SVDs (independent of submerge)."""
    x = [t.double() for t in tvs]
    m, n = x[0].shape
    k, n_tasks = min(m, n), len(x)
    r = k // n_tasks
    big_u, big_s, big_vh = torch.zeros(m, k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64), \
        torch.zeros(k, n, dtype=torch.float64)
    for i, a in enumerate(x):
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        big_u[:, i * r:(i + 1) * r], big_s[i * r:(i + 1) * r], big_vh[i * r:(i + 1) * r] = u[:, :r], s[:r], vh[:r]

    def polar(a):
        p, _, q = torch.linalg.svd(a, full_matrices=False)
        return p @ q
    return polar(big_u) @ torch.diag(big_s) @ polar(big_vh)


def rel(a, b):
    return float((a.double() - b).norm() / b.norm())


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("m,n", [(300, 40), (40, 300)])
def test_ritz_gives_the_known_top_triplets(m, n, dtype, tol):
    a, u, s, v = known_svd(m, n, [10.0 / (i + 1) for i in range(40)])
    got_u, got_s, got_vh = top_svd_ritz(a.to(dtype), 6)
    assert got_u.dtype == dtype and got_u.shape == (m, 6) and got_vh.shape == (6, n)
    torch.testing.assert_close(got_s.double(), s[:6], rtol=tol, atol=0)
    signs = torch.sign((got_u.double() * u[:, :6]).sum(0))  # vectors are defined up to sign
    torch.testing.assert_close(got_u.double() * signs, u[:, :6], rtol=0, atol=tol * 10)
    torch.testing.assert_close(got_vh.double() * signs[:, None], v[:, :6].T, rtol=0, atol=tol * 10)
    assert [t.shape for t in top_svd_ritz(a, 0)] == [(m, 0), (0,), (0, n)]


@pytest.mark.parametrize("inputs", [
    pytest.param(lambda: noise_bulk(300, 260, 5), id="noise-bulk-tall"),
    pytest.param(lambda: noise_bulk(260, 520, 5, seed=1), id="noise-bulk-wide"),
    pytest.param(lambda: power_law(300, 260, 5, 1.0), id="power-law-1"),
])
def test_tsv_m_ritz_within_tolerance_of_the_float64_full_svd(inputs):
    """The stated tolerance: the merged layer is within 3x the float32 full SVD's own distance
    to the float64 full-SVD TSV-M (measured 0.6-2.5x, bench/bench_tsv.py)."""
    tvs = inputs()
    r = min(tvs[0].shape) // len(tvs)
    assert all(top_svd_ritz(x, r) is not None for x in tvs)  # the Ritz path ran, no fall back
    exact = reference_tsv_m(tvs)
    fast, full = tsv_m_key(tvs), tsv_m_key(tvs, truncated=False)
    assert rel(fast, exact) <= 3 * rel(full, exact)
    assert rel(full, exact) < 1e-4  # the comparison is not vacuous: float32 is this close
    assert rel(tsv_m_key([x.double() for x in tvs]), exact) < 1e-10  # float64 input: float64 math


def test_ritz_refuses_what_float32_cannot_resolve_and_tsv_m_falls_back():
    """sigma_i = i**-2: sigma_r / sigma_1 = 2e-4 at the cut, below what a float32 Gram matrix
    resolves: the check refuses, top_svd takes the float64 Gram path, and TSV-M stays accurate."""
    tvs = power_law(300, 260, 5, 2.0)
    r = 260 // 5
    assert all(top_svd_ritz(x, r) is None for x in tvs)
    for x in tvs[:2]:
        for got, want in zip(top_svd(x, r), top_svd_gram(x, r)):
            assert torch.equal(got, want)
    exact = reference_tsv_m(tvs)
    assert rel(tsv_m_key(tvs), exact) <= 3 * rel(tsv_m_key(tvs, truncated=False), exact)


def test_rank_deficient_input_keeps_the_product():
    """Rank 3 < r: the vectors past the rank are arbitrary (as for any SVD), the triplets still
    reproduce the matrix."""
    a = torch.zeros(300, 260)
    a[:3, :3] = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    u, s, vh = top_svd(a, 10, truncated=True)
    torch.testing.assert_close(u @ torch.diag(s) @ vh, a, rtol=0, atol=1e-5)
    torch.testing.assert_close(s[:3], torch.tensor([3.0, 2.0, 1.0]))


def test_small_matrices_keep_the_full_svd_bitwise():
    tvs = noise_bulk(255, 300, 4)
    assert torch.equal(tsv_m_key(tvs), tsv_m_key(tvs, truncated=False))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="method"):
        top_svd(torch.ones(3, 3), 1, method="lanczos")
    with pytest.raises(ValueError, match="r=5"):
        top_svd_ritz(torch.ones(3, 4), 5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tsv_m_ritz_on_cuda_matches_the_float64_reference():
    """On CUDA the Ritz path runs there (float32, full eigh of the Gram matrix on the device)."""
    tvs = noise_bulk(300, 260, 5)
    r = 260 // 5
    got = top_svd_ritz(tvs[0].cuda(), r)
    assert got is not None and all(t.is_cuda and t.dtype == torch.float32 for t in got)
    exact = reference_tsv_m(tvs)
    gpu = tsv_m_key([x.cuda() for x in tvs])
    assert gpu.is_cuda
    assert rel(gpu.cpu(), exact) <= 3 * rel(tsv_m_key(tvs, truncated=False), exact)
