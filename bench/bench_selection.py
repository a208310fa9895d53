"""Benchmark: the expert-selection experiment (paper Table 5 shape) on the digits suite for
several suite seeds (each seed builds its own base and experts), in one process, with the
default config's ``experiments.selection`` (pool, external tasks, draws, method and grid).

    PYTHONPATH=src .venv/bin/python bench/bench_selection.py --seeds 0,1 --out bench/selection.md

Per seed: the HO-GSVD choice against the random draws (mean ± 95% t-interval of the mean over
draws, :func:`submerge.report.tables.t_half_width`), and where the HO-GSVD choice ranks among
the draws; then the difference HO-GSVD − random mean averaged over seeds.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run_seed(cfg: dict, seed: int, workdir: Path) -> Path:
    """Build the selection universe of ``cfg`` with suite seed ``seed`` and run every
    selection run; returns the aggregated selection CSV."""
    import torch

    torch.set_num_threads(1)
    from submerge.recipe import parse_config
    from submerge.stages import checkpoints, evaluate, selection, spectra, taskvectors

    cfg = copy.deepcopy(cfg)
    cfg["suite"] = f"digits_seed{seed}"
    cfg["digits"] = {**(cfg.get("digits") or {}), "seed": seed}
    recipe = parse_config(cfg)
    sel = recipe.selection
    universe = recipe.members(sel.universe)
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    R = f"results/{recipe.suite.name}"
    view = lambda *e: type(recipe.suite).from_params(recipe.suite_view(e))  # noqa: E731
    base = f"{R}/models/base.safetensors"
    out = Path(f"{R}/selection/selection.csv")
    if out.exists():
        return workdir / out
    checkpoints.build_base(view(), base)
    for e in universe:
        model = f"{R}/models/experts/{e}.safetensors"
        checkpoints.build_expert(view(e), e, base, model, f"{R}/heads/{e}.safetensors")
        taskvectors.make_task_vector(view(e), e, base, model, f"{R}/taskvectors/{e}.h5")
        evaluate.run_reference(view(e), e, base, model, f"{R}/reference/{e}.json", recipe.eval)
    tvs = [f"{R}/taskvectors/{e}.h5" for e in universe]
    spectra.hogsvd_group(universe, tvs, f"{R}/hogsvd/{sel.universe}.h5", recipe.hogsvd)
    method = recipe.methods[sel.method]
    runs = [f"{R}/selection/runs/{run}.csv" for run in sel.runs()]
    for run, path in zip(sel.runs(), runs):
        selection.run_selection_draw(view(*universe), universe, sel, method, method.alphas,
                                     method.betas, run, f"{R}/hogsvd/{sel.universe}.h5", tvs,
                                     [f"{R}/reference/{e}.json" for e in universe], base, path,
                                     recipe.eval)
    selection.aggregate_selection(runs, out)
    return workdir / out


def summarise(path: Path) -> dict:
    import pandas as pd

    from submerge.report.tables import t_half_width

    df = pd.read_csv(path)
    df = df.loc[df["split"] == "test"]
    per = df.groupby(["setting", "draw", "task_set"])["accuracy"].mean().mul(100).reset_index()
    out = {}
    for task_set in ("pool", "ext", "all"):
        rand = per.loc[(per["setting"] == "random") & (per["task_set"] == task_set), "accuracy"]
        hog = float(per.loc[(per["setting"] == "hogsvd") & (per["task_set"] == task_set),
                            "accuracy"].iloc[0])
        out[task_set] = {"random": float(rand.mean()), "ci": t_half_width(rand.tolist()),
                         "hogsvd": hog, "beats": int((rand < hog).sum()), "draws": len(rand)}
    out["experts"] = df.loc[df["setting"] == "hogsvd", "experts"].iloc[0]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "config" / "config.yaml"))
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--workdir", default="/tmp/submerge_bench_selection")
    ap.add_argument("--out", default=str(ROOT / "bench" / "selection.md"))
    args = ap.parse_args()
    cfg = yaml.safe_load(Path(args.config).read_text())
    sel = cfg["experiments"]["selection"]
    lines = ["# Benchmark: expert selection (paper Table 5 shape) over suite seeds", "",
             f"Command: `PYTHONPATH=src .venv/bin/python bench/bench_selection.py --seeds "
             f"{args.seeds}`  ", f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (shared), "
             "1 torch thread  ", f"Selection: `{sel}`", "",
             "Test accuracy (%), mean over each task set's tasks; random: mean ± half-width of "
             "the 95% t-interval of the mean over draws; 'beats' = draws below the HO-GSVD "
             "choice.", "",
             "| seed | set | random mean ± 95% CI | HO-GSVD | HO-GSVD − random | beats | wall (s) |",
             "|---|---|--:|--:|--:|--:|--:|"]
    diffs: dict[str, list[float]] = {"pool": [], "ext": [], "all": []}
    chosen = []
    for seed in map(int, args.seeds.split(",")):
        start = time.perf_counter()
        path = run_seed(cfg, seed, Path(args.workdir) / f"seed{seed}")
        wall = time.perf_counter() - start
        s = summarise(path)
        chosen.append(f"seed {seed}: {s['experts']}")
        for task_set in ("pool", "ext", "all"):
            r = s[task_set]
            diffs[task_set].append(r["hogsvd"] - r["random"])
            lines.append(f"| {seed} | {task_set} | {r['random']:.1f} ± {r['ci']:.1f} | "
                         f"{r['hogsvd']:.1f} | {r['hogsvd'] - r['random']:+.1f} | "
                         f"{r['beats']}/{r['draws']} | {wall:.0f} |")
    lines += ["", "HO-GSVD − random mean, averaged over seeds: " + ", ".join(
        f"{k} {sum(v) / len(v):+.2f}" for k, v in diffs.items()), "", "HO-GSVD choices: "
        + "; ".join(chosen), ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
