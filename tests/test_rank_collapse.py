"""Rank collapse on synthetic task vectors built as in Appendix E of the paper, and its
repair by Subspace Boosting.

Delta_i = C + U_i + E_i: a shared common component C (rank 2, singular values 1 and 0.5),
task-specific components U_i that are pairwise orthogonal in the Frobenius inner product
(Gram-Schmidt on flattened Gaussian matrices, ||U_i||_F = 1) and small isotropic noise E_i.
"""

import pytest
import torch

from submerge.boosting import subspace_boost
from submerge.layers import LayerInfo
from submerge.merging import merge
from submerge.spectral import normalized_spectrum, singular_values, stable_rank

D = 48
NS = (2, 4, 8, 16)
INFO = {"w": LayerInfo(0, "mlp")}


def synthetic(seed, n=16, noise=0.01):
    g = torch.Generator().manual_seed(seed)
    a = torch.linalg.qr(torch.randn(D, 2, generator=g, dtype=torch.float64))[0]
    b = torch.linalg.qr(torch.randn(D, 2, generator=g, dtype=torch.float64))[0]
    common = a @ torch.diag(torch.tensor([1.0, 0.5], dtype=torch.float64)) @ b.T
    flat = torch.linalg.qr(torch.randn(D * D, n, generator=g, dtype=torch.float64))[0].T  # orthonormal rows
    unique = [flat[i].reshape(D, D) for i in range(n)]
    noises = [noise * torch.randn(D, D, generator=g, dtype=torch.float64) for _ in range(n)]
    tvs = [{"w": common + u + e} for u, e in zip(unique, noises)]
    return common, unique, noises, tvs


def ta(tvs, n):
    return merge("task_arithmetic", tvs[:n], INFO)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stable_rank_collapses_to_common_and_boosting_restores_it(seed):
    common, _, _, tvs = synthetic(seed)
    ranks = [stable_rank(ta(tvs, n)["w"]) for n in NS]
    # Fig. 2 / Prop. 2: the stable rank falls as more task vectors are merged ...
    assert all(later < earlier for earlier, later in zip(ranks, ranks[1:])), ranks
    # ... towards the stable rank of the common component (1.25)
    sr_common = stable_rank(common)
    assert sr_common == pytest.approx(1.25)
    assert abs(ranks[-1] - sr_common) < 0.5 * abs(ranks[0] - sr_common)
    merged16 = ta(tvs, 16)
    for beta in (0.0, 0.01, 0.02):
        boosted = subspace_boost(merged16, INFO, beta=beta)["w"]
        sr = stable_rank(boosted)
        # boosting restores far more than the rank lost between N = 2 and N = 16
        assert sr >= 10 * ranks[-1] and sr > ranks[0], (beta, sr, ranks)


@pytest.mark.parametrize("seed", [0, 1])
def test_unique_part_decays_under_averaging(seed):
    """Prop. 1: ||(1/N) sum_i (U_i + E_i)||_2 <= B / sqrt(N) with B = max_i ||U_i + E_i||_F."""
    _, unique, noises, _ = synthetic(seed)
    for n in NS:
        parts = [u + e for u, e in zip(unique[:n], noises[:n])]
        bound = max(float(torch.linalg.matrix_norm(p)) for p in parts) / n**0.5
        avg = sum(parts) / n
        assert float(torch.linalg.matrix_norm(avg, ord=2)) <= bound


@pytest.mark.parametrize("seed", [0, 1])
def test_common_scales_linearly_unique_as_sqrt(seed):
    """Supp. E.4: the top singular values scale as O(N), the tail as O(sqrt(N))."""
    _, _, _, tvs = synthetic(seed)
    spectra = {n: singular_values(ta(tvs, n)["w"]) for n in NS}
    top = torch.stack([normalized_spectrum(spectra[n], n, 1.0)[:2] for n in NS])
    tail_sqrt = torch.stack([normalized_spectrum(spectra[n], n, 0.5)[[5, 10, 30]] for n in NS])
    tail_lin = torch.stack([normalized_spectrum(spectra[n], n, 1.0)[[5, 10, 30]] for n in NS])
    # curves collapse: relative spread across N small for the right exponent
    assert float((top.max(0).values / top.min(0).values).max()) < 1.10
    assert float((tail_sqrt.max(0).values / tail_sqrt.min(0).values).max()) < 1.15
    # ... and not for the wrong one: normalising the tail by N shrinks it ~ sqrt(8) from N=2 to 16
    assert bool((tail_lin[-1] < 0.5 * tail_lin[0]).all())
