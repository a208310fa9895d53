"""Stage functions that hold logic of their own: reconstruction from the merged cache, the
HO-GSVD cache, the results cache of the sweeps."""

from __future__ import annotations

import pytest
import torch

from submerge.boosting import boost_matrix, svd_factors
from submerge.io.hogsvd_cache import HOGSVDEntry, read_hogsvd_cache, write_hogsvd_cache
from submerge.layers import LayerInfo
from submerge.recipe import Boost, Method
from submerge.stages import merge


def test_reconstruct_from_factors_equals_direct_boosting():
    torch.manual_seed(0)
    info = {"attn.w": LayerInfo(0, "attn"), "mlp.w": LayerInfo(0, "mlp"), "ln.b": LayerInfo(0, "norm")}
    delta = {"attn.w": torch.randn(6, 4, dtype=torch.float64), "mlp.w": torch.randn(3, 5, dtype=torch.float64),
             "ln.b": torch.randn(4, dtype=torch.float64)}
    method = Method(name="m", merge="task_arithmetic", boost=Boost(beta_mlp=0.3))
    factors = svd_factors(delta, info)
    dense = {k: v for k, v in delta.items() if k not in factors}
    out = merge.reconstruct(dense, factors, info, method, 0.1)
    torch.testing.assert_close(out["attn.w"], boost_matrix(delta["attn.w"], 0.1))
    torch.testing.assert_close(out["mlp.w"], boost_matrix(delta["mlp.w"], 0.3))
    torch.testing.assert_close(out["ln.b"], delta["ln.b"])
    unboosted = merge.reconstruct(dense, factors, info, method, None)
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




def test_results_cache_keys_and_entries(tmp_path):
    """A result is found again exactly under the key of what determined it; a change of any
    part is another key; an unreadable entry counts as absent."""
    from submerge.io.results_cache import ResultsCache, result_key

    what = {"merged": "ab" * 32, "alpha": 0.1, "beta": None, "split": "val"}
    key = result_key(what)
    assert key == result_key(dict(reversed(list(what.items()))))  # order-free
    assert key != result_key({**what, "alpha": 0.1000000001})
    cache = ResultsCache(tmp_path)
    assert cache.get(key) is None
    cache.put(key, what, {"accuracy": {"a": 0.5}})
    assert cache.get(key) == {"accuracy": {"a": 0.5}}
    cache.path(key).write_text("{not json")
    assert cache.get(key) is None
    with pytest.raises(ValueError):
        result_key({**what, "alpha": float("nan")})


def test_a_points_cache_key_follows_the_content_of_its_prepared_evaluation_data(tmp_path):
    from submerge.recipe import GridPoint, parse_config
    from submerge.stages.evaluate import Sweep
    from workflow_utils import load_tiny

    recipe = parse_config(load_tiny())
    files = {}
    for name in ("base", "merged", "head_rot90", "head_parity", "val_rot90"):
        files[name] = tmp_path / name
        files[name].write_bytes(name.encode())

    def key():
        sweep = Sweep(recipe.suite, ["rot90", "parity"], recipe.methods["ta"], "g2", files["base"],
                      files["merged"], [files["head_rot90"], files["head_parity"]], recipe.eval,
                      tmp_path / "cache", [files["val_rot90"]])
        return sweep._what(GridPoint(0.5, None), "val")

    before = key()
    assert key() == before
    files["val_rot90"].write_bytes(b"other images")
    after = key()
    assert after != before and {k for k in before if before[k] != after[k]} == {"eval_data"}
