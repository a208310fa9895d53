"""Peak memory of the merge stage (``submerge.stages.merge.merge_group``) against the number of
experts N, on a ViT-shaped synthetic model (CPU, one torch thread).

The model: ``--blocks`` transformer blocks of width ``--width`` with open_clip's parameter
names and shapes (fused ``in_proj_weight`` [3w x w], ``out_proj`` [w x w], ``c_fc`` [4w x w],
``c_proj`` [w x 4w], biases, layer norms) plus a patch embedding and ``proj``; default w = 384,
12 blocks: 21.4 M parameters, 85 MiB in float32. Task vectors: a shared and a task-specific
low-rank part plus noise, written as the pipeline's task-vector HDF5 stores (with the TIES
thresholds where the code records them).

Each (method, N) runs ``merge_group`` in a fresh subprocess and reports its peak RSS
(``VmHWM``), the RSS after the imports, and the growth between them in units of one model.
Run it once per code version to compare (``--label``); it appends rows to ``--out``'s table::

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/bench_stream.py --label after
    OMP_NUM_THREADS=1 PYTHONPATH=<old checkout>/src python bench/bench_stream.py --label before
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = {
    "TA": {"merge": "task_arithmetic"},
    "TA+SB": {"merge": "task_arithmetic", "boost": {}},
    "TIES": {"merge": "ties", "hyper": {"top_k_percent": 20, "aggregate": "dis-mean"}},
    "TIES+LiNeS": {"merge": "ties", "hyper": {"top_k_percent": 20, "aggregate": "dis-mean"}, "lines": {}},
    "Consensus": {"merge": "consensus", "hyper": {"min_votes": 2, "combine": "ta"}},
    "TSV-M": {"merge": "tsv_m"},
    "Iso-C": {"merge": "iso_c"},
}


def shapes(width: int, blocks: int) -> dict[str, tuple[int, ...]]:
    out = {"conv1.weight": (width, 3, 32, 32), "positional_embedding": (50, width),
           "class_embedding": (width,), "ln_pre.weight": (width,), "ln_pre.bias": (width,),
           "ln_post.weight": (width,), "ln_post.bias": (width,), "proj": (width, 512)}
    for b in range(blocks):
        p = f"transformer.resblocks.{b}."
        out.update({p + "ln_1.weight": (width,), p + "ln_1.bias": (width,),
                    p + "attn.in_proj_weight": (3 * width, width), p + "attn.in_proj_bias": (3 * width,),
                    p + "attn.out_proj.weight": (width, width), p + "attn.out_proj.bias": (width,),
                    p + "ln_2.weight": (width,), p + "ln_2.bias": (width,),
                    p + "mlp.c_fc.weight": (4 * width, width), p + "mlp.c_fc.bias": (4 * width,),
                    p + "mlp.c_proj.weight": (width, 4 * width), p + "mlp.c_proj.bias": (width,)})
    return out


def layer_info(names):
    from submerge.layers import LayerInfo

    info = {}
    for key in names:
        parts = key.split(".")
        block = int(parts[2]) if key.startswith("transformer.resblocks.") else None
        if key.endswith("in_proj_weight"):
            info[key] = LayerInfo(block, "attn", 3)
        elif key.endswith("out_proj.weight"):
            info[key] = LayerInfo(block, "attn")
        elif key.endswith(("c_fc.weight", "c_proj.weight")):
            info[key] = LayerInfo(block, "mlp")
        elif "ln" in key:
            info[key] = LayerInfo(block, "norm")
        elif block is None:
            info[key] = LayerInfo(None, "embed")
        else:
            info[key] = LayerInfo(block, "other")
    return info


def make_task_vectors(root: Path, n: int, width: int, blocks: int, rank: int = 16) -> list[str]:
    """N task-vector stores under ``root`` (made once, reused for every method and N)."""
    import torch

    from submerge.io import hdf5

    sh = shapes(width, blocks)
    info = layer_info(sh)
    gen = torch.Generator().manual_seed(0)
    shared = {k: (torch.randn(s[0], rank, generator=gen), torch.randn(rank, s[1], generator=gen))
              for k, s in sh.items() if len(s) == 2}
    stats_ok = "stats" in inspect.signature(hdf5.write_state_dict).parameters
    paths = []
    for t in range(n):
        path = root / f"tv{t}.h5"
        paths.append(str(path))
        if path.exists():
            continue
        tv = {}
        for k, s in sh.items():
            x = 1e-3 * torch.randn(*s, generator=gen)
            if len(s) == 2:
                a, b = shared[k]
                x += 1e-3 * (a @ b + torch.randn(s[0], rank, generator=gen) @ torch.randn(rank, s[1], generator=gen)) / rank
            tv[k] = x
        kwargs = {}
        if stats_ok:
            from submerge.merging.ties import threshold_table

            kwargs["stats"] = {hdf5.TIES_THRESHOLDS: threshold_table(tv)}
        hdf5.write_state_dict(path, tv, info, {"expert": f"e{t}"}, **kwargs)
    return paths


def vm_hwm_mib() -> float:
    """Peak resident set of this process image (VmHWM; unlike ru_maxrss it starts afresh at
    exec, so the parent's memory does not count)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> None:
    import torch

    torch.set_num_threads(1)
    from submerge.recipe import Boost, Lines, Method
    from submerge.stages.merge import merge_group

    base_rss = vm_hwm_mib()
    spec = METHODS[args.method]
    method = Method(name="m", merge=spec["merge"], hyper=spec.get("hyper", {}),
                    lines=Lines() if "lines" in spec else None,
                    boost=Boost() if "boost" in spec else None)
    paths = json.loads(args.paths)
    extra = {}
    if spec["merge"] == "consensus":
        lam = Path(args.tmp) / "lambdas.json"
        lam.write_text(json.dumps({"lambdas": {f"e{i}": 0.4 for i in range(len(paths))}}))
        extra["tall_lambdas"] = str(lam)
    start = time.perf_counter()
    merge_group([f"e{i}" for i in range(len(paths))], paths, method, Path(args.tmp) / "merged.h5",
                extra_paths=extra, device="cpu")
    seconds = time.perf_counter() - start
    peak = vm_hwm_mib()
    print(json.dumps({"base_mib": base_rss, "peak_mib": peak, "seconds": seconds}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", default="4,8,20")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "submerge-bench-stream"))
    ap.add_argument("--label", default="")
    ap.add_argument("--out", default=str(Path(__file__).with_name("stream.md")))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--paths", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    import torch

    ns = [int(n) for n in args.experts.split(",")]
    data = Path(args.data) / f"w{args.width}b{args.blocks}"
    data.mkdir(parents=True, exist_ok=True)
    paths = make_task_vectors(data, max(ns), args.width, args.blocks)
    n_params = sum(int(torch.Size(s).numel()) for s in shapes(args.width, args.blocks).values())
    model_mib = n_params * 4 / 2**20
    rows = []
    for name in args.methods.split(","):
        for n in ns:
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [sys.executable, __file__, "--child", "--method", name, "--paths",
                       json.dumps(paths[:n]), "--tmp", tmp]
                res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if res.returncode:
                sys.exit(f"{name} N={n} failed:\n{res.stderr[-3000:]}")
            r = json.loads(res.stdout.strip().splitlines()[-1])
            grow = (r["peak_mib"] - r["base_mib"]) / model_mib
            rows.append(f"| {args.label} | {name} | {n} | {r['peak_mib']:.0f} | {r['base_mib']:.0f} | "
                        f"{grow:.2f} | {r['seconds']:.1f} |")
            print(rows[-1], flush=True)
    out = Path(args.out)
    text = out.read_text() if out.exists() else ""
    if "| code | method |" not in text:
        text += ("\n| code | method | N | peak RSS MiB | RSS after imports MiB | growth / model | "
                 "seconds |\n|---|---|--:|--:|--:|--:|--:|\n")
    text += "\n".join(rows) + "\n"
    out.write_text(text)
    print(f"model: {n_params / 1e6:.1f} M parameters, {model_mib:.0f} MiB float32; command: "
          f"{shlex.join(sys.argv)}")


if __name__ == "__main__":
    main()
