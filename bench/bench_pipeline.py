"""Benchmark: the workflow (`snakemake --cores 2`, as `make run` runs it) against the same stage
functions called one after another in one Python process, side by side on the same config,
each in a fresh working directory; then the per-rule breakdown of the workflow run (jobs,
start-up, work) from its logs and benchmark files.

    .venv/bin/python bench/bench_pipeline.py [--config config/config.yaml] [--out bench/pipeline.md]

Both runs must give the same scores.csv (checked). Start-up is the time from a job's process
start to its stage call (logged by submerge.logs.setup_logging); work is the rest of the job's
wall time (Snakemake's benchmark file).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run_single_process(cfg: dict, workdir: Path) -> float:
    """Every stage of the workflow for ``cfg``, in DAG order, in this process (one start-up)."""
    start = time.perf_counter()
    os.chdir(workdir)
    import torch

    torch.set_num_threads(1)  # as each workflow job (snakemake.threads): same arithmetic
    from submerge import merges
    from submerge.recipe import parse_config
    from submerge.report.build import build_figures, build_tables
    from submerge.stages import checkpoints, evaluate, merge, report, selection, spectra, taskvectors

    recipe = parse_config(cfg)
    suite, R = recipe.suite, f"results/{recipe.suite.name}"
    view = lambda *e: type(suite).from_params(recipe.suite_view(e))  # noqa: E731
    base = f"{R}/models/base.safetensors"
    checkpoints.build_base(view(), base)
    for e in recipe.experts:
        model, tv = f"{R}/models/experts/{e}.safetensors", f"{R}/taskvectors/{e}.h5"
        checkpoints.build_expert(view(e), e, base, model, f"{R}/heads/{e}.safetensors")
        taskvectors.make_task_vector(view(e), e, base, model, tv)
        spectra.expert_spectrum(tv, f"{R}/spectra/{e}.h5")
        evaluate.run_reference(view(e), e, base, model, f"{R}/reference/{e}.json", recipe.eval)
    tvs = {g: [f"{R}/taskvectors/{e}.h5" for e in recipe.members(g)] for g in recipe.groups}
    for g in recipe.groups:
        spectra.hogsvd_group(recipe.members(g), tvs[g], f"{R}/hogsvd/{g}.h5", recipe.hogsvd)
    for g in {g for g, m in recipe.pairs() if merges.TALL_LAMBDAS in recipe.methods[m].needs}:
        merge.choose_tall_lambdas(view(*recipe.members(g)), recipe.members(g), base, tvs[g],
                                  recipe.consensus_lambdas, f"{R}/merged/{g}/tall_lambdas.json",
                                  recipe.eval)
    points, tests = [], []
    for g, m in recipe.pairs():
        method, members = recipe.methods[m], recipe.members(g)
        extra = {merges.TALL_LAMBDAS: f"{R}/merged/{g}/tall_lambdas.json",
                 merges.HOGSVD_CACHE: f"{R}/hogsvd/{g}.h5"}
        merge.merge_group(members, tvs[g], method, f"{R}/merged/{g}/{m}.h5",
                          extra_paths={n: extra[n] for n in method.needs})
        evaluate.run_sweep(view(*members), members, method, g, method.grid(), base,
                           f"{R}/merged/{g}/{m}.h5",
                           [f"{R}/heads/{e}.safetensors" for e in members],
                           [f"{R}/reference/{e}.json" for e in members], f"{R}/grid/{g}/{m}",
                           f"{R}/test/{g}/{m}.json", recipe.eval, f"{R}/cache/points")
        points += [f"{R}/grid/{g}/{m}/{p.name}.json" for p in method.grid()]
        tests.append(f"{R}/test/{g}/{m}.json")
    from submerge.stages import export  # rule export

    for g, m in recipe.export:
        members = recipe.members(g)
        export.export_model(view(*members), members, recipe.methods[m], g, base,
                            f"{R}/merged/{g}/{m}.h5", f"{R}/test/{g}/{m}.json", f"{R}/grid/{g}/{m}",
                            [f"{R}/heads/{e}.safetensors" for e in members],
                            [f"{R}/models/experts/{e}.safetensors" for e in members],
                            f"{R}/export/{g}/{m}", device="cpu")
    refs = [f"{R}/reference/{e}.json" for e in recipe.experts]
    evaluate.aggregate_scores(suite.name, recipe.groups, points, tests, refs, f"{R}/scores.csv")
    inputs = {"scores": [f"{R}/scores.csv"], "benchmarks": []}
    if recipe.selection:
        sel, universe = recipe.selection, recipe.members(recipe.selection.universe)
        method = recipe.methods[sel.method]
        runs = [f"{R}/selection/runs/{run}.csv" for run in sel.runs()]
        for run, out in zip(sel.runs(), runs):
            selection.run_selection_draw(view(*universe), universe, sel, method, method.alphas,
                                         method.betas, run, f"{R}/hogsvd/{sel.universe}.h5",
                                         tvs[sel.universe],
                                         [f"{R}/reference/{e}.json" for e in universe], base,
                                         out, recipe.eval)
        selection.aggregate_selection(runs, f"{R}/selection/selection.csv")
        inputs["selection"] = [f"{R}/selection/selection.csv"]
    pairs = recipe.pairs()
    report.spectra_summary({(g, m): f"{R}/merged/{g}/{m}.h5" for g, m in pairs},
                           {(g, m): f"{R}/test/{g}/{m}.json" for g, m in pairs},
                           {g: len(v) for g, v in recipe.groups.items()}, recipe.methods,
                           f"{R}/summaries/spectra_summary.csv", f"{R}/summaries/singular_values.csv")
    big = recipe.largest_group()
    report.hogsvd_summary(f"{R}/hogsvd/{big}.h5", tvs[big], big, f"{R}/summaries/hogsvd_summary.json")
    inputs.update(spectra_summary=[f"{R}/summaries/spectra_summary.csv"],
                  singular_values=[f"{R}/summaries/singular_values.csv"],
                  hogsvd_summary=[f"{R}/summaries/hogsvd_summary.json"])
    if recipe.table8:  # rule table8
        from submerge.stages import beta_grid

        t8 = recipe.table8
        mem = recipe.members(t8.group)
        beta_grid.run_table8(view(*mem), mem, recipe.methods[t8.method], t8, base,
                             f"{R}/merged/{t8.group}/{t8.method}.h5",
                             [f"{R}/heads/{e}.safetensors" for e in mem],
                             [f"{R}/reference/{e}.json" for e in mem],
                             f"{R}/experiments/table8.csv", recipe.eval, f"{R}/cache/points")
        inputs["table8"] = [f"{R}/experiments/table8.csv"]
    from submerge.recipe import DEFAULT_DECAY_THRESHOLD
    from submerge.stages import decay  # rule decay_summary

    decay.decay_summary(f"{R}/hogsvd/{big}.h5", tvs[big], big,
                        f"{R}/summaries/decay_summary.json", DEFAULT_DECAY_THRESHOLD)
    inputs["decay_summary"] = [f"{R}/summaries/decay_summary.json"]
    build_tables(inputs, recipe, f"{R}/tables", config=cfg)
    build_figures(inputs, recipe, f"{R}/figures", config=cfg)
    from submerge.report import landing  # rule report_overview

    landing.write_overview(recipe, cfg, R, f"{R}/tables/{landing.MAIN_TABLE}.html",
                           landing.caption_texts(ROOT.glob("workflow/report/*.rst")))
    return time.perf_counter() - start


def run_workflow(config: Path, workdir: Path, warm: bool = True) -> float:
    cmd = [str(Path(sys.executable).parent / "snakemake"), "-s", str(ROOT / "Snakefile"),
           "-d", str(workdir), "--configfile", str(config), "--cores", "2", "-q",
           "--config", f"warm_worker={warm}"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def breakdown(workdir: Path, suite: str) -> list[tuple[str, int, float, float]]:
    """(rule, jobs, start-up s, work s) of a finished workflow run, summed over jobs."""
    rows: dict[str, list[float]] = {}
    for tsv in (workdir / "benchmarks" / suite).rglob("*.tsv"):
        rel = tsv.relative_to(workdir / "benchmarks" / suite)
        log = (workdir / "logs" / suite / rel).with_suffix(".log")
        total = float(tsv.read_text().splitlines()[1].split("\t")[0])
        m = re.search(r"start-up: ([0-9.]+) s", log.read_text()) if log.exists() else None
        startup = float(m.group(1)) if m else 0.0
        rule = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        r = rows.setdefault(rule, [0, 0.0, 0.0])
        r[0] += 1
        r[1] += startup
        r[2] += total - startup
    return sorted(((k, int(v[0]), v[1], v[2]) for k, v in rows.items()), key=lambda r: -r[2] - r[3])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "config" / "config.yaml"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "pipeline.md"))
    ap.add_argument("--cold", action="store_true",
                    help="also run the workflow with warm_worker: false (each job its own process)")
    args = ap.parse_args()
    config = Path(args.config).resolve()
    cfg = yaml.safe_load(config.read_text())
    suite = cfg["suite"]
    with tempfile.TemporaryDirectory() as tmp:
        wf_dir, sp_dir, cold_dir = Path(tmp) / "workflow", Path(tmp) / "single", Path(tmp) / "cold"
        wf_dir.mkdir(), sp_dir.mkdir(), cold_dir.mkdir()
        t_workflow = run_workflow(config, wf_dir)
        t_single = run_single_process(cfg, sp_dir)
        os.chdir(ROOT)
        t_cold = run_workflow(config, cold_dir, warm=False) if args.cold else None
        scores = lambda d: (d / "results" / suite / "scores.csv").read_bytes()  # noqa: E731
        same = scores(wf_dir) == scores(sp_dir) and (t_cold is None or scores(cold_dir) == scores(sp_dir))
        rows = breakdown(wf_dir, suite)
        cold_rows = breakdown(cold_dir, suite) if args.cold else []
    n_jobs = sum(r[1] for r in rows)
    cold = ([f"| `snakemake --cores 2 --config warm_worker=False` (each job its own process) | "
             f"{t_cold:.1f} | {t_cold / t_single:.2f} |"] if args.cold else [])
    cold_startup = ([f"With `warm_worker: false` the same {sum(r[1] for r in cold_rows)} jobs spent "
                     f"{sum(r[2] for r in cold_rows):.1f} s in start-up and "
                     f"{sum(r[3] for r in cold_rows):.1f} s in work.", ""] if args.cold else [])
    lines = [
        "# Benchmark: the workflow vs its stage functions in one process",
        "",
        f"`{' '.join(['.venv/bin/python', 'bench/bench_pipeline.py', '--config', os.path.relpath(config, ROOT)])}`"
        f" on {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}; both runs in fresh working "
        "directories, one after the other (the venv already installed).",
        "",
        "| run | wall (s) | ratio |",
        "|---|--:|--:|",
        f"| `snakemake --cores 2` ({n_jobs} jobs) | {t_workflow:.1f} | {t_workflow / t_single:.2f} |",
        f"| the same stage functions, one process | {t_single:.1f} | 1.00 |",
        *cold,
        "",
        f"Same `scores.csv` byte for byte: {'yes' if same else 'NO'}.",
        "",
        "Per rule of the (warm) workflow run (sums over the rule's jobs; start-up = the job's "
        "process start to the stage call; work = the rest of the job's wall time):",
        "",
        "| rule | jobs | start-up (s) | work (s) |",
        "|---|--:|--:|--:|",
    ] + [f"| {r} | {n} | {s:.1f} | {w:.1f} |" for r, n, s, w in rows] + [
        f"| **all** | {n_jobs} | {sum(r[2] for r in rows):.1f} | {sum(r[3] for r in rows):.1f} |", "",
        *cold_startup]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
