"""Stage functions of submerge.pipeline that hold logic of their own: grid-point choice,
β per layer kind, reconstruction from the merged cache, the HO-GSVD cache."""

from __future__ import annotations

import math

import pytest
import torch

from submerge import pipeline
from submerge.boosting import boost_matrix, svd_factors
from submerge.io.hogsvd_cache import HOGSVDEntry, read_hogsvd_cache, write_hogsvd_cache
from submerge.layers import LayerInfo

REFS = {"a": {"val": {"expert": 0.8}}, "b": {"val": {"expert": 0.4}}}


def test_selection_score_normalised_and_absolute():
    acc = {"a": 0.4, "b": 0.4}
    assert pipeline.selection_score(acc, REFS, "normalized") == pytest.approx((0.5 + 1.0) / 2)
    assert pipeline.selection_score(acc, REFS, "absolute") == pytest.approx(0.4)


def test_choose_point_by_normalised_accuracy_with_deterministic_ties():
    grid = [
        {"alpha": 0.5, "beta": 0.0, "accuracy": {"a": 0.8, "b": 0.2}},   # abs .5, norm .75
        {"alpha": 1.0, "beta": 0.0, "accuracy": {"a": 0.4, "b": 0.4}},   # abs .4, norm .75
        {"alpha": 0.3, "beta": 0.2, "accuracy": {"a": 0.4, "b": 0.4}},   # abs .4, norm .75
        {"alpha": 0.2, "beta": None, "accuracy": {"a": 0.1, "b": 0.1}},
    ]
    # three-way tie on the normalised score: the smallest alpha wins
    assert pipeline.choose_point(grid, REFS, "normalized")["alpha"] == 0.3
    assert pipeline.choose_point(grid, REFS, "absolute")["alpha"] == 0.5
    with pytest.raises(ValueError, match="no grid points"):
        pipeline.choose_point([], REFS)


def test_boost_betas_per_kind():
    assert pipeline.boost_betas({"rule": "ties"}, 0.1) == {"attn": None, "mlp": None}
    assert pipeline.boost_betas({"boost": {}}, 0.1) == {"attn": 0.1, "mlp": 0.1}
    assert pipeline.boost_betas({"boost": {"beta_attn": 0.02}}, 0.1) == {"attn": 0.02, "mlp": 0.1}
    assert pipeline.boost_betas({"boost": {}}, None) == {"attn": None, "mlp": None}


def test_reconstruct_from_factors_equals_direct_boosting():
    torch.manual_seed(0)
    info = {"attn.w": LayerInfo(0, "attn"), "mlp.w": LayerInfo(0, "mlp"), "ln.b": LayerInfo(0, "norm")}
    delta = {"attn.w": torch.randn(6, 4, dtype=torch.float64), "mlp.w": torch.randn(3, 5, dtype=torch.float64),
             "ln.b": torch.randn(4, dtype=torch.float64)}
    method = {"boost": {"beta_mlp": 0.3}}
    factors = svd_factors(delta, info)
    dense = {k: v for k, v in delta.items() if k not in factors}
    out = pipeline.reconstruct(dense, factors, info, method, 0.1)
    torch.testing.assert_close(out["attn.w"], boost_matrix(delta["attn.w"], 0.1))
    torch.testing.assert_close(out["mlp.w"], boost_matrix(delta["mlp.w"], 0.3))
    torch.testing.assert_close(out["ln.b"], delta["ln.b"])
    unboosted = pipeline.reconstruct(dense, factors, info, method, None)
    torch.testing.assert_close(unboosted["attn.w"], delta["attn.w"])


def test_hogsvd_cache_round_trip(tmp_path):
    entries = [HOGSVDEntry(key="t.0.attn", row_block=b, kind="attn", block=0, V=torch.eye(3) * (b + 1),
                           sigma=torch.rand(2, 3), eigvals=torch.arange(3.0), transposed=False, seconds=0.5)
               for b in range(3)]
    entries.append(HOGSVDEntry(key="t.1.mlp", row_block=0, kind="mlp", block=None, V=torch.eye(3),
                               sigma=torch.rand(2, 3), eigvals=torch.ones(3), transposed=True, seconds=1.0))
    path = tmp_path / "g.h5"
    write_hogsvd_cache(path, ["x", "y"], entries, {"pi": 0.01})
    experts, back = read_hogsvd_cache(path, with_basis=True)
    assert experts == ["x", "y"]
    assert [(e.key, e.row_block, e.kind, e.block, e.transposed) for e in back] == \
        [(e.key, e.row_block, e.kind, e.block, e.transposed) for e in entries]
    for a, b in zip(entries, back):
        torch.testing.assert_close(a.V, b.V)
        torch.testing.assert_close(a.sigma, b.sigma)
    assert not read_hogsvd_cache(path)[1][0].V.numel()  # basis only on request
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        read_hogsvd_cache(tmp_path / "missing.h5")


