"""Config validation: a wrong key, type or value fails before any job runs, naming the field."""

from __future__ import annotations

import copy
import re
import subprocess
import sys

import pytest
import yaml

from submerge.recipe import parse_config
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
    assert "sweep" in proc.stdout


@pytest.mark.parametrize("suite", sorted(p.stem for p in (ROOT / "config" / "suites").glob("*.yaml")))
def test_real_suite_dry_run_builds_the_full_dag(tmp_path, suite):
    path = ROOT / "config" / "suites" / f"{suite}.yaml"
    cfg = yaml.safe_load(path.read_text())
    proc = snakemake(tmp_path, path, "-n")
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", proc.stdout, re.MULTILINE))
    n_groups = len(cfg["groups"])
    expected_grid = sum(
        len(m.get("alpha", cfg["grid"]["alpha"]))
        * (len(m.get("beta", cfg["grid"]["beta"])) if "boost" in m else 1)
        for m in cfg["methods"].values())
    assert sum(len(m.grid()) for m in parse_config(cfg).methods.values()) == expected_grid
    assert int(counts["expert_model"]) == len(cfg["experts"])
    # one sweep (the whole α×β grid on validation + the chosen point on test) per merge
    assert int(counts["merged"]) == int(counts["sweep"]) == n_groups * len(cfg["methods"])


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


@pytest.mark.parametrize("edit, field", [
    (lambda c: c["grid"].update(alpha=[float("nan")]), "grid.alpha[0]"),
    (lambda c: c["grid"].update(alpha=[1e-7, 0.5, 0.5000001]), None),  # exact paths: fine
    (lambda c: c["methods"]["ta"].update(k=20), "methods.ta.k"),
    (lambda c: c["methods"]["ta"].update(beta=[0.1]), "methods.ta.beta"),
    (lambda c: c["experts"]["rot90"].update(task="rot45"), "experts.rot90.task"),
    (lambda c: c["groups"].update({"g\n": ["rot90"]}), "groups"),
])
def test_config_errors_fail_the_dry_run_in_one_line(tmp_path, edit, field):
    cfg = load_tiny()
    edit(cfg)
    path = write_config(tmp_path, cfg)
    proc = snakemake(tmp_path, path, "-n", check=field is None)
    if field is not None:
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0 and f"config field {field}" in out, out[-2000:]
        assert "$defs" not in out  # the failing field, not a dump of the schema


def test_schema_errors_name_the_field_not_the_schema(tmp_path):
    cfg = load_tiny()
    cfg["grid"]["alpha"] = ["x"]
    out = _fails(tmp_path, cfg)
    assert "config field grid.alpha.0" in out and "$defs" not in out and len(out) < 4000


def test_real_suite_config_errors_before_any_download(tmp_path):
    cfg = yaml.safe_load((ROOT / "config" / "suites" / "vit-b-32.yaml").read_text())
    first = next(iter(cfg["experts"]))
    no_data = copy.deepcopy(cfg)
    del no_data["experts"][first]["dataset"]
    assert f"config field experts.{first}.dataset" in _fails(tmp_path, no_data)
    no_head = copy.deepcopy(cfg)
    del no_head["experts"][first]["head"]
    assert f"config field experts.{first}.head" in _fails(tmp_path, no_head)
    no_clip = copy.deepcopy(cfg)
    del no_clip["zeroshot_model"]
    assert "config field zeroshot_model" in _fails(tmp_path, no_clip)
    upper = copy.deepcopy(cfg)  # an uppercase sha256 is accepted (hashes compare lowercased)
    upper["base"]["source"]["sha256"] = "AB" * 32
    snakemake(tmp_path, write_config(tmp_path, upper, "upper.yaml"), "-n")


def test_overrides_apply_on_top_of_the_default_config(tmp_path):
    """`--config gpu=False` (docs/slurm.md) without --configfile: the default config plus the
    override, not a config of that one key."""
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"),
                           "-d", str(tmp_path), "-n", "--config", "gpu=False"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "sweep" in proc.stdout and "gpu=1" not in proc.stdout


def test_a_second_run_on_the_same_suite_is_refused(tmp_path):
    from filelock import FileLock

    path = write_config(tmp_path, load_tiny())
    (tmp_path / "results" / "tiny").mkdir(parents=True)
    with FileLock(str(tmp_path / "results" / "tiny" / ".run.lock")):
        proc = snakemake(tmp_path, path, check=False)
    assert proc.returncode != 0
    assert "another run on suite 'tiny' is running" in proc.stdout + proc.stderr
    assert not (tmp_path / "results" / "tiny" / "models").exists()  # no job ran
