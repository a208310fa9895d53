"""Config validation: a wrong key, type or value fails before any job runs, naming the field."""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from workflow_utils import ROOT, load_tiny, snakemake, write_config


def _fails(tmp_path, cfg) -> str:
    path = write_config(tmp_path, cfg)
    proc = snakemake(tmp_path, path, "-n", check=False)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert not (tmp_path / "results").exists()
    return proc.stdout + proc.stderr


def test_tiny_config_is_valid_and_builds_the_dag(tmp_path):
    path = write_config(tmp_path, load_tiny())
    proc = snakemake(tmp_path, path, "-n")
    assert "grid_point" in proc.stdout


@pytest.mark.parametrize("suite", sorted(p.stem for p in (ROOT / "config" / "suites").glob("*.yaml")))
def test_real_suite_dry_run_builds_the_full_dag(tmp_path, suite):
    path = ROOT / "config" / "suites" / f"{suite}.yaml"
    cfg = yaml.safe_load(path.read_text())
    proc = snakemake(tmp_path, path, "-n")
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", proc.stdout, re.MULTILINE))
    n_groups = len(cfg["groups"])
    expected_grid = n_groups * sum(
        len(m.get("alpha", cfg["grid"]["alpha"]))
        * (len(m.get("beta", cfg["grid"]["beta"])) if "boost" in m else 1)
        for m in cfg["methods"].values())
    assert int(counts["grid_point"]) == expected_grid
    assert int(counts["expert_model"]) == len(cfg["experts"])
    assert int(counts["merged"]) == int(counts["test_point"]) == n_groups * len(cfg["methods"])


def test_beta_must_be_below_one(tmp_path):
    cfg = load_tiny()
    cfg["grid"]["beta"] = [0.0, 1.0]
    assert "beta" in _fails(tmp_path, cfg)


def test_unknown_method_rule(tmp_path):
    cfg = load_tiny()
    cfg["methods"]["bogus"] = {"merge": "no_such_rule"}
    out = _fails(tmp_path, cfg)
    assert "no_such_rule" in out


def test_group_naming_unknown_expert(tmp_path):
    cfg = load_tiny()
    cfg["groups"]["g2"] = ["rot90", "nobody"]
    out = _fails(tmp_path, cfg)
    assert "groups.g2[1]" in out and "nobody" in out


def test_duplicate_experts_in_group(tmp_path):
    cfg = load_tiny()
    cfg["groups"]["g2"] = ["rot90", "rot90"]
    out = _fails(tmp_path, cfg)
    assert "non-unique" in out or "unique" in out


def test_unknown_top_level_key(tmp_path):
    cfg = copy.deepcopy(load_tiny())
    cfg["aplha_grid"] = [0.1]
    out = _fails(tmp_path, cfg)
    assert "aplha_grid" in out


def test_wrong_type(tmp_path):
    cfg = load_tiny()
    cfg["grid"]["alpha"] = "0.5"
    out = _fails(tmp_path, cfg)
    assert "alpha" in out
