"""Benchmark of submerge.hogsvd on one layer of N expert task vectors (CPU).

Inputs: N random low-rank-plus-noise float32 matrices (m x n, default 20 x 3072 x 768,
the shape of a ViT-B MLP ``c_fc`` weight), cast to float64 (HO-GSVD's default dtype).
Times, per layer:

* ``hogsvd``: the full decomposition (symmetric eigenproblem, linear in N);
* ``higher_order_boost(beta=None)``: HO-GSVD + Procrustes factors + reconstruction
  (the per-layer cost of the ``hogsvd`` merge rule);
* ``s_matrix``: S_pi formed explicitly, linear-in-N form vs the literal pairwise form of
  Eq. 31 (the pairwise form on ``--pairwise-experts`` experts, fewer if it is too slow).

Writes a markdown table (with the command that made it) to ``--out``.

    PYTHONPATH=src .venv/bin/python bench/bench_hogsvd.py
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from submerge.hogsvd import higher_order_boost, hogsvd, s_matrix
from submerge.io.atomic import write_text_atomic


def make_experts(n_experts: int, rows: int, cols: int, rank: int, noise: float, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_experts):
        low = torch.randn(rows, rank, generator=gen) @ torch.randn(rank, cols, generator=gen) / rank**0.5
        out.append((low + noise * torch.randn(rows, cols, generator=gen)).to(torch.float64))
    return out


def timed(fn, repeats: int):
    """Best (wall, process CPU) seconds over ``repeats`` calls, and the last result.
    CPU time is the steadier number on a shared machine."""
    best, result = (float("inf"), float("inf")), None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
    return best, result


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=20)
    ap.add_argument("--rows", type=int, default=3072)
    ap.add_argument("--cols", type=int, default=768)
    ap.add_argument("--rank", type=int, default=64, help="rank of the low-rank part of each expert")
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--pairwise-experts", type=int, default=20, help="N for the pairwise S_pi form")
    ap.add_argument("--pi", type=float, default=1e-2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared CPU)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("hogsvd.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    mats = make_experts(args.experts, args.rows, args.cols, args.rank, args.noise, args.seed)
    n_pair = min(args.pairwise_experts, args.experts)
    rows = []

    t, _ = timed(lambda: [a.T @ a for a in mats], args.repeats)
    rows.append(("Gram matrices A_i^T A_i only (part of every row below)", args.experts, t, ""))
    t, res = timed(lambda: hogsvd(mats, pi=args.pi), args.repeats)
    err = max(float((res.reconstruct(i) - a).norm() / a.norm()) for i, a in enumerate(mats))
    rows.append(("`hogsvd` (full decomposition)", args.experts, t, f"max rel. reconstruction error {err:.1e}"))
    t, _ = timed(lambda: higher_order_boost(mats, beta=None, pi=args.pi), args.repeats)
    rows.append(("`higher_order_boost(beta=None)` (merge rule, one layer)", args.experts, t, ""))
    t, s_full = timed(lambda: s_matrix(mats, pi=args.pi), args.repeats)
    rows.append(("`s_matrix` linear-in-N form", args.experts, t, ""))
    sub = mats[:n_pair]
    t_lin, s_lin = timed(lambda: s_matrix(sub, pi=args.pi), args.repeats)
    if n_pair != args.experts:
        rows.append(("`s_matrix` linear-in-N form", n_pair, t_lin, ""))
    t_pair, s_pair = timed(lambda: s_matrix(sub, pi=args.pi, pairwise=True), args.repeats)
    diff = float((s_lin - s_pair).norm() / s_pair.norm())
    rows.append(
        ("`s_matrix` pairwise form (Eq. 31 literally)", n_pair, t_pair, f"rel. difference to linear form {diff:.1e}")
    )

    command = "PYTHONPATH=src .venv/bin/python bench/" + " ".join(
        [Path(sys.argv[0]).name] + [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)]
    )
    lines = [
        "# HO-GSVD benchmark (one layer, CPU)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s) "
        "(CPU shared with other jobs: timings are indicative).",
        f"Input: {args.experts} experts, each {args.rows}x{args.cols}, rank-{args.rank} + noise {args.noise} "
        f"(float32, cast to float64), pi = {args.pi}; best of {args.repeats} run(s).",
        "",
        "| what | experts N | wall s | CPU s | note |",
        "|---|---:|---:|---:|---|",
    ]
    lines += [f"| {what} | {n} | {sec[0]:.2f} | {sec[1]:.2f} | {note} |" for what, n, sec, note in rows]
    lines += [
        "",
        f"S_pi pairwise / linear-in-N form on the same N = {n_pair}: {t_pair[0] / t_lin[0]:.1f}x wall, "
        f"{t_pair[1] / t_lin[1]:.1f}x CPU time (both include the N Gram matrices; the pairwise form does "
        "N(N-1) Cholesky solves, the linear form N). `hogsvd` never forms S_pi: it solves the symmetric "
        "eigenproblem similar to it (see the docstring of `submerge.hogsvd`).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    write_text_atomic(args.out, text)


if __name__ == "__main__":
    main()
