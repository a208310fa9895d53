"""Proposition 1 on synthetic data: the unique part of a mean of N task vectors decays as
1/√N, the common part stays constant (submerge.decay.averaged_split)."""

import math

import torch

from submerge.decay import averaged_split


def _basis(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0] * 2.0


def test_orthogonal_unique_parts_decay_exactly_as_inverse_sqrt_n():
    """Common coefficients shared by all experts, unique ones on disjoint directions with equal
    energy (the proposition's pairwise-orthogonal, bounded task-specific parts)."""
    n_dir, n_exp, m = 24, 16, 10
    V = _basis(n_dir)
    common = torch.zeros(n_dir, dtype=torch.bool)
    common[:8] = True
    g = torch.Generator().manual_seed(1)
    shared = torch.randn(m, 8, generator=g, dtype=torch.float64)
    mats = []
    for i in range(n_exp):
        b = torch.zeros(m, n_dir, dtype=torch.float64)
        b[:, :8] = shared
        b[i % m, 8 + i] = 3.0  # expert i's own direction, norm 3
        mats.append(b @ V.T)
    out = averaged_split(mats, V, common)
    n = torch.arange(1, n_exp + 1, dtype=torch.float64)
    torch.testing.assert_close(out["unique_fro"], 3.0 / n.sqrt() * torch.linalg.norm(V[:, 8]))
    torch.testing.assert_close(out["common_fro"], out["common_fro"][0].expand(n_exp))
    # V orthogonal here, so the two parts are orthogonal and their energies add up to the mean's
    mean = torch.stack(mats).mean(0)
    torch.testing.assert_close(out["common_fro"][-1] ** 2 + out["unique_fro"][-1] ** 2,
                               torch.linalg.matrix_norm(mean) ** 2)


def test_iid_unique_parts_decay_close_to_inverse_sqrt_n():
    n_dir, n_exp, m = 32, 256, 32
    V = torch.eye(n_dir, dtype=torch.float64)
    common = torch.zeros(n_dir, dtype=torch.bool)
    common[:4] = True
    g = torch.Generator().manual_seed(2)
    shared = torch.randn(m, n_dir, generator=g, dtype=torch.float64) * common
    mats = [shared + torch.randn(m, n_dir, generator=g, dtype=torch.float64) * ~common
            for _ in range(n_exp)]
    out = averaged_split(mats, V, common)
    ratio = out["unique_fro"] * torch.arange(1, n_exp + 1, dtype=torch.float64).sqrt()
    # ‖mean of N i.i.d. Gaussian parts‖_F · √N ≈ ‖one part‖_F ≈ √(m · 28)
    expect = math.sqrt(m * (n_dir - 4))
    assert float((ratio[[15, 63, 255]] / expect - 1).abs().max()) < 0.05
    torch.testing.assert_close(out["common_fro"], out["common_fro"][0].expand(n_exp))
    # the top singular value of the unique part decays too, that of the common part does not
    assert float(out["unique_sv"][-1, 0]) < 0.2 * float(out["unique_sv"][0, 0])
    torch.testing.assert_close(out["common_sv"][-1], out["common_sv"][0])


def test_proposition1_figure_renders_and_refuses_empty_parts(tmp_path):
    import pytest

    from report_utils import make_recipe
    from submerge.report import figures as F

    recipe = make_recipe({"ta": {"merge": "task_arithmetic"}}, {"g": ["a", "b", "c"]})
    summary = {"group": "g", "threshold": 2.0, "n": [1, 2, 3], "common_fraction": 0.5,
               "matrices": [{"common_fro": [1.0, 1.0, 1.0], "unique_fro": [1.0, 0.7, 0.58]}],
               "spectra": {"key": "k", "row_block": 0, "n": [1, 3],
                           "common_sv": [[2.0, 1.0], [2.0, 1.0]],
                           "unique_sv": [[1.0, 0.5], [0.6, 0.3]]}}
    pdf, png = F.proposition1(summary, recipe, tmp_path / "fig")
    assert pdf.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="non-zero unique part"):
        F.proposition1({**summary, "matrices": [{"common_fro": [1.0] * 3, "unique_fro": [0.0] * 3}]},
                       recipe, tmp_path / "x")
