"""Benchmark of the embedded ``digits`` suite: build it, merge it with TA and TA + Subspace Boosting.

Builds the base and all 20 experts (``submerge.suites.digits``), then for each default
group (n4, n8, n14, n20) merges the group's task vectors with Task Arithmetic, with and
without Subspace Boosting (``submerge.boosting``, per-QKV, attention + MLP), picks α (and β)
on validation by the average normalised accuracy (accuracy / the expert's own accuracy,
as tall_masks does), and reports test accuracies, the stable rank of the summed task
vector, the mean pairwise cosine of the task vectors, and timings.

Speed: one SVD per target matrix per group (``svd_factors``); a β whose cutoffs equal
those of a smaller β on every matrix is skipped (same boosted model); validation uses
``--max-val`` images per task.

    PYTHONPATH=src .venv/bin/python bench/bench_digits.py --seeds 0,1 --out bench/digits.md
    PYTHONPATH=src .venv/bin/python bench/bench_digits.py --groups n4,n8 --set expert_epochs=8
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from submerge.boosting import boost_cutoff, boost_from_factors, boost_singular_values, svd_factors
from submerge.data.heads import save_head
from submerge.evaluate import evaluate
from submerge.merging import apply_task_vector, merge, task_vectors
from submerge.models import get_adapter
from submerge.spectral import stable_rank
from submerge.suites import digits


def build(cfg: dict, root: Path, names: list[str]) -> tuple[dict, dict, dict, dict]:
    """Base, heads (saved under root/heads), experts of ``names`` and build timings."""
    times = {}
    t0 = time.perf_counter()
    base = digits.pretrain_base(cfg)
    times["base"] = time.perf_counter() - t0
    experts, metrics = {}, {}
    t_head = t_expert = 0.0
    for task in names:
        t = time.perf_counter()
        head = digits.train_head(base, task, cfg)
        save_head(root / "heads" / f"{task}.safetensors", head["weight"], head["bias"],
                  digits.TASKS[task].head_meta)
        t_head += time.perf_counter() - t
        t = time.perf_counter()
        experts[task], metrics[task] = digits.finetune_expert(base, head, task, cfg)
        t_expert += time.perf_counter() - t
    times.update(heads=t_head, experts=t_expert, build=time.perf_counter() - t0)
    return base, experts, metrics, times


def pairwise_cosine(tvs: list[dict]) -> float:
    flat = [torch.cat([v.flatten() for _, v in sorted(tv.items())]) for tv in tvs]
    cos = [float(torch.nn.functional.cosine_similarity(a, b, dim=0))
           for a, b in itertools.combinations(flat, 2)]
    return sum(cos) / len(cos)


def mean_stable_rank(factors: dict, beta: float | None = None) -> float:
    ranks = []
    for blocks in factors.values():
        for _, s, _ in blocks:
            ranks.append(stable_rank(s if beta is None else boost_singular_values(s, beta)))
    return sum(ranks) / len(ranks)


def run_group(name, members, base, experts, expert_val, tasks, module, adapter, layer_info, args):
    """TA and TA+SB for one group: chosen (α, β), val/test accuracies, ranks, timings."""
    t0 = time.perf_counter()
    tvs = task_vectors(base, {m: experts[m] for m in members})
    delta = merge("task_arithmetic", [tvs[m] for m in members], layer_info)
    factors = svd_factors(delta, layer_info, layers="both", attn_mode="per_qkv")
    t_merge = time.perf_counter() - t0
    group_tasks = [tasks[m] for m in members]
    n_points = 0

    def score(d: dict, alpha: float) -> float:
        """Mean normalised validation accuracy of θ_base + α·d."""
        nonlocal n_points
        n_points += 1
        module.load_state_dict(apply_task_vector(base, d, alpha))
        acc = evaluate(adapter, module, group_tasks, "val", max_examples=args.max_val)
        return sum(acc[m] / expert_val[m] for m in members) / len(members)

    def best_alpha(d: dict) -> tuple[float, float]:
        scores = [(score(d, a), a) for a in args.alpha]
        top = max(s for s, _ in scores)
        return top, next(a for s, a in scores if s == top)   # ties: the smallest α

    t1 = time.perf_counter()
    ta_score, ta_alpha = best_alpha(delta)
    sb_best, seen, skipped = None, {}, 0
    for beta in args.beta:
        cut = tuple(boost_cutoff(s, beta) for key in sorted(factors) for _, s, _ in factors[key])
        if cut in seen:          # same cutoffs on every matrix as a smaller β: same model
            skipped += 1
            continue
        boosted = dict(delta)
        for key, f in factors.items():
            boosted[key] = boost_from_factors(f, beta=beta, dtype=delta[key].dtype)
        s, a = best_alpha(boosted)
        seen[cut] = beta
        if sb_best is None or s > sb_best[0]:
            sb_best = (s, a, beta, boosted)
    t_grid = time.perf_counter() - t1

    out = {"group": name, "n": len(members), "cosine": pairwise_cosine([tvs[m] for m in members]),
           "stable_rank": mean_stable_rank(factors), "ta_alpha": ta_alpha,
           "sb_alpha": sb_best[1], "sb_beta": sb_best[2],
           "sb_stable_rank": mean_stable_rank(factors, sb_best[2]),
           "ta_val": ta_score, "sb_val": sb_best[0], "points": n_points, "skipped_betas": skipped,
           "t_merge": t_merge, "t_grid": t_grid}
    for label, d, alpha in (("ta", delta, ta_alpha), ("sb", sb_best[3], sb_best[1])):
        module.load_state_dict(apply_task_vector(base, d, alpha))
        acc = evaluate(adapter, module, group_tasks, "test")
        out[f"{label}_test"] = sum(acc.values()) / len(acc)
    out["t_total"] = time.perf_counter() - t0
    return out


def run_seed(seed: int, args) -> str:
    """Build the suite with ``seed``, merge every group; the markdown section of this seed."""
    overrides = {"seed": seed}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    cfg = digits.resolve_config(overrides)
    adapter = get_adapter("open_clip_vit")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        groups = args.groups.split(",")
        names = [t for t in digits.TASKS if any(t in digits.GROUPS[g] for g in groups)]
        base, experts, metrics, times = build(cfg, root, names)
        print(f"seed {seed}: built base + {len(names)} experts in {times['build']:.1f} s "
              f"(base {times['base']:.1f}, heads {times['heads']:.1f}, experts {times['experts']:.1f})",
              flush=True)
        tasks = {t: digits.TASKS[t].bind(cfg, root) for t in names}
        module = adapter.build(cfg["arch"])
        layer_info = adapter.layer_infos(base)

        module.load_state_dict(base)
        base_test = evaluate(adapter, module, list(tasks.values()), "test")
        expert_val, expert_test = {}, {}
        for t in tasks:
            module.load_state_dict(experts[t])
            expert_val[t] = evaluate(adapter, module, [tasks[t]], "val", max_examples=args.max_val)[t]
            expert_test[t] = evaluate(adapter, module, [tasks[t]], "test")[t]
        rows = []
        for g in groups:
            members = digits.GROUPS[g]
            r = run_group(g, members, base, experts, expert_val, tasks, module, adapter, layer_info, args)
            r["base_test"] = sum(base_test[m] for m in members) / len(members)
            r["expert_test"] = sum(expert_test[m] for m in members) / len(members)
            rows.append(r)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}),
                  flush=True)
    total = time.perf_counter() - t_start
    return report(cfg, args, names, metrics, base_test, expert_test, rows, times, total)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0])
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="override a digits config key, e.g. expert_epochs=4 or arch='{\"width\":128}'")
    p.add_argument("--groups", default="n4,n8,n14,n20")
    p.add_argument("--alpha", type=lambda s: [float(x) for x in s.split(",")], default=digits.GRID["alpha"])
    p.add_argument("--beta", type=lambda s: [float(x) for x in s.split(",")], default=digits.GRID["beta"])
    p.add_argument("--max-val", type=int, default=100, help="validation images per task for the grid")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared CPU)")
    p.add_argument("--out", type=Path, help="write the markdown tables here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(args.threads)
    cmd = "PYTHONPATH=src .venv/bin/python bench/bench_digits.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    sections = [f"Command: `{cmd}`  ",
                f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (shared), {args.threads} torch "
                f"thread(s), torch {torch.__version__}", ""]
    sections += [run_seed(seed, args) for seed in args.seeds]
    text = "\n".join(sections)
    print(text)
    if args.out:
        write_keeping_notes(args.out, text)
    return 0


def write_keeping_notes(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, keeping the hand-written intro (before "Command:") and
    "## Notes" section of an existing file."""
    head, notes = "", ""
    if path.exists():
        old = path.read_text(encoding="utf-8")
        head = old[: old.find("Command: `")] if "Command: `" in old else ""
        notes = old[old.find("\n## Notes"):] if "\n## Notes" in old else ""
    path.write_text(head + text + notes, encoding="utf-8")


def report(cfg, args, names, metrics, base_test, expert_test, rows, times, total) -> str:
    lines = [
        f"### seed {cfg['seed']}",
        "",
        f"Config: `{json.dumps({k: v for k, v in cfg.items()})}`  ",
        f"Grid: α ∈ {args.alpha}, β ∈ {args.beta}; selection on {args.max_val} val images per task "
        f"(mean normalised accuracy), test on all {cfg['n_test']} test images.",
        "",
        f"Build: {times['build']:.1f} s (base {times['base']:.1f} s, {len(names)} heads "
        f"{times['heads']:.1f} s, {len(names)} experts {times['experts']:.1f} s); "
        f"whole benchmark {total:.1f} s.",
        "",
        "| group | N | expert | base+head | TA | TA+SB | α TA | α, β SB | stable rank ΣΔ | "
        "after SB | cos(τᵢ,τⱼ) | grid points | β skipped | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['group']} | {r['n']} | {r['expert_test']:.3f} | {r['base_test']:.3f} | {r['ta_test']:.3f} "
            f"| {r['sb_test']:.3f} | {r['ta_alpha']} | {r['sb_alpha']}, {r['sb_beta']} "
            f"| {r['stable_rank']:.2f} | {r['sb_stable_rank']:.2f} | {r['cosine']:.3f} "
            f"| {r['points']} | {r['skipped_betas']} | {r['t_total']:.1f} |")
    lines += ["", "Per task (test accuracy): expert / base+head", "",
              "| task | " + " | ".join(names) + " |",
              "|---|" + "---|" * len(names),
              "| expert | " + " | ".join(f"{expert_test[t]:.2f}" for t in names) + " |",
              "| base+head | " + " | ".join(f"{base_test[t]:.2f}" for t in names) + " |",
              "| finetune s | " + " | ".join(f"{metrics[t]['seconds']:.1f}" for t in names) + " |",
              ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
