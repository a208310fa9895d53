"""The typed recipe (src/submerge/recipe.py) and the merge-function registry (merges.py):
config parsing with the field named, the exact grid-point path codec, the one α/β choice."""

from __future__ import annotations

import copy
import inspect
import math
import subprocess
import sys

import pytest
import yaml
from hypothesis import given, strategies as st

from submerge import merges
from submerge.errors import ConfigError
from submerge.recipe import (GridPoint, choose_point, decode_value, encode_value, parse_config,
                             validation_score)
from workflow_utils import ROOT, load_tiny


def default_config() -> dict:
    return yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


def _error(cfg) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(cfg)
    return str(info.value)


# ------------------------------------------------------------------------- path codec


@given(st.floats(min_value=0, max_value=1e12, allow_nan=False, allow_infinity=False))
def test_grid_value_codec_is_exact(x):
    text = encode_value(x)
    assert decode_value(text) == x
    assert GridPoint.parse(GridPoint(x, x).name) == GridPoint(x, x)


@given(st.floats(min_value=0, max_value=10, allow_nan=False),
       st.floats(min_value=0, max_value=10, allow_nan=False))
def test_different_values_never_share_a_path(x, y):
    assert (encode_value(x) == encode_value(y)) == (x == y)


def test_codec_keeps_the_familiar_spelling():
    # the paths of the existing results stay as they were
    assert [encode_value(v) for v in (0.025, 0.1, 0.2, 1.0, 2.0, 0.0)] == \
        ["0.025", "0.1", "0.2", "1", "2", "0"]
    assert GridPoint(0.5, None).name == "a0.5_bnone"
    # the values the old 6-decimal spelling lost or merged
    assert encode_value(1e-7) == "1e-07" and encode_value(0.5000001) != encode_value(0.5)
    assert encode_value(0.9999999) == "0.9999999"
    with pytest.raises(ValueError):
        encode_value(math.nan)
    with pytest.raises(ValueError):
        GridPoint.parse("a0.1_b")


# -------------------------------------------------------------------------- α/β choice

EXPERT = {"a": 0.8, "b": 0.4}


def test_validation_score_normalised_and_absolute():
    acc = {"a": 0.4, "b": 0.4}
    assert validation_score(acc, EXPERT, "normalized") == pytest.approx((0.5 + 1.0) / 2)
    assert validation_score(acc, EXPERT, "absolute") == pytest.approx(0.4)
    # task order does not matter (exact summation)
    accs = {f"t{i}": 0.1 * (i % 7) + 1e-3 for i in range(20)}
    refs = {t: 0.9 for t in accs}
    reordered = dict(reversed(list(accs.items())))
    assert validation_score(accs, refs) == validation_score(reordered, refs)


def test_choose_point_ties_go_to_the_smaller_alpha_then_beta():
    points = [
        (GridPoint(0.5, 0.0), {"a": 0.8, "b": 0.2}),   # abs .5, norm .75
        (GridPoint(1.0, 0.0), {"a": 0.4, "b": 0.4}),   # abs .4, norm .75
        (GridPoint(0.3, 0.2), {"a": 0.4, "b": 0.4}),   # abs .4, norm .75
        (GridPoint(0.3, 0.0), {"a": 0.4, "b": 0.4}),   # abs .4, norm .75
        (GridPoint(0.2, None), {"a": 0.1, "b": 0.1}),
    ]
    assert choose_point(points, EXPERT, "normalized")[0] == GridPoint(0.3, 0.0)
    assert choose_point(list(reversed(points)), EXPERT, "normalized")[0] == GridPoint(0.3, 0.0)
    assert choose_point(points, EXPERT, "absolute") == (GridPoint(0.5, 0.0), pytest.approx(0.5))
    with pytest.raises(ValueError, match="no grid points"):
        choose_point([], EXPERT)


def test_choice_ignores_differences_below_the_stored_precision():
    # scores.csv keeps 6 significant digits: the choice from it and from the grid files agree
    points = [(GridPoint(0.2, None), {"a": 0.5000001}), (GridPoint(0.1, None), {"a": 0.5})]
    assert choose_point(points, {"a": 1.0})[0] == GridPoint(0.1, None)


# ------------------------------------------------------------------------- the config


def test_default_and_real_suite_configs_parse():
    recipe = parse_config(default_config())
    assert recipe.methods["ties"].merge_kwargs() == {"k": 20, "merge": "dis-mean"}
    assert recipe.methods["consensus"].merge_kwargs() == {"k": 2, "base": "ta"}
    assert recipe.methods["ta_sb"].boosted and not recipe.methods["ta"].boosted
    assert recipe.methods["ta"].betas == (None,)
    assert recipe.methods["hosb_lines"].needs == (merges.HOGSVD_CACHE,)
    for path in sorted((ROOT / "config" / "suites").glob("*.yaml")):
        parse_config(yaml.safe_load(path.read_text()))


def test_method_params_hold_what_determines_the_merge_and_round_trip():
    from submerge.recipe import Method

    recipe = parse_config(default_config())
    for method in recipe.methods.values():
        params = method.to_params()
        assert "alpha" not in str(params) and "groups" not in params
        back = Method.from_params(params)
        assert (back.merge, dict(back.hyper), back.lines, back.boost) == \
            (method.merge, dict(method.hyper), method.lines, method.boost)


def test_boost_betas_per_kind():
    cfg = load_tiny()
    cfg["methods"]["fixed"] = {"merge": "task_arithmetic", "boost": {"beta_attn": 0.02}}
    boost = parse_config(cfg).methods["fixed"].boost
    assert boost.betas(0.1) == {"attn": 0.02, "mlp": 0.1}
    assert boost.betas(None) == {"attn": None, "mlp": None}


def test_suite_view_keeps_every_suite_key_and_only_the_named_experts():
    cfg = load_tiny()
    cfg["tokenizer"] = {"path": "x"}
    view = parse_config(cfg).suite_view(["rot90"])
    assert view["tokenizer"] == {"path": "x"} and list(view["experts"]) == ["rot90"]
    assert "methods" not in view and "grid" not in view


@pytest.mark.parametrize("edit, field", [
    (lambda c: c["methods"]["ta"].update(k=20), "methods.ta.k"),
    (lambda c: c["methods"].update(t={"merge": "ties", "top_k_percent": 0}), "methods.t.top_k_percent"),
    (lambda c: c["methods"].update(t={"merge": "ties", "aggregate": "mean"}), "methods.t.aggregate"),
    (lambda c: c["methods"].update(c={"merge": "consensus", "min_votes": 1.5}), "methods.c.min_votes"),
    (lambda c: c["methods"].update(x={"merge": "dare"}), "methods.x.merge"),
    (lambda c: c["methods"]["ta"].update(beta=[0.1]), "methods.ta.beta"),
    (lambda c: c["methods"]["ta"].update(alpha=[0.5, 0.5]), "methods.ta.alpha"),
    (lambda c: c["methods"]["ta"].update(lines={"alpha": 0.5}), "methods.ta.lines.alpha"),
    (lambda c: c["grid"].update(alpha=[float("nan")]), "grid.alpha[0]"),
    (lambda c: c["grid"].update(alpha=[float("inf")]), "grid.alpha[0]"),
    (lambda c: c["grid"].update(beta=[1.0]), "grid.beta[0]"),
    (lambda c: c["groups"].update({"bad\n": ["rot90"]}), "groups"),
    (lambda c: c["experts"].update({"a/b": {"build": "digits", "task": "rot90"}}), "experts"),
    (lambda c: c["experts"].update(x={"build": "digits", "task": "rot45"}), "experts.x.task"),
    (lambda c: c["groups"].update(g3=["rot90", "nobody"]), "groups.g3[1]"),
    (lambda c: c["methods"]["ta"].update(groups=["g9"]), "methods.ta.groups[0]"),
    (lambda c: c["eval"].update(selection_metric="norm"), "eval.selection_metric"),
])
def test_config_errors_name_the_field(edit, field):
    cfg = copy.deepcopy(load_tiny())
    edit(cfg)
    assert f"config field {field}" in _error(cfg)


def test_selection_experiment_checks():
    cfg = default_config()
    cfg["experiments"]["selection"]["n_select"] = 99
    assert "experiments.selection.n_select" in _error(cfg)
    cfg = default_config()
    cfg["experiments"]["selection"]["method"] = "consensus"
    assert "experiments.selection.method" in _error(cfg)


# ------------------------------------------------------------------------- the registry


@pytest.mark.parametrize("name", sorted(merges.MERGES))
def test_registry_entries_match_their_functions(name):
    """Every hyperparameter maps to a keyword the function takes, with the same default, and
    every extra input is a keyword too."""
    spec = merges.MERGES[name]
    assert spec.label and spec.paper and spec.doc
    params = inspect.signature(spec.function()).parameters
    for h in spec.hyper:
        assert h.arg in params, (name, h.arg)
        assert params[h.arg].default == h.default, (name, h.name)
        assert h.check(h.default) is None
    extra_kwargs = {merges.TALL_LAMBDAS: "lambdas", merges.HOGSVD_CACHE: "cache"}
    for need in spec.needs:
        assert extra_kwargs[need] in params


def test_recipe_and_registry_import_no_torch():
    code = ("import sys, yaml; from submerge.recipe import parse_config; "
            f"parse_config(yaml.safe_load(open({str(ROOT / 'config' / 'config.yaml')!r}))); "
            "import submerge.logs, submerge.io.jsonio; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_eval_params_hold_only_what_changes_results():
    cfg = load_tiny()
    cfg["eval"] = {"batch_size": 7, "max_val_examples": 50, "selection_metric": "absolute"}
    cfg["device"] = "cpu"
    settings = parse_config(cfg).eval
    assert settings.to_params() == {"max_val_examples": 50, "max_test_examples": None}
    assert settings.to_params(choice=True)["selection_metric"] == "absolute"
    back = type(settings).from_params(settings.to_params(choice=True), cfg)
    assert back == settings and back.batch_size == 7 and back.device == "cpu"


def test_a_group_is_a_set():
    cfg = load_tiny()
    cfg["groups"]["g3"] = ["invert", "rot90", "parity"]
    assert parse_config(cfg).members("g3") == ["rot90", "parity", "invert"]  # the suite's order
