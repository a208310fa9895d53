"""The report's torch stage (submerge.stages.report): the spectra and HO-GSVD summaries that the
torch-free figures read, on small caches written with the pipeline's own writers."""

from __future__ import annotations

import json
import logging
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from submerge.boosting import boost_singular_values, svd_factors
from submerge.hogsvd import alignment_matrix, hogsvd
from submerge.io import hdf5
from submerge.io.hogsvd_cache import HOGSVDEntry, write_hogsvd_cache
from submerge.layers import LayerInfo
from submerge.recipe import parse_method
from submerge.stages import report as S

LAYER_INFO = {
    "blocks.0.attn.in_proj_weight": LayerInfo(block=0, kind="attn", stacked=3),
    "blocks.0.attn.out_proj.weight": LayerInfo(block=0, kind="attn"),
    "blocks.0.mlp.fc.weight": LayerInfo(block=0, kind="mlp"),
    "blocks.0.ln.weight": LayerInfo(block=0, kind="norm"),
}
SHAPES = {"blocks.0.attn.in_proj_weight": (24, 8), "blocks.0.attn.out_proj.weight": (8, 8),
          "blocks.0.mlp.fc.weight": (16, 8), "blocks.0.ln.weight": (8,)}
GRID = {"alpha": [1.0], "beta": [0.0]}
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _script(name, tmp_path, **parts):
    """Run scripts/<name>.py as Snakemake's `script:` does."""
    snakemake = SimpleNamespace(log=[str(tmp_path / f"{name}.log")], threads=1, **parts)
    root, hook = logging.getLogger(), sys.excepthook
    handlers, level = list(root.handlers), root.level
    try:
        runpy.run_path(str(SCRIPTS / f"{name}.py"), init_globals={"snakemake": snakemake})
    finally:  # the script set up the job's logging
        for h in root.handlers:
            if h not in handlers:
                h.close()
        root.handlers[:], sys.excepthook = handlers, hook
        root.setLevel(level)


def _delta(seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*s, generator=g, dtype=torch.float64) for k, s in SHAPES.items()}


def _merged(path, method, delta):
    factors = svd_factors(delta, LAYER_INFO, layers=method.boost.layers) if method.boosted else {}
    dense = {k: v for k, v in delta.items() if k not in factors}
    hdf5.write_factored(path, dense, factors, LAYER_INFO, {"method": method.name})


def test_spectra_summary(tmp_path):
    methods = {
        "ta": parse_method("ta", {"merge": "task_arithmetic"}, GRID, ["g"]),
        # boosted, with the MLP's β fixed: attention at the test point's β, MLP at 0.5
        "ta_sb": parse_method("ta_sb", {"merge": "task_arithmetic", "boost": {"beta_mlp": 0.5}},
                              GRID, ["g"]),
    }
    delta = _delta(0)
    merged, tests = {}, {}
    for name, method in methods.items():
        merged[("g", name)] = tmp_path / "merged" / "g" / f"{name}.h5"
        merged[("g", name)].parent.mkdir(parents=True, exist_ok=True)
        _merged(merged[("g", name)], method, delta)
        tests[("g", name)] = tmp_path / "test" / "g" / f"{name}.json"
        tests[("g", name)].parent.mkdir(parents=True, exist_ok=True)
        beta = 0.2 if method.boosted else None
        tests[("g", name)].write_text(json.dumps({"alpha": 1.0, "beta": beta}))
    out_summary, out_sigma = tmp_path / "summary.csv", tmp_path / "sigma.csv"
    # the rule's params: group sizes and the methods' to_params()
    _script("spectra_summary", tmp_path,
            input=SimpleNamespace(merged=[str(p) for p in merged.values()],
                                  test=[str(p) for p in tests.values()]),
            output=SimpleNamespace(summary=str(out_summary), sigma=str(out_sigma)),
            params=SimpleNamespace(n_experts={"g": 3},
                                   methods={n: m.to_params() for n, m in methods.items()}))
    summary, sigma = pd.read_csv(out_summary), pd.read_csv(out_sigma)
    assert list(summary.columns) == list(S.SUMMARY_COLUMNS)
    assert list(sigma.columns) == list(S.SIGMA_COLUMNS)
    matrices = [k for k, i in LAYER_INFO.items() if i.kind in ("attn", "mlp")]
    for name in methods:
        rows = summary.loc[summary["method"] == name]
        assert sorted(rows["key"]) == sorted(matrices) and set(rows["n_experts"]) == {3}
        assert set(rows["boosted"]) == {methods[name].boosted}
    # unboosted: the spectrum of Δ as merged
    fc = sigma.loc[(sigma["method"] == "ta") & (sigma["key"] == "blocks.0.mlp.fc.weight")]
    expected = torch.linalg.svdvals(delta["blocks.0.mlp.fc.weight"]).numpy()
    np.testing.assert_allclose(fc["sigma"], expected, rtol=1e-5)
    # boosted: listed before (the same spectrum) and after boosting at Boost.betas(test β)
    fc_sb = sigma.loc[(sigma["method"] == "ta_sb") & (sigma["key"] == "blocks.0.mlp.fc.weight")]
    np.testing.assert_allclose(fc_sb.loc[~fc_sb["boosted"], "sigma"], expected, rtol=1e-5)
    after = boost_singular_values(torch.from_numpy(expected), 0.5).numpy()  # beta_mlp fixed
    np.testing.assert_allclose(fc_sb.loc[fc_sb["boosted"], "sigma"], after, rtol=1e-5)
    out = summary.set_index(["method", "key"])
    key = "blocks.0.attn.out_proj.weight"
    assert out.loc[("ta_sb", key), "stable_rank"] > out.loc[("ta", key), "stable_rank"]


def test_hogsvd_summary(tmp_path):
    experts = ["x", "y", "z"]
    tvs = [_delta(seed) for seed in (1, 2, 3)]
    paths = []
    for e, tv in zip(experts, tvs):
        paths.append(tmp_path / f"{e}.h5")
        hdf5.write_state_dict(paths[-1], tv, LAYER_INFO, {"expert": e})
    entries = []
    for key, info in LAYER_INFO.items():
        if info.kind not in ("attn", "mlp"):
            continue
        for b in range(info.stacked):
            res = hogsvd([tv[key].chunk(info.stacked, dim=0)[b] for tv in tvs])
            entries.append(HOGSVDEntry(key=key, row_block=b, kind=info.kind, block=info.block,
                                       V=res.V, sigma=res.sigma, eigvals=res.eigvals,
                                       transposed=res.transposed, seconds=0.0))
    cache = tmp_path / "g.h5"
    write_hogsvd_cache(cache, experts, entries, {"pi": 1e-2, "layers": "both"})
    out = tmp_path / "hogsvd_summary.json"
    _script("hogsvd_summary", tmp_path,
            input=SimpleNamespace(hogsvd=str(cache), taskvectors=[str(p) for p in paths]),
            output=[str(out)], params=SimpleNamespace(group="g"))
    summary = json.loads(out.read_text())
    assert summary["group"] == "g" and summary["experts"] == experts
    assert list(summary["alignment"]) == ["attn", "mlp", "mean"]
    attn = alignment_matrix([e.sigma for e in entries if e.kind == "attn"]).numpy()
    np.testing.assert_allclose(summary["alignment"]["attn"], attn)
    imp = summary["importance"]
    assert imp["key"] == "blocks.0.attn.out_proj.weight" and imp["row_block"] == 0
    pick = next(e for e in entries if e.key == imp["key"])
    np.testing.assert_allclose(imp["sigma"], pick.sigma.numpy())
    mean = np.mean([tv[imp["key"]].numpy() for tv in tvs], axis=0)
    mean = mean.T if pick.transposed else mean
    expected = np.linalg.norm(mean @ np.linalg.inv(pick.V.numpy()).T, axis=0)
    np.testing.assert_allclose(imp["merged"], expected, rtol=1e-8)
    with pytest.raises(ValueError, match="task vectors"):
        S.hogsvd_summary(cache, paths[:2], "g", out)
