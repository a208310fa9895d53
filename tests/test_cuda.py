"""The GPU path: every merge rule of the registry, LiNeS, Subspace Boosting (direct and from
SVD factors), the Higher-Order merge and the merge stage run on CUDA when handed CUDA tensors
(results stay on the GPU: no silent CPU fallback) and agree with the CPU in float32.

Tolerances (relative Frobenius norm of the difference, whole state dict):
* element-wise rules (TA, TIES, Consensus, LiNeS): 1e-6 (the same float32 operations; only
  summation order inside reductions may differ);
* SVD-based rules (TSV-M, Iso-C, Iso-CTS, Subspace Boosting): 1e-4 (cuSOLVER vs LAPACK float32
  SVDs; the shapes are chosen so every kept subspace is unique: T divides min(m, n), distinct
  singular values);
* HO-GSVD (float64 internally): 1e-8.

The HO-GSVD decomposition itself is compared in ``tests/test_hogsvd.py::test_cuda_matches_cpu``.
"""

from __future__ import annotations

import pytest
import torch

from submerge import merges
from submerge.layers import LayerInfo

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

DEVICE = "cuda"
ELEMENTWISE, SPECTRAL, FLOAT64 = 1e-6, 1e-4, 1e-8
TOL = {"task_arithmetic": ELEMENTWISE, "ties": ELEMENTWISE, "consensus": ELEMENTWISE,
       "tsv_m": SPECTRAL, "iso_c": SPECTRAL, "iso_cts": SPECTRAL, "hogsvd": FLOAT64}

# a two-block transformer in miniature: fused attention [Q; K; V], MLP, norms, biases, embeddings
LAYER_INFO = {
    **{f"blocks.{b}.attn.in_proj_weight": LayerInfo(b, "attn", 3) for b in range(2)},
    **{f"blocks.{b}.attn.out_proj.weight": LayerInfo(b, "attn") for b in range(2)},
    **{f"blocks.{b}.mlp.c_fc.weight": LayerInfo(b, "mlp") for b in range(2)},
    **{f"blocks.{b}.mlp.c_proj.weight": LayerInfo(b, "mlp") for b in range(2)},
    **{f"blocks.{b}.ln_1.weight": LayerInfo(b, "norm") for b in range(2)},
    **{f"blocks.{b}.mlp.c_fc.bias": LayerInfo(b, "other") for b in range(2)},
    "conv1.weight": LayerInfo(None, "embed"),
    "proj": LayerInfo(None, "other"),
}
WIDTH = 16  # min(m, n) = 16 for every matrix: 4 tasks keep 4 triplets each (TSV-M)
SHAPES = {"attn.in_proj_weight": (3 * WIDTH, WIDTH), "attn.out_proj.weight": (WIDTH, WIDTH),
          "mlp.c_fc.weight": (2 * WIDTH, WIDTH), "mlp.c_proj.weight": (WIDTH, 2 * WIDTH),
          "ln_1.weight": (WIDTH,), "mlp.c_fc.bias": (2 * WIDTH,), "conv1.weight": (WIDTH, 3, 2, 2),
          "proj": (WIDTH, 8)}


def shape(key: str) -> tuple[int, ...]:
    return next(s for suffix, s in SHAPES.items() if key.endswith(suffix))


def task_vectors(n: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Shared low rank + task-specific low rank + noise, float32, on the CPU."""
    g = torch.Generator().manual_seed(seed)
    shared = {k: (torch.randn(shape(k)[0], 2, generator=g), torch.randn(2, shape(k)[-1], generator=g))
              for k in LAYER_INFO if len(shape(k)) == 2}
    out = []
    for _ in range(n):
        tv = {}
        for key in LAYER_INFO:
            s = shape(key)
            x = 0.1 * torch.randn(s, generator=g)
            if key in shared:
                a, b = shared[key]
                x += a @ b + torch.randn(s[0], 2, generator=g) @ torch.randn(2, s[1], generator=g)
            tv[key] = x
        out.append(tv)
    return out


def to(tvs, device):
    return [{k: v.to(device) for k, v in tv.items()} for tv in tvs]


def rel_diff(gpu: dict, cpu: dict) -> float:
    assert set(gpu) == set(cpu)
    num = sum(float((gpu[k].cpu().double() - cpu[k].double()).norm() ** 2) for k in cpu)
    den = sum(float(cpu[k].double().norm() ** 2) for k in cpu)
    return (num / den) ** 0.5


def on_gpu(t: torch.Tensor) -> bool:
    return t.device.type == torch.device(DEVICE).type


def assert_on_gpu(sd: dict) -> None:
    off = [k for k, v in sd.items() if not on_gpu(v)]
    assert not off, f"results left the GPU: {off[:3]}"


def rule_kwargs(name: str, n: int) -> dict:
    return {"lambdas": [0.3, 0.4, 0.5, 0.6][:n]} if merges.TALL_LAMBDAS in merges.get(name).needs else {}


@pytest.mark.parametrize("name", sorted(merges.MERGES))
def test_merge_rule_on_cuda_matches_cpu(name):
    from submerge.merging import merge

    assert name in TOL, f"merge rule {name!r} has no stated CUDA tolerance in this file"
    tvs = task_vectors()
    cpu = merge(name, tvs, LAYER_INFO, **rule_kwargs(name, len(tvs)))
    gpu = merge(name, to(tvs, DEVICE), LAYER_INFO, **rule_kwargs(name, len(tvs)))
    assert_on_gpu(gpu)
    assert all(gpu[k].dtype == cpu[k].dtype == torch.float32 for k in cpu)
    assert rel_diff(gpu, cpu) <= TOL[name]


def test_consensus_with_ties_base_on_cuda():
    from submerge.merging import consensus

    tvs = task_vectors(seed=1)
    cpu = consensus(tvs, LAYER_INFO, lambdas=0.4, k=2, base="ties")
    gpu = consensus(to(tvs, DEVICE), LAYER_INFO, lambdas=0.4, k=2, base="ties")
    assert_on_gpu(gpu)
    assert rel_diff(gpu, cpu) <= ELEMENTWISE


def test_lines_on_cuda_matches_cpu():
    from submerge.merging import task_arithmetic
    from submerge.merging.lines import lines_alpha, lines_scale

    tvs = task_vectors(seed=2)
    out = {}
    for dev, batch in (("cpu", tvs), (DEVICE, to(tvs, DEVICE))):
        delta = task_arithmetic(batch, LAYER_INFO)
        alpha = lines_alpha(batch, delta)
        out[dev] = (alpha, lines_scale(delta, LAYER_INFO, alpha=alpha, beta=0.5))
    assert out[DEVICE][0] == pytest.approx(out["cpu"][0], rel=ELEMENTWISE)
    assert_on_gpu(out[DEVICE][1])
    assert rel_diff(out[DEVICE][1], out["cpu"][1]) <= ELEMENTWISE


@pytest.mark.parametrize("attn_mode", ["per_qkv", "full"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9])
def test_subspace_boost_on_cuda_matches_cpu(attn_mode, beta):
    from submerge.boosting import boost_from_factors, subspace_boost, svd_factors
    from submerge.merging import task_arithmetic

    delta = task_arithmetic(task_vectors(seed=3), LAYER_INFO)
    cpu = subspace_boost(delta, LAYER_INFO, beta=beta, attn_mode=attn_mode)
    gdelta = {k: v.to(DEVICE) for k, v in delta.items()}
    gpu = subspace_boost(gdelta, LAYER_INFO, beta=beta, attn_mode=attn_mode)
    assert_on_gpu(gpu)
    assert rel_diff(gpu, cpu) <= SPECTRAL
    # the grid's path: SVD factors once on the GPU, rebuilt per β
    factors = svd_factors(gdelta, LAYER_INFO, attn_mode=attn_mode)
    assert factors and all(on_gpu(t) for fs in factors.values() for f in fs for t in f)
    rebuilt = {k: boost_from_factors(fs, beta=beta, alpha=1.0, dtype=torch.float32) for k, fs in factors.items()}
    assert_on_gpu(rebuilt)
    assert rel_diff(rebuilt, {k: cpu[k] for k in rebuilt}) <= SPECTRAL


def test_higher_order_boost_on_cuda_matches_cpu():
    from submerge.hogsvd import higher_order_boost

    mats = [tv["blocks.0.mlp.c_fc.weight"] for tv in task_vectors(seed=4)]
    cpu = higher_order_boost(mats, beta=0.2)
    gpu = higher_order_boost([m.to(DEVICE) for m in mats], beta=0.2)
    assert on_gpu(gpu) and gpu.dtype == torch.float32
    assert float((gpu.cpu() - cpu).norm() / cpu.norm()) <= SPECTRAL  # float32 output of a float64 computation


def test_merge_stage_on_cuda_matches_cpu(tmp_path):
    """``merge_group(device="cuda")``: the stage's Δ_merge and boost factors equal the CPU's."""
    from submerge.io import hdf5
    from submerge.recipe import Method
    from submerge.stages.merge import merge_group

    paths = []
    for i, tv in enumerate(task_vectors(seed=5)):
        paths.append(tmp_path / f"tv{i}.h5")
        hdf5.write_state_dict(paths[-1], tv, LAYER_INFO, {"expert": f"e{i}"})
    method = Method.from_params({"name": "ta_sb", "merge": "task_arithmetic", "hyper": {}, "boost": {}})
    experts = [f"e{i}" for i in range(len(paths))]
    got = {}
    for dev in ("cpu", DEVICE):
        out = tmp_path / f"merged_{dev}.h5"
        merge_group(experts, paths, method, out, device=dev)
        got[dev] = hdf5.read_factored(out)
    (dense_c, fac_c, *_), (dense_g, fac_g, *_) = got["cpu"], got[DEVICE]
    assert set(fac_c) == set(fac_g) and fac_c
    assert rel_diff(dense_g, dense_c) <= ELEMENTWISE
    from submerge.boosting import boost_from_factors

    for key in fac_c:  # factors are unique up to signs: compare the rebuilt matrices
        a = boost_from_factors(fac_g[key], beta=0.3)
        b = boost_from_factors(fac_c[key], beta=0.3)
        assert float((a - b).norm() / b.norm()) <= SPECTRAL, key
