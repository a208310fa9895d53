"""Real-shape benchmark of the merge methods, side by side with FusionBench 0.2.33.

Models: open_clip vision towers (ViT-B-32, ViT-B-16, ViT-L-14) built locally with random weights
(``open_clip.create_model(arch, pretrained=None)``, no network). Task vectors: structured
synthetic experts, per 2-D weight ``τ_t = s·(A_s B_s + A_t B_t)/√r + s·σ·noise`` (a low-rank part
shared by all tasks, a task-specific low-rank part, dense noise), 1-D parameters a shared plus a
task-specific Gaussian; float32, generated on the benchmark's device from fixed seeds.

Every measurement runs in a fresh subprocess (peak RSS = that process's ``ru_maxrss``; one
torch thread), ours and the peer's interleaved, the median over ``--repeats``. A process that
passes ``--mem-cap-gib`` is killed; a run whose need, estimated from the measured per-model size,
is above the cap is skipped and the estimate reported.

Measurements:

* ``methods``: each merge method on in-memory task vectors (the inputs are built in the worker;
  "RSS over inputs" = peak RSS minus the RSS once the inputs exist), ours vs FusionBench's where
  it has one, with the relative Frobenius difference of the outputs ``‖ours − peer‖ / ‖peer‖``.
* ``grid``: the α×β grid of Subspace Boosting as the pipeline computes it (SVD factors once,
  one reconstruction per β, θ_0 + αΔ per point: 6 α × 5 β = 30 points) vs one literal
  Algorithm-1 point (``subspace_boost`` + θ_0 + αΔ), both on the TA merge.
* ``stage``: the pipeline's merge stage, :func:`submerge.stages.merge.merge_group`, reading
  per-expert task-vector HDF5 files written with :mod:`submerge.io.hdf5` (``--stage-distinct``
  distinct files cycled to N, so that N = 50 fits on disk); its peak RSS ÷ one model's size.

    PYTHONPATH=src .venv/bin/python bench/bench_real_shape.py --arch ViT-B-32 --n 8,20 --out bench/real_shape.md

``--quick``: the first 2 transformer blocks of the tower (real matrix shapes), N = 4, for
exercising the script (``bench/gpu.sh --device cpu --quick``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GIB = 1024**3

OURS = ("ta", "ties", "consensus", "tsv_m", "iso_c", "iso_cts", "ta_sb", "hogsvd", "ta_lines")
LABELS = {"ta": "TA", "ties": "TIES k=20", "consensus": "Consensus/TALL k=2, λ=0.4", "tsv_m": "TSV-M",
          "iso_c": "Iso-C", "iso_cts": "Iso-CTS", "ta_sb": "TA + SB (β=0.02)",
          "hogsvd": "HO-GSVD / Higher-Order SB", "ta_lines": "TA + LiNeS (norm α, slope 0.5)",
          "grid": "α×β grid, 30 points", "alg1": "one literal Algorithm-1 point"}
STAGE_METHODS = ("ta", "ties", "consensus", "ta_sb")
SB_BETA = 0.02
GRID_ALPHAS = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
GRID_BETAS = (0.0, 0.01, 0.02, 0.1, 0.2)

# Rough peak memory of each implementation, in models, beyond the N input task vectors: the
# decision to skip before a run (the cap kills a run that goes past it anyway). The peer's
# TIES/Consensus flatten and stack all task vectors, then copy, take magnitudes, mask the stack
# (measured: about 7.7 and 6.5 models per expert).
EXTRA_MODELS = {("peer", "ties"): lambda n: 8 * n + 2, ("peer", "consensus"): lambda n: 7 * n + 2}
PROBES = (1, 2)  # expert counts at which a run skipped for memory is measured, to extrapolate


# ----------------------------------------------------------------------------- worker side


def _threads() -> None:
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)


def rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build_base(arch: str, quick: bool, path: str) -> dict:
    """The tower's random-init state dict (seeded; ``quick``: 2 blocks), saved as safetensors
    so that the measured workers do not pay for building the whole CLIP model."""
    import logging

    import open_clip
    import torch
    from safetensors.torch import save_file

    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that no weights were loaded
    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None)
    sd = {k: v.detach().clone().contiguous() for k, v in model.visual.state_dict().items()}
    del model
    if quick:
        sd = {k: v for k, v in sd.items()
              if not k.startswith("transformer.resblocks.") or int(k.split(".")[2]) < 2}
    save_file(sd, path + ".tmp")
    os.replace(path + ".tmp", path)
    return {"model_bytes": model_bytes(sd), "params": sum(v.numel() for v in sd.values())}


def base_state(spec: dict):
    """The base state dict written by :func:`build_base` and its layer info."""
    from safetensors.torch import load_file

    from submerge.models import get_adapter

    sd = load_file(spec["base"])
    return sd, get_adapter("open_clip_vit").layer_infos(sd)


def _gen(device, seed: int):
    import torch

    return torch.Generator(device=device).manual_seed(seed)


def task_vector(base, t: int, device, *, shared_rank=16, task_rank=8, noise=0.1, scale=1e-3):
    """Expert ``t``'s synthetic task vector (same shared part for every t)."""
    import torch

    out = {}
    for i, (key, ref) in enumerate(sorted(base.items())):
        gs, gt = _gen(device, 1_000_003 * i + 17), _gen(device, 1_000_003 * i + 7919 * (t + 1))
        if ref.ndim == 2:
            m, n = ref.shape
            r = shared_rank + task_rank
            x = torch.randn(m, n, generator=gt, device=device).mul_(noise)
            x.addmm_(torch.randn(m, shared_rank, generator=gs, device=device),
                     torch.randn(shared_rank, n, generator=gs, device=device), alpha=1 / math.sqrt(r))
            x.addmm_(torch.randn(m, task_rank, generator=gt, device=device),
                     torch.randn(task_rank, n, generator=gt, device=device), alpha=1 / math.sqrt(r))
        else:
            x = torch.randn(ref.shape, generator=gs, device=device)
            x.add_(torch.randn(ref.shape, generator=gt, device=device))
        out[key] = x.mul_(scale)
    return out


def model_bytes(sd) -> int:
    return sum(v.numel() * v.element_size() for v in sd.values())


def _sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def run_ours(method: str, tvs, base, layer_info):
    from submerge.boosting import subspace_boost
    from submerge.hogsvd import hogsvd_merge
    from submerge.merging import consensus, iso_c, iso_cts, task_arithmetic, ties, tsv_m
    from submerge.merging.lines import lines_alpha, lines_scale

    if method == "ta":
        return task_arithmetic(tvs, layer_info)
    if method == "ties":
        return ties(tvs, layer_info, k=20, merge="dis-mean")
    if method == "consensus":
        return consensus(tvs, layer_info, lambdas=0.4, k=2, base="ta")
    if method == "tsv_m":
        return tsv_m(tvs, layer_info)
    if method == "iso_c":
        return iso_c(tvs, layer_info)
    if method == "iso_cts":
        return iso_cts(tvs, layer_info, common_space_fraction=0.8)
    if method == "ta_sb":
        return subspace_boost(task_arithmetic(tvs, layer_info), layer_info, beta=SB_BETA)
    if method == "hogsvd":
        return hogsvd_merge(tvs, layer_info)
    if method == "ta_lines":
        delta = task_arithmetic(tvs, layer_info)
        return lines_scale(delta, layer_info, alpha=lines_alpha(tvs, delta), beta=0.5)
    raise ValueError(f"unknown method {method!r}; known: {OURS}")


GRID_PHASES: dict = {}  # CPU seconds of run_grid's phases, reported by the worker


def run_grid(which: str, delta, base, layer_info):
    """``grid``: SVD factors once, one reconstruction per β, θ_0 + αΔ per point (what the
    pipeline's merge and grid stages compute); ``alg1``: one literal Algorithm-1 point.
    Uses only what every version of ``submerge.boosting`` has (``--grid-before`` runs it
    on another source tree); the CPU seconds of each phase go to :data:`GRID_PHASES`."""
    from submerge.boosting import boost_from_factors, subspace_boost, svd_factors
    from submerge.merging.task_vectors import apply_task_vector

    clock = time.process_time
    t0 = clock()
    if which == "alg1":
        boosted = subspace_boost(delta, layer_info, beta=SB_BETA)
        t1 = clock()
        theta = apply_task_vector(base, boosted, GRID_ALPHAS[0])
        GRID_PHASES.update(boost=t1 - t0, apply=clock() - t1)
        return theta
    factors = svd_factors(delta, layer_info)
    GRID_PHASES.update(svd=clock() - t0, rebuild=0.0, apply=0.0)
    theta = None
    for beta in GRID_BETAS:
        t1 = clock()
        boosted = dict(delta)
        for key, fs in factors.items():
            boosted[key] = boost_from_factors(fs, beta=beta, alpha=1.0, dtype=delta[key].dtype)
        t2 = clock()
        for alpha in GRID_ALPHAS:
            theta = apply_task_vector(base, boosted, alpha)
        GRID_PHASES["rebuild"] += t2 - t1
        GRID_PHASES["apply"] += clock() - t2
    return theta


def _warmup(device) -> None:
    """CUDA initialises its libraries on first use: do that before the clock starts."""
    import torch

    if device.type != "cuda":
        return
    x = torch.randn(64, 32, device=device)
    torch.linalg.svd(x, full_matrices=False)
    torch.linalg.eigh(x.T.double() @ x.double())
    torch.linalg.cholesky(x.T.double() @ x.double() + torch.eye(32, device=device, dtype=torch.float64))
    torch.linalg.solve_triangular(torch.eye(32, device=device), x.T, upper=False)
    x.abs().flatten().kthvalue(5)
    torch.cuda.synchronize()


def worker_methods(spec: dict) -> dict:
    import torch

    device = torch.device(spec["device"])
    _warmup(device)
    base, layer_info = base_state(spec)
    base = {k: v.to(device) for k, v in base.items()}
    tvs = [task_vector(base, t, device) for t in range(spec["n"])]
    if spec["impl"] == "grid":
        from submerge.merging import task_arithmetic

        tvs = [task_arithmetic(tvs, layer_info)]  # the grid starts from the merged Δ
    _sync(device)
    rss_inputs = rss_now()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        gpu_inputs = torch.cuda.memory_allocated(device)
    t0, c0 = time.perf_counter(), time.process_time()
    if spec["impl"] == "ours":
        out = run_ours(spec["method"], tvs, base, layer_info)
    elif spec["impl"] == "grid":
        out = run_grid(spec["method"], tvs[0], base, layer_info)
    else:
        sys.path.insert(0, str(HERE))
        from fusionbench_peer import Peer

        out = Peer(spec["peer_dir"]).run(spec["method"], tvs, base, device)
    _sync(device)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    res = {"seconds": seconds, "cpu_s": cpu, "peak_rss": peak_rss(), "rss_inputs": rss_inputs,
           "model_bytes": model_bytes(base)}
    if spec["impl"] == "grid":
        res["phases"] = dict(GRID_PHASES)
    if device.type == "cuda":
        res["gpu_peak_over_inputs"] = torch.cuda.max_memory_allocated(device) - gpu_inputs
    if spec.get("save"):
        tmp = spec["save"] + ".tmp"
        torch.save({k: v.detach().cpu() for k, v in out.items()}, tmp)
        os.replace(tmp, spec["save"])
    return res


def worker_diff(spec: dict) -> dict:
    """``‖a − b‖_F / ‖b‖_F`` over all keys, and the largest per-key relative difference."""
    import torch

    a = torch.load(spec["a"], weights_only=True)
    b = torch.load(spec["b"], weights_only=True)
    if set(a) != set(b):
        return {"rel": float("nan"), "max_key_rel": float("nan"), "error": "different keys"}
    num = den = 0.0
    worst = 0.0
    for k in a:
        d = float((a[k].double() - b[k].double()).norm() ** 2)
        n = float(b[k].double().norm() ** 2)
        num, den = num + d, den + n
        if n > 0:
            worst = max(worst, math.sqrt(d / n))
    return {"rel": math.sqrt(num / den) if den else float("nan"), "max_key_rel": worst}


def write_stage_inputs(spec: dict) -> dict:
    """``spec["distinct"]`` task-vector HDF5 files, as the pipeline's task-vector stage writes them."""
    import torch

    from submerge.io import hdf5
    from submerge.merging.ties import threshold_table

    base, layer_info = base_state(spec)
    paths = []
    for t in range(spec["distinct"]):
        path = Path(spec["dir"]) / f"tv{t}.h5"
        if not path.exists():
            tv = task_vector(base, t, torch.device("cpu"))
            hdf5.write_state_dict(path, tv, layer_info, {"suite": "bench", "expert": f"e{t}",
                                                         "adapter": "open_clip_vit"},
                                  stats={hdf5.TIES_THRESHOLDS: threshold_table(tv)})
        paths.append(str(path))
    return {"paths": paths, "model_bytes": model_bytes(base)}


def stage_method(name: str):
    from submerge.recipe import Method

    params = {"ta": {"merge": "task_arithmetic"}, "ties": {"merge": "ties"},
              "consensus": {"merge": "consensus"},
              "ta_sb": {"merge": "task_arithmetic", "boost": {}},
              "ta_lines": {"merge": "task_arithmetic", "lines": {"scale": "norm", "slope": 0.5, "protocol": "fixed_slope"}},
              "ties_lines": {"merge": "ties", "lines": {"scale": "norm", "slope": 0.5, "protocol": "fixed_slope"}},
              "hosb": {"merge": "hogsvd", "boost": {}},
              "tsv_m": {"merge": "tsv_m"}, "iso_c": {"merge": "iso_c"}, "iso_cts": {"merge": "iso_cts"}}
    if name not in params:
        raise ValueError(f"merge stage: method {name!r} not measured; known: {sorted(params)}")
    return Method.from_params({"name": name, "hyper": {}, **params[name]})


def worker_stage(spec: dict) -> dict:
    from submerge.io.jsonio import write_json
    from submerge.stages.merge import merge_group

    n, paths = spec["n"], spec["paths"]
    experts = [f"e{i}" for i in range(n)]
    tv_paths = [paths[i % len(paths)] for i in range(n)]
    method = stage_method(spec["method"])
    extra = {}
    with tempfile.TemporaryDirectory(dir=spec["dir"]) as tmp:
        if "tall_lambdas" in method.needs:
            extra["tall_lambdas"] = Path(tmp) / "lambdas.json"
            write_json(extra["tall_lambdas"], {"lambdas": {e: 0.4 for e in experts}})
        if "hogsvd" in method.needs:  # written by its own worker (rule hogsvd), not measured here
            extra["hogsvd"] = spec["hogsvd_cache"]
        out = Path(tmp) / "merged.h5"
        rss0 = rss_now()
        t0, c0 = time.perf_counter(), time.process_time()
        merge_group(experts, tv_paths, method, out, extra_paths=extra, device=spec["device"])
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "cpu_s": cpu, "peak_rss": peak_rss(), "rss_start": rss0}


def worker_hogsvd_cache(spec: dict) -> dict:
    """The group's HO-GSVD cache for the Higher-Order SB merge stage (as rule hogsvd writes it)."""
    from submerge.recipe import HOGSVDSettings
    from submerge.stages.spectra import hogsvd_group

    n, paths = spec["n"], spec["paths"]
    out = Path(spec["dir"]) / f"hogsvd_n{n}.h5"
    if not out.exists():
        hogsvd_group([f"e{i}" for i in range(n)], [paths[i % len(paths)] for i in range(n)], out,
                     HOGSVDSettings(), device=spec["device"])
    return {"path": str(out)}


def worker_main(spec: dict) -> None:
    _threads()
    kind = spec["kind"]
    if kind == "base":
        print("RESULT " + json.dumps(build_base(spec["arch"], spec["quick"], spec["path"])), flush=True)
        return
    fn = {"methods": worker_methods, "diff": worker_diff, "stage_inputs": write_stage_inputs,
          "stage": worker_stage, "hogsvd_cache": worker_hogsvd_cache}[kind]
    res = fn(spec)
    print("RESULT " + json.dumps(res), flush=True)


# ----------------------------------------------------------------------------- parent side


def child_rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


CURRENT: list = []  # the running worker, killed on SIGTERM


def launch(spec: dict, cap_bytes: int | None, timeout: float) -> dict:
    """Run one worker; kill it past ``cap_bytes`` of RSS or ``timeout`` seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    src = spec.get("src") or str(HERE.parent / "src")  # --grid-before: another source tree
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    CURRENT[:] = [proc]
    killed = {"why": None}

    def watch():
        start = time.monotonic()
        while proc.poll() is None:
            if cap_bytes and child_rss(proc.pid) > cap_bytes:
                killed["why"] = f"killed at the {cap_bytes / GIB:.0f} GiB cap"
                proc.kill()
                return
            if time.monotonic() - start > timeout:
                killed["why"] = f"killed after {timeout:.0f} s"
                proc.kill()
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out, err = proc.communicate()
    watcher.join()
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (err or "").strip().splitlines()[-3:]
    return {"error": killed["why"] or f"exit {proc.returncode}: {' | '.join(tail)}"}


def fit_line(points: list[tuple[int, float]]):
    """Least-squares ``a + b·n`` through ``points``."""
    ns, ys = [p[0] for p in points], [p[1] for p in points]
    mn, my = statistics.fmean(ns), statistics.fmean(ys)
    var = sum((n - mn) ** 2 for n in ns)
    b = sum((n - mn) * (y - my) for n, y in zip(ns, ys)) / var if var else 0.0
    return my - b * mn, b


class Bench:
    def __init__(self, args):
        self.args = args
        self.cap = int(args.mem_cap_gib * GIB) if args.mem_cap_gib else None
        self.work = Path(tempfile.mkdtemp(prefix="real_shape_", dir=args.workdir))
        self.rows: list[dict] = []
        self.stage_rows: list[dict] = []
        self.grid_rows: list[dict] = []
        self.model_bytes: dict[str, int] = {}
        self.params: dict[str, int] = {}
        self.peer_ok = self._peer_available()

    def _peer_available(self) -> str | None:
        if self.args.no_peer:
            return "peer disabled (--no-peer)"
        sys.path.insert(0, str(HERE))
        try:
            from fusionbench_peer import Peer

            Peer(self.args.peer_dir)
        except Exception as exc:  # noqa: BLE001 - reported in the table
            return f"peer not run: {exc}"
        return None

    def spec(self, **kw) -> dict:
        out = {"device": self.args.device, "quick": self.args.quick, "peer_dir": str(self.args.peer_dir), **kw}
        if "arch" in kw:
            out["base"] = self.base(kw["arch"])
        return out

    def base(self, arch: str) -> str:
        """The arch's base state dict file (built once, in a worker)."""
        path = self.work / f"base_{arch}.safetensors"
        if not path.exists():
            res = launch({"kind": "base", "arch": arch, "quick": self.args.quick, "path": str(path)}, None,
                         self.args.timeout)
            if "error" in res:
                raise RuntimeError(f"building {arch}: {res['error']}")
            self.model_bytes[arch] = res["model_bytes"]
            self.params[arch] = res["params"]
            self.log(f"{arch}: {res['params'] / 1e6:.1f} M parameters, {res['model_bytes'] / 2**20:.0f} MiB")
        return str(path)

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def size(self, arch: str) -> int:
        """One model's bytes (measured by a worker's first run)."""
        return self.model_bytes.get(arch, 0)

    def predicted(self, impl: str, method: str, arch: str, n: int) -> float | None:
        mb = self.size(arch)
        if not mb:
            return None
        extra = EXTRA_MODELS.get((impl, method), lambda n: 1)(n)  # others: the cap's kill decides
        return 0.6 * GIB + (n + 1 + extra) * mb  # + interpreter/torch, base, inputs

    def measure(self, impl: str, method: str, arch: str, n: int, save: bool) -> dict:
        need = self.predicted(impl, method, arch, n)
        if self.cap and need and need > self.cap:
            return {"error": "skipped", "need": need}
        path = str(self.work / f"{impl}_{method}_{arch}_{n}.pt") if save else None
        res = launch(self.spec(kind="methods", impl=impl, method=method, arch=arch, n=n, save=path),
                     self.cap, self.args.timeout)
        if "model_bytes" in res:
            self.model_bytes[arch] = res["model_bytes"]
        if path and "error" not in res:
            res["saved"] = path
        return res

    def estimate(self, impl: str, method: str, arch: str) -> str:
        """Peak RSS and time of a skipped run, fitted at two small N that fit the cap."""
        probes = []
        for n in PROBES:
            res = self.measure(impl, method, arch, n, save=False)
            if "error" in res:
                return f"(probe at N = {n} failed: " + res["error"] + ")"
            probes.append((n, res))
            self.log(f"  probe {impl} {method} {arch} N={n}: {res['seconds']:.1f} s, {res['peak_rss'] / GIB:.2f} GiB")
        return probes

    def methods(self, arch: str, n: int, method: str) -> None:
        impls = ["ours"]
        has_peer = method in ("ta", "ties", "consensus", "tsv_m", "iso_c", "iso_cts")
        if has_peer and not self.peer_ok:
            impls.append("peer")
        runs = {i: [] for i in impls}
        for rep in range(self.args.repeats):
            order = impls if rep % 2 == 0 else impls[::-1]  # interleaved
            for impl in order:
                res = self.measure(impl, method, arch, n, save=(rep == 0))
                runs[impl].append(res)
                msg = res.get("error") or f"{res['seconds']:.2f} s, peak {res['peak_rss'] / GIB:.2f} GiB"
                self.log(f"{arch} N={n} {method} {impl} rep {rep}: {msg}")
        row = {"arch": arch, "n": n, "method": method, "has_peer": has_peer, "note": ""}
        for impl in impls:
            ok = [r for r in runs[impl] if "error" not in r]
            if ok:
                row[impl] = {"seconds": statistics.median(r["seconds"] for r in ok),
                             "cpu_s": statistics.median(r["cpu_s"] for r in ok),
                             "peak_rss": max(r["peak_rss"] for r in ok),
                             "over_inputs": max(r["peak_rss"] - r["rss_inputs"] for r in ok),
                             "gpu": max((r.get("gpu_peak_over_inputs", 0) for r in ok), default=0),
                             "saved": next((r["saved"] for r in ok if "saved" in r), None)}
            else:
                err = runs[impl][0]
                row[impl] = {"error": err["error"], "need": err.get("need")}
        if has_peer and self.peer_ok:
            row["note"] = self.peer_ok
        if "peer" in row and row["peer"].get("error") == "skipped":
            row["note"] = f"peer: {row['peer']['error']}"
        elif "peer" in row and "error" in row["peer"]:  # a failure, not memory: no estimate
            row["note"] = f"peer failed: {row['peer']['error'].split(' | ')[-1][:160]}"
        if "peer" in row and (row["peer"].get("error") == "skipped" or "cap" in row["peer"].get("error", "")):
            probes = self.estimate("peer", method, arch)
            if isinstance(probes, str):
                row["note"] = f"peer {row['peer']['error']} {probes}"
            else:
                a, b = fit_line([(n_, r["peak_rss"]) for n_, r in probes])
                ta, tb = fit_line([(n_, r["seconds"]) for n_, r in probes])
                ca, cb = fit_line([(n_, r["cpu_s"]) for n_, r in probes])
                row["peer"]["est_rss"] = a + b * n
                row["peer"]["est_seconds"] = ta + tb * n
                row["peer"]["est_cpu"] = ca + cb * n
                row["note"] = (f"peer {row['peer']['error']}: needs ≈ {(a + b * n) / GIB:.1f} GiB "
                               f"(+{b / GIB:.2f} GiB per expert, fitted at N = {PROBES[0]}, {PROBES[1]}), "
                               f"est. {ta + tb * n:.0f} s ({ca + cb * n:.0f} CPU s)")
        ours, peer = row.get("ours", {}), row.get("peer", {})
        if ours.get("saved") and peer.get("saved"):
            diff = launch(self.spec(kind="diff", a=ours["saved"], b=peer["saved"]), self.cap, self.args.timeout)
            row["diff"] = diff
        for r in (ours, peer):
            if r.get("saved"):
                Path(r["saved"]).unlink(missing_ok=True)
        self.rows.append(row)

    def grid(self, arch: str, n: int) -> None:
        """The grid and one point, on this tree's ``src`` and (``--grid-before``) another's,
        all interleaved."""
        codes = [("this tree", None)] + ([(f"before ({self.args.grid_before})", str(self.args.grid_before))]
                                         if self.args.grid_before else [])
        runs = [(code, which) for code in codes for which in ("alg1", "grid")]
        res: dict = {}
        for rep in range(self.args.repeats):
            for (label, src), which in (runs if rep % 2 == 0 else runs[::-1]):
                r = launch(self.spec(kind="methods", impl="grid", method=which, arch=arch, n=n, src=src),
                           self.cap, self.args.timeout)
                res.setdefault(label, {}).setdefault(which, []).append(r)
                msg = r.get("error") or f"{r['seconds']:.2f} s ({r['cpu_s']:.2f} CPU s) {r.get('phases', {})}"
                self.log(f"{arch} N={n} {label} {which} rep {rep}: {msg}")
        for label, by_which in res.items():
            row = {"arch": arch, "n": n, "code": label}
            for which, rs in by_which.items():
                ok = [r for r in rs if "error" not in r]
                row[which] = statistics.median(r["seconds"] for r in ok) if ok else None
                row[which + "_cpu"] = statistics.median(r["cpu_s"] for r in ok) if ok else None
                row[which + "_rss"] = max((r["peak_rss"] for r in ok), default=None)
                for phase in ("svd", "rebuild", "apply", "boost"):
                    vals = [r["phases"][phase] for r in ok if phase in r.get("phases", {})]
                    if vals:
                        row[f"{which}_{phase}"] = statistics.median(vals)
            self.grid_rows.append(row)

    def stage(self, arch: str) -> None:
        d = self.work / f"stage_{arch}"
        d.mkdir(exist_ok=True)
        distinct = min(self.args.stage_distinct, max(self.args.stage_n))
        self.log(f"{arch}: writing {distinct} task-vector HDF5 files")
        inp = launch(self.spec(kind="stage_inputs", arch=arch, dir=str(d), distinct=distinct), self.cap,
                     self.args.timeout)
        if "error" in inp:
            self.stage_rows.append({"arch": arch, "error": inp["error"]})
            return
        for method in self.args.stage_methods:
            for n in self.args.stage_n:
                extra = {}
                if "hogsvd" in stage_method(method).needs:
                    c = launch(self.spec(kind="hogsvd_cache", arch=arch, n=n, paths=inp["paths"], dir=str(d)),
                               self.cap, self.args.timeout)
                    if "error" in c:
                        self.stage_rows.append({"arch": arch, "n": n, "method": method, **c})
                        continue
                    extra["hogsvd_cache"] = c["path"]
                r = launch(self.spec(kind="stage", arch=arch, n=n, method=method, paths=inp["paths"],
                                     dir=str(d), **extra), self.cap, self.args.timeout)
                msg = r.get("error") or f"{r['seconds']:.1f} s, peak {r['peak_rss'] / GIB:.2f} GiB"
                self.log(f"stage {arch} N={n} {method}: {msg}")
                self.stage_rows.append({"arch": arch, "n": n, "method": method, "model_bytes": inp["model_bytes"],
                                        "distinct": distinct, **r})
        for p in [*inp["paths"], *d.glob("hogsvd_n*.h5")]:
            Path(p).unlink(missing_ok=True)

    # ------------------------------------------------------------------------- report

    def table(self) -> str:
        a = self.args
        lines = [f"## Real-shape benchmark ({'quick: 2 blocks' if a.quick else 'whole towers'}, device {a.device})", "",
                 f"Command: `{' '.join(shlex.quote(x) for x in sys.argv)}`  ",
                 f"Machine: {machine(a.device)}; one torch thread; median of {a.repeats}; "
                 f"memory cap {a.mem_cap_gib or 'none'} GiB; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
                 ""]
        if self.rows:
            lines += ["### Merge methods on in-memory task vectors", "",
                      "| arch | N | method | ours s (CPU s) | FusionBench s (CPU s) | ours ÷ FB (CPU) "
                      "| ours peak RSS GiB | over inputs GiB | FB peak RSS GiB | FB over inputs GiB "
                      "| ‖ours − FB‖/‖FB‖ | notes |",
                      "|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
            for r in self.rows:
                o, p = r.get("ours", {}), r.get("peer", {})

                def cell(x, key, fmt, scale=1.0):
                    v = x.get(key)
                    return format(v / scale, fmt) if isinstance(v, (int, float)) else "–"

                ratio = (f"{o['seconds'] / p['seconds']:.2f} ({o['cpu_s'] / p['cpu_s']:.2f})"
                         if "seconds" in o and "seconds" in p else "–")
                diff = r.get("diff", {})
                dcell = f"{diff['rel']:.1e}" if "rel" in diff else "–"
                peer_s = f"{p['seconds']:.2f} ({p['cpu_s']:.2f})" if "seconds" in p else (
                    f"(≈{p['est_seconds']:.0f} ({p['est_cpu']:.0f}))" if "est_seconds" in p else "–")
                peer_rss = cell(p, "peak_rss", ".2f", GIB) if "peak_rss" in p else (
                    f"(≈{p['est_rss'] / GIB:.1f})" if "est_rss" in p else "–")
                note = r["note"] or ("no FusionBench implementation" if not r["has_peer"] else "")
                if "error" in o:
                    note = f"ours: {o['error']}; " + note
                if o.get("gpu") or p.get("gpu"):
                    note += f" GPU peak over inputs: ours {o.get('gpu', 0) / GIB:.2f}, FB {p.get('gpu', 0) / GIB:.2f} GiB"
                ours_s = f"{o['seconds']:.2f} ({o['cpu_s']:.2f})" if "seconds" in o else "–"
                lines.append(f"| {r['arch']} | {r['n']} | {LABELS[r['method']]} | {ours_s} | "
                             f"{peer_s} | {ratio} | {cell(o, 'peak_rss', '.2f', GIB)} | "
                             f"{cell(o, 'over_inputs', '.2f', GIB)} | {peer_rss} | {cell(p, 'over_inputs', '.2f', GIB)} | "
                             f"{dcell} | {note.strip()} |")
            lines.append("")
        if self.grid_rows:
            lines += ["### α×β grid (30 points) vs one literal Algorithm-1 point (TA + SB)", "",
                      "| arch | N | code | grid s (CPU s) | one point s (CPU s) | grid ÷ point (CPU) "
                      "| grid CPU s: SVDs / 5 rebuilds / 30 θ0+αΔ | point CPU s: SB / θ0+αΔ "
                      "| grid peak RSS GiB | point peak RSS GiB |",
                      "|---|--:|---|--:|--:|--:|--:|--:|--:|--:|"]
            for r in self.grid_rows:
                g, p = r.get("grid"), r.get("alg1")
                gc, pc = r.get("grid_cpu"), r.get("alg1_cpu")

                def ph(*keys):
                    return " / ".join(f"{r[k]:.2f}" if k in r else "–" for k in keys)

                lines.append(f"| {r['arch']} | {r['n']} | {r['code']} | {g:.2f} ({gc:.2f}) | {p:.2f} ({pc:.2f}) | "
                             f"{g / p:.2f} ({gc / pc:.2f}) | {ph('grid_svd', 'grid_rebuild', 'grid_apply')} | "
                             f"{ph('alg1_boost', 'alg1_apply')} | "
                             f"{r['grid_rss'] / GIB:.2f} | {r['alg1_rss'] / GIB:.2f} |" if g and p else
                             f"| {r['arch']} | {r['n']} | {r['code']} | {g} | {p} | – | – | – | – | – |")
            lines.append("")
        if self.stage_rows:
            lines += ["### Merge stage (`merge_group` on per-expert HDF5 task vectors)", "",
                      "| arch | N | method | s (CPU s) | peak RSS GiB | ÷ one model | RSS before the call GiB "
                      "| (peak − before) ÷ one model | distinct files |",
                      "|---|--:|---|--:|--:|--:|--:|--:|--:|"]
            for r in self.stage_rows:
                if "seconds" not in r:
                    ok = [(q["n"], q["peak_rss"]) for q in self.stage_rows if "seconds" in q
                          and q["arch"] == r["arch"] and q["method"] == r.get("method")]
                    est = ""
                    if len(ok) >= 2 and "n" in r:
                        a, b = fit_line(ok)
                        est = (f"; needs ≈ {(a + b * r['n']) / GIB:.1f} GiB (+{b / GIB:.2f} GiB per expert, "
                               f"fitted at N = {', '.join(str(n) for n, _ in ok)})")
                    lines.append(f"| {r['arch']} | {r.get('n', '–')} | {r.get('method', '–')} | – | – | – | – | – | "
                                 f"{r.get('error')}{est} |")
                    continue
                lines.append(f"| {r['arch']} | {r['n']} | {r['method']} | {r['seconds']:.1f} ({r['cpu_s']:.1f}) | "
                             f"{r['peak_rss'] / GIB:.2f} | {r['peak_rss'] / r['model_bytes']:.1f} | "
                             f"{r['rss_start'] / GIB:.2f} | {(r['peak_rss'] - r['rss_start']) / r['model_bytes']:.1f} | "
                             f"{r['distinct']} |")
            lines.append("")
        return "\n".join(lines)


def machine(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    name = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, torch {torch.__version__}"


def csv(kind):
    return lambda s: [kind(x) for x in s.split(",") if x]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--arch", type=csv(str), default=["ViT-B-32"], help="open_clip configs, comma-separated")
    p.add_argument("--n", type=csv(int), default=None, help="expert counts for the methods (default 8,20; quick 4)")
    p.add_argument("--methods", type=csv(str), default=list(OURS) + ["grid"],
                   help=f"of {','.join(OURS)},grid (default all)")
    p.add_argument("--stage-n", type=csv(int), default=None, help="expert counts for the merge stage "
                   "(default 8,20,50; quick 4,8; empty: none)")
    p.add_argument("--stage-methods", type=csv(str), default=list(STAGE_METHODS))
    p.add_argument("--stage-distinct", type=int, default=10, help="distinct task-vector files, cycled to N")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="2 blocks of each tower, N = 4")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--mem-cap-gib", type=float, default=8.0, help="kill / skip past this RSS (0: none)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per measurement")
    p.add_argument("--peer-dir", type=Path, default=HERE / "peers" / "fusion_bench_0.2.33")
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--grid-before", type=Path, default=None,
                   help="grid: also measure with this source tree's submerge (e.g. main's src), interleaved")
    p.add_argument("--workdir", default=None, help="for temporary files (default: the system's)")
    p.add_argument("--out", type=Path, action="append", default=[],
                   help="markdown file(s) to append the table to (repeatable)")
    args = p.parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return
    if args.n is None:
        args.n = [4] if args.quick else [8, 20]
    if args.stage_n is None:
        args.stage_n = [4, 8] if args.quick else [8, 20, 50]
    unknown = sorted(set(args.methods) - set(OURS) - {"grid"})
    if unknown:
        p.error(f"--methods: unknown {unknown}; known: {', '.join(OURS)}, grid")
    def stop(signum, frame):  # `timeout` in bench/gpu.sh: write the table of what has finished
        for proc in CURRENT:
            proc.kill()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    bench = Bench(args)
    if bench.peer_ok:
        bench.log(bench.peer_ok)
    try:
        for arch in args.arch:
            for n in args.n:
                for method in args.methods:
                    if method == "grid":
                        bench.grid(arch, n)
                    else:
                        bench.methods(arch, n, method)
            if args.stage_n and args.stage_methods:
                bench.stage(arch)
    finally:
        text = bench.table()
        print(text)
        for out in args.out:
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "a") as f:
                f.write(text + "\n")
        import shutil

        shutil.rmtree(bench.work, ignore_errors=True)


if __name__ == "__main__":
    main()
