"""`submerge merge` on a ViT-B/32-sized open_clip image tower (88 M parameters, random init)
with N perturbed copies as experts: wall time and peak RSS of the whole command (a subprocess,
VmHWM), against the size of one state dict. Writes the row to stdout (bench/cli_merge.md).

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/bench_cli_merge.py --experts 3 --work /tmp/cli_bench
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--work", type=Path, required=True)
    args = parser.parse_args()
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    tower = open_clip.create_model(args.model, pretrained=None).visual
    base = {k: v.detach().contiguous() for k, v in tower.state_dict().items()}
    del tower
    args.work.mkdir(parents=True, exist_ok=True)
    save_file(base, str(args.work / "base.safetensors"))
    experts = []
    gen = torch.Generator().manual_seed(1)
    for i in range(args.experts):
        sd = {k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        experts.append(args.work / f"e{i}.safetensors")
        save_file(sd, str(experts[-1]))
        del sd
    mb = sum(v.numel() * v.element_size() for v in base.values()) / 2**20
    n_params = sum(v.numel() for v in base.values())
    del base
    cmd = [sys.executable, "-m", "submerge.cli", "merge", "--base", str(args.work / "base.safetensors"),
           *sum((["--expert", str(e)] for e in experts), []), "--adapter", "open_clip_vit", "--arch",
           args.model, "--method", "task_arithmetic", "--beta", "0.01", "--alpha", "0.3",
           "--device", "cpu", "-o", str(args.work / "merged")]
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    peak = int(proc.stderr.strip().splitlines()[-1]) / 1024
    print(f"| {args.model} | {n_params / 1e6:.1f} M | {mb:.0f} | {args.experts} | {seconds:.0f} | "
          f"{peak:.0f} | {peak / mb:.1f} |")


if __name__ == "__main__":
    main()
