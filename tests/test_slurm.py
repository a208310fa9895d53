"""The workflow through `snakemake --profile profiles/slurm` on a real single-node SLURM cluster.

tests/slurm/cluster.sh starts the cluster (one node, two stand-in GPUs; `make test` runs it
before pytest, and the fixture below runs it again, which is instant when it is up). The tiny
config (experts outside its groups left out) runs twice, at the same time, in two copies of the
workflow: locally with `--cores 2`, and through sbatch with the shipped profile plus
tests/slurm/profile-overlay (squeue status polling, 2 s first check: this cluster has no
accounting daemon) and `eval: {points_per_job: 1}` in its config, so that every grid point is a
`sweep_part` job of its own before each (group, method)'s `sweep`. Both start from the same tiny
models, trained once locally beforehand. Conda channels are unreachable here, so the SLURM run
overrides the profile's `software-deployment-method: conda` with `--sdm env-modules`, which is a
no-op for rules without `envmodules:`: jobs run in the test's venv (on PATH, exported by sbatch).
The copy's workflow profile profiles/default is cut down to this node's size (2 CPUs).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SH = REPO / "tests" / "slurm" / "cluster.sh"
OVERLAY = REPO / "tests" / "slurm" / "profile-overlay"
TINY = REPO / "tests" / "configs" / "tiny.yaml"
# src too: the jobs' code fingerprints (params) and the code they run are the copy's, so that
# edits to the checkout while the test runs change neither the runs nor their reruns
WORKFLOW_FILES = ("Snakefile", "workflow", "config", "scripts", "envs", "profiles", "src")
STATE = Path(os.environ.get("SUBMERGE_SLURM_STATE", "/run/submerge-slurm"))
TASKS_LOG = STATE / "log" / "tasks.log"  # one line per SLURM task: job id and its GPUs
VENV_BIN = Path(sys.executable).parent
STAND_IN_GPUS = {"0", "1"}  # CUDA_VISIBLE_DEVICES values of the node's two stand-in GPUs

# "Job 3 has been submitted with SLURM jobid 17 (log: <dir>/.snakemake/slurm_logs/rule_merged/
# ta/17.log)": the folder after slurm_logs/ is rule_<rule> (the workflow has no job groups).
SUBMITTED = re.compile(
    r"has been submitted with SLURM jobid (\d+) \(log: (\S*/slurm_logs/([^/\s]+)/\S*?\d+\.log)\)"
)


def _suite() -> str:
    return yaml.safe_load(TINY.read_text())["suite"]


TARGET = f"results/{_suite()}/scores.csv"


# --- cluster and runs ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    """The local cluster, started if needed. Skips (loudly) only where it cannot be set up."""
    proc = subprocess.run(["bash", str(CLUSTER_SH), "up"], capture_output=True, text=True,
                          timeout=900)
    if proc.returncode == 3:
        pytest.skip("!!! SLURM INTEGRATION TEST SKIPPED: no SLURM cluster on this machine and "
                    "none can be set up (`bash tests/slurm/cluster.sh up` says: "
                    f"{proc.stderr.strip()[-500:]}) !!!")
    assert proc.returncode == 0, f"cluster.sh up failed:\n{proc.stdout}\n{proc.stderr}"
    sinfo = subprocess.run(["sinfo", "-h", "-o", "%T %G"], capture_output=True, text=True)
    assert sinfo.returncode == 0 and "gpu:" in sinfo.stdout, sinfo.stdout + sinfo.stderr


def _copy_workflow(dest: Path, points_per_job: int | None = None, source: Path = REPO) -> Path:
    dest.mkdir(parents=True)
    for name in WORKFLOW_FILES:
        src = source / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    cfg = yaml.safe_load(TINY.read_text())
    used = {e for members in cfg["groups"].values() for e in members}
    cfg["experts"] = {e: spec for e, spec in cfg["experts"].items() if e in used}  # fewer jobs
    if points_per_job is not None:
        cfg.setdefault("eval", {})["points_per_job"] = points_per_job
    (dest / "tiny.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    _fit_to_test_node(dest / "profiles" / "default" / "config.yaml")
    return dest


def _fit_to_test_node(profile: Path) -> None:
    """Cap the workflow profile's resources (sized for ViT-L/14) to the 2-CPU test node, keeping
    its keys, so that sbatch accepts the jobs and two run at a time."""
    if not profile.exists():
        return
    prof = yaml.safe_load(profile.read_text()) or {}

    def cap(res: dict) -> dict:
        res = dict(res)
        for key, limit in (("mem_mb", 2000), ("cpus_per_task", 1), ("runtime", 30)):
            if isinstance(res.get(key), int):
                res[key] = min(res[key], limit)
        return res

    if "default-resources" in prof:
        prof["default-resources"] = cap(prof["default-resources"])
    if "set-resources" in prof:
        prof["set-resources"] = {r: cap(v) for r, v in prof["set-resources"].items()}
    profile.write_text(yaml.safe_dump(prof, sort_keys=False))


def _env(workdir: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(workdir / "src"), env.get("PYTHONPATH"))
                                        if p)
    return env


class Run:
    """One snakemake invocation in a workflow copy, started in the background; output to a file."""

    def __init__(self, workdir: Path, *args: str):
        self.workdir = workdir
        self.log = workdir / f"snakemake-{time.monotonic_ns()}.out"
        cmd = [str(VENV_BIN / "snakemake"), TARGET, *args, "--configfile", "tiny.yaml"]
        self.t0 = time.monotonic()
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=workdir, env=_env(workdir), stdout=out,
                                         stderr=subprocess.STDOUT, text=True)

    def wait(self) -> "Run":
        try:
            self.returncode = self.proc.wait(timeout=1500)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self.wall_s = time.monotonic() - self.t0
        self.text = self.log.read_text()
        return self


def _snakemake(workdir: Path, *args: str) -> Run:
    return Run(workdir, *args).wait()


def _slurm_args() -> tuple[str, ...]:
    return ("--profile", "profiles/slurm", "--profile", str(OVERLAY), "--sdm", "env-modules")


def _slurm(workdir: Path) -> Run:
    return _snakemake(workdir, *_slurm_args())


def _ok(proc: Run, what: str) -> None:
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{proc.text[-12000:]}"


def _submissions(text: str) -> list[tuple[int, str, Path]]:
    """(SLURM job id, rule_<rule>, SLURM log) of each sbatch."""
    return [(int(j), folder, Path(log)) for j, log, folder in SUBMITTED.findall(text)]


def _job_stats(text: str) -> dict[str, int]:
    """The 'Job stats' table snakemake prints before running: rule -> number of jobs."""
    table = text.split("Job stats:", 1)[1].split("total", 1)[0]
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.MULTILINE)}


def _gpu_rules(text: str) -> set[str]:
    """Rules whose jobs snakemake printed with a `gpu=1` resource."""
    blocks = re.findall(r"rule (\w+):\n(?:[^\n]*\n)*?\s+resources: ([^\n]*)", text)
    return {rule for rule, res in blocks if re.search(r"\bgpu=1\b", res)}


def _task_gpus(since: int) -> dict[int, set[str]]:
    """SLURM job id -> CUDA_VISIBLE_DEVICES of its tasks, from the cluster's task prolog log."""
    out: dict[int, set[str]] = {}
    with open(TASKS_LOG, "rb") as fh:
        fh.seek(since)
        for line in fh.read().decode().splitlines():
            m = re.match(r"job=(\d+) step=\S+ CUDA_VISIBLE_DEVICES=(\S+)", line)
            if m:
                out.setdefault(int(m.group(1)), set()).add(m.group(2))
    return out


def _mtimes(root: Path) -> dict[str, int]:
    """Relative path -> mtime of the files under root, less the run lock (each run takes it)."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file() and p.name != ".run.lock"}


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory):
    """The tiny config run locally (`--cores 2`, one sweep job per (group, method)) and through
    SLURM (`eval.points_per_job: 1`: the grids split into one sweep_part job per point), each in
    its own copy of the workflow, at the same time. To keep the test short, both start from the
    same trained tiny models (built once, locally): the SLURM run does everything after them."""
    base = tmp_path_factory.mktemp("slurm")
    local_dir = _copy_workflow(base / "local")
    models = _snakemake(local_dir, "--cores", "2", "--until", "expert_model")
    _ok(models, "building the tiny models")
    slurm_dir = _copy_workflow(base / "slurm", points_per_job=1, source=local_dir)  # same code
    for done in ("results", ".snakemake/metadata"):  # copy2: mtimes kept
        shutil.copytree(local_dir / done, slurm_dir / done)
    tasks_log_start = TASKS_LOG.stat().st_size
    slurm, local = Run(slurm_dir, *_slurm_args()), Run(local_dir, "--cores", "2")
    slurm.wait(), local.wait()
    _ok(local, "local run")
    _ok(slurm, "SLURM run")
    print(f"\nmodels {models.wall_s:.0f} s, then at the same time: local run {local.wall_s:.0f} s,"
          f" SLURM run {slurm.wall_s:.0f} s")
    return {"local_dir": local_dir, "slurm_dir": slurm_dir, "local": local, "slurm": slurm,
            "task_gpus": _task_gpus(tasks_log_start)}


# --- tests, in execution order (the last one changes the SLURM copy) ------------------------------


def test_profile_edit_lines_reach_every_job(tmp_path):
    """Uncommenting the profile's account/partition lines (what docs/slurm.md tells users to do)
    gives every job those resources, also with the workflow profile profiles/default in play.
    A dry run: needs no cluster."""
    workdir = _copy_workflow(tmp_path / "wf")
    profile = workdir / "profiles" / "slurm" / "config.yaml"
    text, n = re.subn(r"^(\s*)# (slurm_(?:account|partition):)", r"\1\2", profile.read_text(),
                      flags=re.MULTILINE)
    assert n == 2, "profiles/slurm/config.yaml lost its slurm_account/slurm_partition lines"
    profile.write_text(text)
    edited = yaml.safe_load(text)["default-resources"]
    proc = _snakemake(workdir, "-n", "--profile", "profiles/slurm", "--sdm", "env-modules")
    _ok(proc, "dry run")
    resources = re.findall(r"^\s+resources: ([^\n]*)", proc.text, re.MULTILINE)
    assert resources, proc.text[-3000:]
    for line in resources:
        for key in ("slurm_account", "slurm_partition"):
            assert f"{key}={edited[key]}" in line, (key, line)


def test_gpu_false_requests_no_gpu(tmp_path):
    """On a cluster without GPUs, `--config gpu=False` leaves no job asking for one (sbatch would
    reject them). A dry run with the profile: needs no cluster."""
    workdir = _copy_workflow(tmp_path / "wf")
    args = ("-n", "--profile", "profiles/slurm", "--sdm", "env-modules")
    with_gpu = _snakemake(workdir, *args)
    without = _snakemake(workdir, *args, "--config", "gpu=False")
    _ok(with_gpu, "dry run")
    _ok(without, "dry run with gpu=false")
    assert _gpu_rules(with_gpu.text)  # the switch is what takes them away
    assert re.findall(r"^\s+resources: ", without.text, re.MULTILINE)
    assert not _gpu_rules(without.text), _gpu_rules(without.text)


def test_every_job_goes_through_sbatch(runs):
    proc, workdir = runs["slurm"], runs["slurm_dir"]
    planned = _job_stats(proc.text)
    subs = _submissions(proc.text)
    per_folder: dict[str, int] = {}
    for _, folder, _ in subs:
        per_folder[folder] = per_folder.get(folder, 0) + 1
    # one sbatch per job, in the SLURM log folder of its rule
    assert {"merged", "sweep_part", "sweep", "scores"} <= set(planned), planned
    assert {f"rule_{r}": n for r, n in planned.items()} == per_folder
    assert len({jobid for jobid, _, _ in subs}) == len(subs)
    for jobid, folder, _ in subs:  # each ran on the cluster, in the SLURM copy, and finished
        info = subprocess.run(["scontrol", "show", "job", str(jobid)], capture_output=True,
                              text=True).stdout
        assert "JobState=COMPLETED" in info, (jobid, folder, info)
        assert f"WorkDir={workdir}" in info, info


def test_gpu_rules_get_a_stand_in_gpu(runs):
    proc = runs["slurm"]
    gpu_rules = _gpu_rules(proc.text)
    assert {"merged", "reference", "sweep_part", "sweep"} <= gpu_rules, gpu_rules
    assert "scores" not in gpu_rules, gpu_rules
    task_gpus = runs["task_gpus"]
    n_gpu_jobs = 0
    for jobid, folder, _ in _submissions(proc.text):
        rule = folder.removeprefix("rule_")
        seen = task_gpus.get(jobid)
        assert seen, f"no task of SLURM job {jobid} ({folder}) in {TASKS_LOG}"
        info = subprocess.run(["scontrol", "show", "job", "-d", str(jobid)],
                              capture_output=True, text=True).stdout
        if rule in gpu_rules:
            n_gpu_jobs += 1
            assert "JOB_GRES=gpu:1" in info, (folder, info)
            assert seen <= STAND_IN_GPUS, (folder, seen)  # every task saw one stand-in GPU
        else:
            assert "JOB_GRES=gpu" not in info, (folder, info)
            assert seen == {"none"}, (folder, seen)
    assert n_gpu_jobs >= 3


def _point_records(paths) -> dict[tuple, dict]:
    """(group, method, α, β, split) -> accuracies, of the point records among JSON files
    (provenance sidecars, <output>.json, are left out)."""
    out = {}
    for path in paths:
        rec = json.loads(Path(path).read_text())
        for r in rec.get("points", [rec]):
            if "split" in r and "accuracy" in r:
                out[(r["group"], r["method"], r["alpha"], r["beta"], r["split"])] = r["accuracy"]
    return out


def test_sweep_parts_are_separate_slurm_jobs(runs):
    """With `eval.points_per_job: 1` each grid point is a sweep_part job, submitted on its own
    and evaluating its point into the results cache; each (group, method)'s sweep is one more job
    that takes every validation point from the cache and evaluates only its test point. The
    scores equal the local run's, whose sweeps were not split (test_results_equal_local_run)."""
    proc, results = runs["slurm"], runs["slurm_dir"] / "results" / _suite()
    planned = _job_stats(proc.text)
    parts = sorted(results.glob("grid/*/*.parts/*.json"))
    sweeps = _point_records(results.glob("test/*/*.json"))  # their chosen points on test
    assert planned["sweep_part"] == len(parts) >= 4, (planned, parts)
    assert planned["sweep"] == len(sweeps) >= 2, (planned, sweeps)
    part_jobs = [j for j, folder, _ in _submissions(proc.text) if folder == "rule_sweep_part"]
    assert len(part_jobs) == len(set(part_jobs)) == len(parts), part_jobs
    for part in parts:  # every part computed its one point (none was cached before)
        assert json.loads(part.read_text())["evaluated"] == 1, part
    # the sweeps' per-point files hold exactly the parts' points, with the parts' accuracies
    from_parts = _point_records(parts)
    swept = _point_records(p for p in results.glob("grid/*/*/*.json")
                           if p.parent.suffix != ".parts")
    assert len(from_parts) == len(parts) and swept == from_parts, (from_parts, swept)
    # one cache entry per evaluation, as many as the local run's unsplit sweeps made
    cached = list((results / "cache" / "points").rglob("*.json"))
    local_cached = list((runs["local_dir"] / "results" / _suite() / "cache" / "points")
                        .rglob("*.json"))
    assert len(cached) == len(parts) + len(sweeps) == len(local_cached), (cached, local_cached)


def _scores(workdir: Path) -> pd.DataFrame:
    df = pd.read_csv(workdir / TARGET)
    keys = [c for c in df.columns if df[c].dtype == object]
    return df.sort_values(keys).reset_index(drop=True)


def test_results_equal_local_run(runs):
    local, slurm = _scores(runs["local_dir"]), _scores(runs["slurm_dir"])
    assert len(local) > 0 and {"ta", "ta_sb"} <= set(local["method"])
    pd.testing.assert_frame_equal(local, slurm, check_exact=False, rtol=1e-9, atol=0)


def test_failed_job_is_reported_and_rerun_redoes_only_it(runs, tmp_path):
    """Corrupt one merged cache (mtime kept, so nothing looks stale) and delete the outputs of
    the sweep that reads it (its grid folder and test file) and scores.csv (snakemake does not
    remake a missing intermediate file while everything downstream is up to date): exactly that
    sweep's job fails (its sweep_part jobs are done and stay so). Repair the cache and rerun:
    only that sweep and scores run, the sweep evaluates nothing (every point is in the results
    cache, which gains no entry), every other result file stays untouched, the scores are as
    before."""
    workdir = runs["slurm_dir"]
    results = workdir / "results" / _suite()
    grid = sorted(p for p in results.glob("grid/*/*") if p.is_dir() and p.suffix != ".parts")[0]
    group, method = grid.parent.name, grid.name
    test = results / "test" / group / f"{method}.json"
    cache = results / "merged" / group / f"{method}.h5"
    points_cache = results / "cache" / "points"
    backup = tmp_path / "cache.h5"
    shutil.copy2(cache, backup)
    before = _mtimes(results)
    cached_before = set(_mtimes(points_cache))
    assert cached_before

    shutil.rmtree(grid)
    test.unlink()
    (results / "scores.csv").unlink()
    stat = cache.stat()
    try:
        cache.write_bytes(b"\0not an hdf5 file\0" * 64)
        os.utime(cache, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        failed = _slurm(workdir)
    finally:
        shutil.copy2(backup, cache)  # content and mtime as before
    rel = str(grid.relative_to(workdir))
    assert failed.returncode != 0, failed.text[-5000:]
    assert _job_stats(failed.text) == {"sweep": 1, "scores": 1}, failed.text[-5000:]
    assert re.search(r"Error in rule sweep:(?:\n[^\n]*){0,8}" + re.escape(rel),
                     failed.text), failed.text[-5000:]
    subs = _submissions(failed.text)  # the job, and its retry (profile: retries: 1)
    assert subs and all(folder == "rule_sweep" for _, folder, _ in subs), subs
    for jobid, _, log in subs:
        info = subprocess.run(["scontrol", "show", "job", str(jobid)], capture_output=True,
                              text=True).stdout
        assert "JobState=FAILED" in info, info
        # the SLURM log is kept, and the job failed for the reason we gave it
        assert "file signature not found" in log.read_text(), log
    assert not test.exists() and not any(grid.glob("*.json"))
    assert set(_mtimes(points_cache)) == cached_before

    rerun = _slurm(workdir)
    _ok(rerun, "rerun after repair")
    assert _job_stats(rerun.text) == {"sweep": 1, "scores": 1}
    after = _mtimes(results)
    assert set(after) == set(before), set(after) ^ set(before)  # no new cache entry either
    changed = {f for f in before if after[f] != before[f]}
    # the sweep's outputs and scores.csv (with their provenance sidecars, <output>.json)
    redone = {f for f in before
              if f.startswith((f"grid/{group}/{method}/", f"test/{group}/{method}.json",
                               "scores.csv"))}
    assert {f"test/{group}/{method}.json", "scores.csv"} < redone
    assert any(f.startswith(f"grid/{group}/{method}/") for f in redone), redone
    assert changed == redone, changed
    pd.testing.assert_frame_equal(_scores(workdir), _scores(runs["local_dir"]),
                                  check_exact=False, rtol=1e-9, atol=0)
