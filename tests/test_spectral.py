"""Spectral measures against known spectra and numpy."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from submerge.spectral import energy_rank, normalized_spectrum, singular_values, stable_rank, svd

SETTINGS = settings(max_examples=25, deadline=None)


def matrix_with_spectrum(s, m, n, seed=0):
    """U diag(s) V^T with random orthonormal U (m x k), V (n x k), k = len(s)."""
    g = torch.Generator().manual_seed(seed)
    k = len(s)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ v.T


@pytest.mark.parametrize("shape", [(6, 6), (4, 9), (9, 4)])
def test_known_spectrum(shape):
    s = [5.0, 3.0, 1.0, 0.5]
    a = matrix_with_spectrum(s, *shape)
    padded = torch.zeros(min(shape), dtype=torch.float64)
    padded[:4] = torch.tensor(s, dtype=torch.float64)
    torch.testing.assert_close(singular_values(a), padded, atol=1e-12, rtol=1e-10)
    expected = sum(x * x for x in s) / 25.0
    assert stable_rank(a) == pytest.approx(expected, rel=1e-10)
    assert stable_rank(torch.tensor(s)) == pytest.approx(expected, rel=1e-6)
    # energies 25, 9, 1, 0.25 of 35.25: 70.9 %, 96.5 %, 99.3 %, 100 %
    assert energy_rank(a, 0.5) == 1
    assert energy_rank(a, 0.9) == 2
    assert energy_rank(a, 0.99) == 3
    assert energy_rank(a, 1.0) == 4


def test_stable_rank_identity_rank_one_zero():
    assert stable_rank(torch.eye(7)) == pytest.approx(7.0)
    assert stable_rank(torch.outer(torch.arange(1.0, 5.0), torch.ones(3))) == pytest.approx(1.0)
    assert stable_rank(torch.zeros(4, 5)) == 0.0
    assert stable_rank(torch.zeros(3)) == 0.0
    assert energy_rank(torch.zeros(4, 5)) == 0


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(1, 12), n=st.integers(1, 12))
def test_against_numpy(seed, m, n):
    a = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    s_np = np.linalg.svd(a.numpy(), compute_uv=False)
    np.testing.assert_allclose(singular_values(a).numpy(), s_np, rtol=1e-10, atol=1e-12)
    sr = stable_rank(a)
    assert sr == pytest.approx((s_np**2).sum() / s_np[0] ** 2, rel=1e-10)
    assert 1.0 - 1e-9 <= sr <= min(m, n) + 1e-9
    frac = 0.8
    cum = np.cumsum(s_np**2) / (s_np**2).sum()
    assert energy_rank(a, frac) == int(np.argmax(cum >= frac)) + 1


def test_half_precision_computes_in_float32():
    a = torch.randn(5, 3).to(torch.bfloat16)
    s = singular_values(a)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, torch.linalg.svdvals(a.float()))
    u, s, vh = svd(a.half())
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    assert svd(a.double())[1].dtype == torch.float64


def test_normalized_spectrum():
    s = torch.tensor([8.0, 4.0, 2.0])
    torch.testing.assert_close(normalized_spectrum(s, 4, 0.5), s / 2.0)
    torch.testing.assert_close(normalized_spectrum(s, 4, 1.0), s / 4.0)
    torch.testing.assert_close(normalized_spectrum(s, 4, 0.0), s)


def test_bad_input():
    with pytest.raises(ValueError, match="frac"):
        energy_rank(torch.eye(3), 0.0)
    with pytest.raises(ValueError, match="frac"):
        energy_rank(torch.eye(3), 1.5)
    with pytest.raises(ValueError, match="n_experts"):
        normalized_spectrum(torch.ones(3), 0, 0.5)
    with pytest.raises(ValueError, match="non-negative"):
        stable_rank(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="2-D"):
        singular_values(torch.ones(2, 2, 2))


def test_svd_retries_a_failed_float32_svd_in_float64_on_the_cpu(monkeypatch):
    """LAPACK's float32 gesdd can fail to converge (Iso-CTS' stacked bases with two identical
    experts): the SVD is then computed in float64 and returned in float32; a float64 failure
    is raised."""
    import submerge.spectral as spectral

    real = torch.linalg.svd
    calls = []

    def flaky(a, full_matrices=True, **kw):
        calls.append(a.dtype)
        if a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(a, full_matrices=full_matrices, **kw)

    a = torch.randn(30, 20, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(torch.linalg, "svd", flaky)
    u, s, vh = spectral.svd(a)
    assert calls == [torch.float32, torch.float64]
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    want = real(a.double(), full_matrices=False)
    for got, w in zip((u, s, vh), want):
        assert torch.equal(got, w.float())

    def failing(a, full_matrices=True, **kw):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", failing)
    with pytest.raises(torch.linalg.LinAlgError):
        spectral.svd(a.double())
