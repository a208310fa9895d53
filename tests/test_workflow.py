"""The workflow end to end on a tiny digits config, then incremental reruns: after each config
change the next dry run must plan exactly the jobs that depend on the change, and nothing else."""

from __future__ import annotations

import copy
import json
import math

import pandas as pd
import pytest

from workflow_utils import load_tiny, planned_jobs, snakemake, write_config

pytestmark = pytest.mark.slow


def _grid(group, method, alphas, betas):
    return {("grid_point", f"results/tiny/grid/{group}/{method}/a{a}_b{b}.json")
            for a in alphas for b in betas}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One full run of the tiny config, two groups (g2 ⊂ g3)."""
    workdir = tmp_path_factory.mktemp("tiny")
    cfg = load_tiny()
    cfg["groups"]["g3"] = ["rot90", "parity", "invert"]
    path = write_config(workdir, cfg)
    snakemake(workdir, path)
    return workdir, cfg


def test_full_run_outputs(tiny_run):
    workdir, cfg = tiny_run
    root = workdir / "results" / "tiny"
    scores = pd.read_csv(root / "scores.csv")
    # one row per (group, method, alpha, beta, split, task)
    val = scores[scores.split == "val"]
    expected_val = sum(len(cfg["groups"][g]) * len(cfg["grid"]["alpha"])
                       * (len(cfg["grid"]["beta"]) if "boost" in m else 1)
                       for g in cfg["groups"] for m in cfg["methods"].values())
    assert len(val) == expected_val
    test = scores[scores.split == "test"]
    assert len(test) == sum(len(cfg["groups"][g]) * len(cfg["methods"]) for g in cfg["groups"])
    assert scores.accuracy.between(0, 1).all()
    # the test point is the validation argmax of the mean normalised accuracy
    for (group, method), rows in val.groupby(["group", "method"]):
        rows = rows.assign(norm=rows.accuracy / rows.expert_accuracy)
        means = rows.groupby(["alpha", "beta"], dropna=False).norm.mean()
        best = means.max()
        chosen = json.loads((root / "test" / group / f"{method}.json").read_text())
        beta = math.nan if chosen["beta"] is None else chosen["beta"]
        key = (chosen["alpha"], beta)
        got = [v for (a, b), v in means.items()
               if a == key[0] and ((math.isnan(b) and math.isnan(key[1])) or b == key[1])]
        assert got and got[0] == pytest.approx(best)
    # every rule left a log and a benchmark file
    assert any((workdir / "logs" / "tiny" / "grid").rglob("*.log"))
    assert any((workdir / "benchmarks" / "tiny" / "merged").rglob("*.tsv"))


def test_nothing_changed_plans_nothing(tiny_run):
    workdir, cfg = tiny_run
    assert planned_jobs(workdir, write_config(workdir, cfg, "same.yaml")) == set()


def test_adding_an_expert_reruns_only_what_depends_on_it(tiny_run):
    workdir, cfg = tiny_run
    cfg = copy.deepcopy(cfg)
    cfg["experts"]["mod3"] = {"build": "digits", "task": "mod3"}
    cfg["groups"]["g3"].append("mod3")
    jobs = planned_jobs(workdir, write_config(workdir, cfg, "add_expert.yaml"))
    r = "results/tiny"
    expected = {
        ("expert_model", f"{r}/models/experts/mod3.safetensors"),
        ("task_vector", f"{r}/taskvectors/mod3.h5"),
        ("expert_spectrum", f"{r}/spectra/mod3.h5"),
        ("reference", f"{r}/reference/mod3.json"),
        ("hogsvd", f"{r}/hogsvd/g3.h5"),
        ("merged", f"{r}/merged/g3/ta.h5"),
        ("merged", f"{r}/merged/g3/ta_sb.h5"),
        ("test_point", f"{r}/test/g3/ta.json"),
        ("test_point", f"{r}/test/g3/ta_sb.json"),
        ("scores", f"{r}/scores.csv"),
        # g3 is the largest group: its HO-GSVD summary feeds the alignment figures
        ("hogsvd_summary", f"{r}/summaries/hogsvd_summary.json"),
    } | _grid("g3", "ta", ["0.5", "1"], ["none"]) | _grid("g3", "ta_sb", ["0.5", "1"], ["0"])
    assert jobs == expected | REPORT_JOBS


def test_adding_a_grid_point_runs_only_the_new_points(tiny_run):
    workdir, cfg = tiny_run
    cfg = copy.deepcopy(cfg)
    cfg["grid"]["alpha"].append(0.75)
    jobs = planned_jobs(workdir, write_config(workdir, cfg, "add_alpha.yaml"))
    r = "results/tiny"
    expected = {("scores", f"{r}/scores.csv")}
    for g in cfg["groups"]:
        expected |= _grid(g, "ta", ["0.75"], ["none"]) | _grid(g, "ta_sb", ["0.75"], ["0"])
        expected |= {("test_point", f"{r}/test/{g}/{m}.json") for m in cfg["methods"]}
    assert jobs == expected | REPORT_JOBS


def test_changing_one_methods_hyperparameter_reruns_only_that_method(tiny_run):
    workdir, cfg = tiny_run
    cfg = copy.deepcopy(cfg)
    cfg["methods"]["ta_sb"]["boost"] = {"attn_mode": "full"}
    jobs = planned_jobs(workdir, write_config(workdir, cfg, "change_method.yaml"))
    r = "results/tiny"
    expected = {("scores", f"{r}/scores.csv")}
    for g in cfg["groups"]:
        expected |= {("merged", f"{r}/merged/{g}/ta_sb.h5"),
                     ("test_point", f"{r}/test/{g}/ta_sb.json")}
        expected |= _grid(g, "ta_sb", ["0.5", "1"], ["0"])
    assert jobs == expected | REPORT_JOBS


# the report rules depend on everything aggregated: they rerun after any change
REPORT_JOBS = {("spectra_summary", "results/tiny/summaries/spectra_summary.csv"),
               ("tables", "results/tiny/tables/main_results.csv"),
               ("figures", "results/tiny/figures/rank_collapse.png")}
