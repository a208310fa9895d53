"""Per-rule wall time and peak memory of a finished run, from Snakemake's benchmark files.

    .venv/bin/python bench/resources.py benchmarks/digits > bench/resources.md

The workflow profile (profiles/default/config.yaml) sizes the rules for ViT-L/14 x 20 experts
by scaling these numbers with the parameter count (see the notes it writes).

Memory needs a run with `--config warm_worker=False`: with the warm worker (local runs'
default, submerge.worker) a job computes in a fork of the worker, which Snakemake's benchmark
does not see, so its max_rss is only that of the job's waiting process (wall times stay right).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd


def main(root: str) -> None:
    rows = []
    for path in sorted(Path(root).rglob("*.tsv")):
        rule = path.relative_to(root).parts[0].removesuffix(".tsv")
        bench = pd.read_csv(path, sep="\t")
        rows.append({"rule": rule, "s": float(bench["s"].iloc[0]),
                     "max_rss_mb": float(pd.to_numeric(bench["max_rss"], errors="coerce").iloc[0])})
    frame = pd.DataFrame(rows)
    agg = frame.groupby("rule").agg(jobs=("s", "size"), mean_s=("s", "mean"), max_s=("s", "max"),
                                    total_s=("s", "sum"), max_rss_mb=("max_rss_mb", "max"))
    print(f"# Resources per rule ({root})\n")
    print(f"Command: `.venv/bin/python bench/resources.py {root} > bench/resources.md`  ")
    print("Machine: 2 CPU cores (shared), no GPU; a run of `make run` (`snakemake --cores all`).\n")
    print("| rule | jobs | mean s | max s | total s | max RSS MB |\n|---|--:|--:|--:|--:|--:|")
    for rule, r in agg.sort_values("total_s", ascending=False).iterrows():
        print(f"| {rule} | {int(r.jobs)} | {r.mean_s:.1f} | {r.max_s:.1f} | {r.total_s:.0f} | {r.max_rss_mb:.0f} |")
    print(f"\nSum of job times: {frame.s.sum():.0f} s over {len(frame)} jobs "
          f"(mean {frame.s.mean():.1f} s per job; most of a small job is starting Python and importing torch).")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/digits")
