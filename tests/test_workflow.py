"""The workflow end to end on a tiny digits config, then incremental reruns: after each change
the next run must plan exactly the jobs that depend on it, and evaluate (compute, not read from
the results cache) exactly the grid points whose result can have changed."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from workflow_utils import ROOT, load_tiny, planned_jobs, snakemake, write_config

pytestmark = pytest.mark.slow

R = "results/tiny"


def _sweeps(groups, methods):
    return {("sweep", f"{R}/grid/{g}/{m}") for g in groups for m in methods}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One full run of the tiny config, two groups (g2 ⊂ g3)."""
    workdir = tmp_path_factory.mktemp("tiny")
    cfg = load_tiny()
    cfg["groups"]["g3"] = ["rot90", "parity", "invert"]
    path = write_config(workdir, cfg)
    snakemake(workdir, path)
    return workdir, cfg


@pytest.fixture
def copy_of_run(tiny_run, tmp_path):
    """A copy of the finished run (results, logs and Snakemake's records), to change freely."""
    workdir, cfg = tiny_run
    shutil.copytree(workdir, tmp_path / "run", symlinks=True)
    return tmp_path / "run", copy.deepcopy(cfg)


def _evaluations(workdir: Path) -> dict[str, set]:
    """The evaluations in the results cache: split -> {(group-independent key)}."""
    out: dict[str, set] = {"val": set(), "test": set()}
    for path in (workdir / R / "cache" / "points").rglob("*.json"):
        entry = json.loads(path.read_text())
        out[entry["what"]["split"]].add(path.name)
    return out


def _run_counting(workdir: Path, cfg: dict, name: str) -> tuple[set, dict[str, int]]:
    """(planned jobs, evaluations computed per split) of running ``cfg`` in ``workdir``."""
    path = write_config(workdir, cfg, name)
    jobs = planned_jobs(workdir, path)
    before = _evaluations(workdir)
    snakemake(workdir, path)
    after = _evaluations(workdir)
    return jobs, {split: len(after[split] - before[split]) for split in after}


def test_full_run_outputs(tiny_run):
    workdir, cfg = tiny_run
    root = workdir / R
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
    # one evaluation per grid point on validation, one test evaluation per (group, method)
    n_points = expected_val // sum(len(m) for m in cfg["groups"].values()) * len(cfg["groups"])
    evals = _evaluations(workdir)
    assert len(evals["val"]) == n_points and len(evals["test"]) == len(test.groupby(["group", "method"]))
    # the default export: the largest group's boosted method, loadable in open_clip's format
    exported = sorted(p.name for p in (root / "export").rglob("*.safetensors"))
    assert exported == ["head_invert.safetensors", "head_parity.safetensors",
                        "head_rot90.safetensors", "open_clip_visual.safetensors"]
    assert (root / "export" / "g3" / "ta_sb" / "README.md.json").is_file()
    # every rule left a log and a benchmark file
    assert any((workdir / "logs" / "tiny" / "sweep").rglob("*.log"))
    assert any((workdir / "benchmarks" / "tiny" / "merged").rglob("*.tsv"))


def test_nothing_changed_plans_nothing(tiny_run):
    workdir, cfg = tiny_run
    assert planned_jobs(workdir, write_config(workdir, cfg, "same.yaml")) == set()


def test_settings_that_change_no_result_rerun_nothing(tiny_run):
    workdir, cfg = tiny_run
    cfg = copy.deepcopy(cfg)
    cfg["eval"]["batch_size"] = 7
    cfg["device"] = "auto"
    cfg["groups"]["g3"] = list(reversed(cfg["groups"]["g3"]))  # a group is a set
    cfg["warm_worker"] = False  # where jobs start (submerge.worker), not what they compute
    assert planned_jobs(workdir, write_config(workdir, cfg, "runtime.yaml")) == set()


def test_jobs_run_in_the_warm_worker_and_compute_what_their_own_processes_compute(copy_of_run):
    workdir, cfg = copy_of_run
    log = (workdir / "logs" / "tiny" / "warm_worker.log").read_text()
    for script in ("base_model", "expert_model", "merged", "sweep", "scores", "tables"):
        assert f"/{script}.py" in log or f".{script}.py" in log, script  # ran in the worker
    sweep = workdir / R / "grid" / "g3" / "ta_sb"
    results = sorted(sweep.glob("a*_b*[0-9].json")) + [workdir / R / "test" / "g3" / "ta_sb.json"]
    before = {p: p.read_bytes() for p in results}
    # g3's TA + SB merge and sweep again, each job in a process of its own, nothing cached
    shutil.rmtree(sweep)
    results[-1].unlink()
    shutil.rmtree(workdir / R / "cache" / "points")
    (workdir / R / "merged" / "g3" / "ta_sb.h5").unlink()
    cfg["warm_worker"] = False
    snakemake(workdir, write_config(workdir, cfg, "cold.yaml"), f"{R}/test/g3/ta_sb.json")
    # g3's 2 alphas x 1 beta and the chosen point, computed again
    assert {k: len(v) for k, v in _evaluations(workdir).items()} == {"val": 2, "test": 1}
    assert {p: p.read_bytes() for p in results} == before
    assert (workdir / "logs" / "tiny" / "warm_worker.log").read_text() == log  # none started


def test_adding_an_expert_reruns_only_what_depends_on_it(copy_of_run):
    workdir, cfg = copy_of_run
    cfg["experts"]["mod3"] = {"build": "digits", "task": "mod3"}
    cfg["groups"]["g3"].append("mod3")
    jobs, evaluated = _run_counting(workdir, cfg, "add_expert.yaml")
    expected = {
        ("expert_model", f"{R}/models/experts/mod3.safetensors"),
        ("reference", f"{R}/reference/mod3.json"),
        ("hogsvd", f"{R}/hogsvd/g3.h5"),
        ("merged", f"{R}/merged/g3/ta.h5"),
        ("merged", f"{R}/merged/g3/ta_sb.h5"),
        ("scores", f"{R}/scores.csv"),
        # g3 is the largest group: its HO-GSVD summary feeds the alignment figures
        ("hogsvd_summary", f"{R}/summaries/hogsvd_summary.json"),
        # and the Proposition 1 figure
        ("decay_summary", f"{R}/summaries/decay_summary.json"),
    } | _sweeps(["g3"], ["ta", "ta_sb"])
    assert jobs == expected | REPORT_JOBS | EXPORT_JOBS
    # only g3's points: 2 alphas for ta, 2 alphas x 1 beta for ta_sb; and their test points
    assert evaluated == {"val": 4, "test": 2}


def test_adding_a_grid_point_evaluates_only_the_new_points(copy_of_run):
    workdir, cfg = copy_of_run
    cfg["grid"]["alpha"].append(0.75)
    jobs, evaluated = _run_counting(workdir, cfg, "add_alpha.yaml")
    assert jobs == ({("scores", f"{R}/scores.csv")} | _sweeps(cfg["groups"], cfg["methods"])
                    | REPORT_JOBS | EXPORT_JOBS)
    assert evaluated["val"] == 2 * 2  # one new alpha in 2 groups x 2 methods
    # a test evaluation only where the new point is chosen
    chosen_new = sum(json.loads((workdir / R / "test" / g / f"{m}.json").read_text())["alpha"] == 0.75
                     for g in cfg["groups"] for m in cfg["methods"])
    assert evaluated["test"] == chosen_new


def test_changing_the_selection_metric_reruns_only_the_choice(copy_of_run):
    workdir, cfg = copy_of_run
    cfg["eval"]["selection_metric"] = "absolute"
    jobs, evaluated = _run_counting(workdir, cfg, "metric.yaml")
    assert jobs == ({("scores", f"{R}/scores.csv")} | _sweeps(cfg["groups"], cfg["methods"])
                    | REPORT_JOBS | EXPORT_JOBS)
    assert evaluated["val"] == 0 and evaluated["test"] <= 4


def test_changing_one_methods_hyperparameter_reruns_only_that_method(tiny_run):
    workdir, cfg = tiny_run
    cfg = copy.deepcopy(cfg)
    cfg["methods"]["ta_sb"]["boost"] = {"attn_mode": "full"}
    jobs = planned_jobs(workdir, write_config(workdir, cfg, "change_method.yaml"))
    expected = {("scores", f"{R}/scores.csv")}
    for g in cfg["groups"]:
        expected |= {("merged", f"{R}/merged/{g}/ta_sb.h5")}
    expected |= _sweeps(cfg["groups"], ["ta_sb"])
    assert jobs == expected | REPORT_JOBS | EXPORT_JOBS


def _repo_copy(dest: Path) -> Path:
    """The files the workflow runs, copied (new mtimes: like a fresh clone of the commit)."""
    dest.mkdir(parents=True)
    for name in ("Snakefile", "workflow", "scripts", "src", "profiles", "envs", "config"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(src, dest / name)
    return dest / "Snakefile"


def test_code_changes_rerun_only_what_runs_them(tiny_run, tmp_path):
    """A fresh copy of the code, a touched script, a docstring or comment change: nothing
    reruns. A real change to the merge code: the merges and what follows rerun, not the
    checkpoints."""
    workdir, cfg = tiny_run
    snakefile = _repo_copy(tmp_path / "repo")
    path = write_config(workdir, cfg, "code.yaml")
    assert planned_jobs(workdir, path, snakefile=snakefile) == set()

    (tmp_path / "repo" / "scripts" / "sweep.py").touch()
    lines = tmp_path / "repo" / "src" / "submerge" / "merging" / "lines.py"
    lines.write_text(lines.read_text().replace('"""LiNeS:', '"""LiNeS (reworded docstring):', 1)
                     + "\n# a comment\n")
    assert planned_jobs(workdir, path, snakefile=snakefile) == set()

    stage = tmp_path / "repo" / "src" / "submerge" / "stages" / "merge.py"
    stage.write_text(stage.read_text() + "\n_CHANGED = True\n")
    rules = {rule for rule, _ in planned_jobs(workdir, path, snakefile=snakefile)}
    assert {"merged", "sweep", "scores"} <= rules
    assert not rules & {"base_model", "expert_model", "hogsvd"}, rules


# the default export (config field export): the largest group's boosted method, at its chosen
# point; it reruns whenever that sweep does
EXPORT_JOBS = {("export", f"{R}/export/g3/ta_sb")}
# the report rules depend on everything aggregated: they rerun after any change
REPORT_JOBS = {("spectra_summary", f"{R}/summaries/spectra_summary.csv"),
               ("tables", f"{R}/tables/main_results.csv"),
               ("figures", f"{R}/figures/rank_collapse.png"),
               ("report_overview", f"{R}/report/overview.html")}
