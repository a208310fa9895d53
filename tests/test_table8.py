"""Paper Table 8: the β_attn × β_mlp grid reuses one SVD per boosted matrix; its config."""

import pytest
import torch

from submerge import boosting
from submerge.errors import ConfigError
from submerge.layers import LayerInfo
from submerge.recipe import GridPoint, parse_config, parse_method
from submerge.stages.beta_grid import choose_pair, kind_beta_deltas

INFO = {"blocks.0.attn.in_proj_weight": LayerInfo(0, "attn", stacked=3),
        "blocks.0.mlp.c_fc.weight": LayerInfo(0, "mlp"),
        "blocks.1.mlp.c_proj.weight": LayerInfo(1, "mlp"),
        "blocks.1.ln.weight": LayerInfo(1, "norm")}
PAIRS = [(a, m) for m in (0.0, 0.1, 0.3) for a in (0.0, 0.2, 0.5)]


def _delta():
    g = torch.Generator().manual_seed(0)
    return {"blocks.0.attn.in_proj_weight": torch.randn(12, 4, generator=g),
            "blocks.0.mlp.c_fc.weight": torch.randn(8, 4, generator=g),
            "blocks.1.mlp.c_proj.weight": torch.randn(4, 8, generator=g),
            "blocks.1.ln.weight": torch.randn(4, generator=g)}


def _method():
    return parse_method("ta_sb", {"merge": "task_arithmetic", "boost": {}},
                        {"alpha": [0.1], "beta": [0.0]}, ["g"])


def test_one_svd_per_matrix_block_whatever_the_grid(monkeypatch):
    calls = []
    real = boosting.svd
    monkeypatch.setattr(boosting, "svd", lambda m: calls.append(tuple(m.shape)) or real(m))
    deltas = kind_beta_deltas(_delta(), INFO, _method(), PAIRS)
    # Q, K, V blocks of the attention matrix + two MLP matrices, once each for 9 pairs
    assert sorted(calls) == sorted([(4, 4)] * 3 + [(8, 4), (4, 8)])
    assert len(deltas) == len(PAIRS)


def test_each_pair_equals_subspace_boost_with_per_kind_betas():
    delta = _delta()
    deltas = kind_beta_deltas(delta, INFO, _method(), PAIRS)
    for (a, m), got in deltas.items():
        want = boosting.subspace_boost(delta, INFO, beta={"attn": a, "mlp": m})
        for key in delta:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5)
    # the kinds move independently: β_attn changes attention only
    assert torch.equal(deltas[(0.0, 0.1)]["blocks.0.mlp.c_fc.weight"],
                       deltas[(0.5, 0.1)]["blocks.0.mlp.c_fc.weight"])
    assert not torch.allclose(deltas[(0.0, 0.1)]["blocks.0.attn.in_proj_weight"],
                              deltas[(0.5, 0.1)]["blocks.0.attn.in_proj_weight"])


def test_choose_pair_best_score_ties_to_smaller_betas(caplog):
    per = {(0.0, 0.0): (GridPoint(0.1, 0.0), 0.8), (0.2, 0.0): (GridPoint(0.1, 0.0), 0.9),
           (0.0, 0.1): (GridPoint(0.1, 0.0), 0.9), (0.2, 0.1): (GridPoint(0.1, 0.0), 0.7)}
    assert choose_pair(per) == (0.2, 0.0)  # tie at 0.9: smaller β_mlp first
    assert "edge" in caplog.text  # 0.2 is the largest β_attn


def _config(**table8):
    from submerge.suites.digits_config import TASK_NAMES

    experts = {t: {"build": "digits", "task": t} for t in TASK_NAMES[:4]}
    return {"suite": "d", "adapter": "open_clip_vit", "base": {"build": "digits"},
            "experts": experts, "groups": {"a": list(experts)[:2], "b": list(experts)},
            "methods": {"ta": {"merge": "task_arithmetic"},
                        "ta_sb": {"merge": "task_arithmetic", "boost": {}, "alpha": [0.1, 0.2]},
                        "ta_attn": {"merge": "task_arithmetic", "boost": {"layers": "attn"}}},
            "grid": {"alpha": [0.1], "beta": [0.0]},
            "experiments": {"table8": table8}}


def test_table8_config_defaults_and_errors():
    t8 = parse_config(_config(method="ta_sb")).table8
    assert t8.group == "b" and t8.alphas == (0.1, 0.2)  # largest group, the method's α list
    assert t8.pairs()[:2] == [(0.0, 0.0), (0.1, 0.0)]  # β_mlp outer
    t8 = parse_config(_config(method="ta_sb", group="a", beta_attn=[0.0, 0.3], alpha=[0.5])).table8
    assert (t8.group, t8.beta_attn, t8.alphas) == ("a", (0.0, 0.3), (0.5,))
    for bad, field in ((dict(method="ta"), "method"), (dict(method="ta_attn"), "method"),
                       (dict(method="nope"), "method"), (dict(method="ta_sb", group="x"), "group"),
                       (dict(method="ta_sb", beta_mlp=[1.5]), r"beta_mlp\[0\]"),
                       (dict(method="ta_sb", betas=[0.1]), "betas")):
        with pytest.raises(ConfigError, match=rf"config field experiments\.table8\.{field}"):
            parse_config(_config(**bad))
