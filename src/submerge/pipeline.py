"""The workflow's stages as plain functions (paths and config dicts in, files out).

Each Snakemake script in ``scripts/`` unpacks ``snakemake.input/output/params`` and calls one
function here, so every stage also runs (and is tested) without Snakemake. The math lives in
:mod:`submerge.merging`, :mod:`submerge.boosting` and :mod:`submerge.hogsvd`; files are read
and written only through :mod:`submerge.io`.

``suite`` arguments are the *suite view* of the config: ``suite, adapter, arch, digits, base,
tokenizer, seed`` plus ``experts`` restricted to the experts a job depends on.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Mapping, Sequence

import torch

from .errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

PathLike = str | os.PathLike


# ---------------------------------------------------------------------------------------------
# small shared helpers


def setup_logging(log_path: PathLike | None) -> None:
    """Log INFO and above to ``log_path`` (Snakemake's ``log:``) and to stderr."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def excepthook(kind, value, tb):  # the error also goes to the job's log file
        logging.getLogger("submerge").critical("job failed", exc_info=(kind, value, tb))

    sys.excepthook = excepthook


def suite_root(suite: Mapping) -> Path:
    return Path("results") / suite["suite"]


def cache_dir() -> Path:
    """Download cache: $SUBMERGE_CACHE or ~/.cache/submerge."""
    return Path(os.environ.get("SUBMERGE_CACHE", Path.home() / ".cache" / "submerge"))


def is_digits(spec: Mapping) -> bool:
    return spec.get("build") == "digits"


def digits_config(suite: Mapping) -> dict:
    from .suites import digits

    return digits.resolve_config(suite.get("digits"))


def suite_arch(suite: Mapping) -> dict:
    """The architecture the adapter builds: ``arch`` from the config, else the digits default."""
    if suite.get("arch"):
        return dict(suite["arch"])
    if is_digits(suite["base"]):
        return dict(digits_config(suite)["arch"])
    raise ConfigError("config field arch: required for suites whose base is downloaded")


def write_json(path: PathLike, obj) -> None:
    from .io.atomic import write_text_atomic

    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: PathLike):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def resolve_device(spec: str = "auto") -> torch.device:
    from .evaluate import resolve_device as _resolve

    device = _resolve(spec)
    if device.type == "cuda":
        # deterministic where torch allows it
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    log.info("device: %s%s", device,
             f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    return device


def _load_source(spec: Mapping, what: str) -> tuple[dict, dict]:
    """Fetch and load a checkpoint source (``{"source": {...}, "trust_pickle": ...}``)."""
    from .io.checkpoints import load_checkpoint, sha256_file
    from .io.download import fetch

    source = spec["source"]
    pinned = source.get("sha256")
    path = fetch(source, cache_dir())  # verifies a pinned sha256
    trust = bool(spec.get("trust_pickle", False))
    # load_checkpoint only needs the pin to allow full pickle; fetch has checked it already
    raw = load_checkpoint(path, trust_pickle=trust, sha256=pinned if trust else None)
    log.info("%s: loaded %s (%d entries)", what, path, len(raw))
    digest = str(pinned).strip().lower() if pinned else sha256_file(path)
    # "source_*": the normalised file's sidecar keeps "sha256" for its own hash (save_normalized)
    return raw, {"source": dict(source), "source_sha256": digest, "source_file": str(path)}


# ---------------------------------------------------------------------------------------------
# stage 1: checkpoints


def build_base(suite: Mapping, out: PathLike) -> None:
    """The base model's tower, normalised to safetensors + JSON sidecar."""
    from .io.checkpoints import save_normalized
    from .models import get_adapter

    adapter = get_adapter(suite["adapter"])
    spec = suite["base"]
    meta = {"suite": suite["suite"], "model": "base", "adapter": adapter.name}
    if is_digits(spec):
        from .suites import digits

        cfg = digits_config(suite)
        sd = digits.pretrain_base(cfg)
        meta.update(source={"build": "digits"}, digits=cfg)
    else:
        raw, info = _load_source(spec, "base")
        sd = adapter.tower_state_dict(raw)
        meta.update(info)
    meta["arch"] = suite_arch(suite)
    save_normalized(sd, out, meta)


def build_expert(suite: Mapping, expert: str, base_path: PathLike, out_model: PathLike,
                 out_head: PathLike) -> None:
    """One expert's tower (normalised, checked against the base) and its classification head."""
    from .data.heads import save_head
    from .io.checkpoints import load_normalized, save_normalized
    from .merging.task_vectors import validate_state_dicts
    from .models import get_adapter

    adapter = get_adapter(suite["adapter"])
    spec = suite["experts"][expert]
    base_sd, _ = load_normalized(base_path)
    meta = {"suite": suite["suite"], "model": expert, "adapter": adapter.name}
    if is_digits(spec):
        from .suites import digits

        cfg = digits_config(suite)
        head = digits.train_head(base_sd, spec["task"], cfg)
        sd, metrics = digits.finetune_expert(base_sd, head, spec["task"], cfg)
        meta.update(source={"build": "digits", "task": spec["task"]}, metrics=metrics)
        save_head(out_head, head["weight"], head.get("bias"),
                  {"normalize": False, "logit_scale": 1.0, "expert": expert,
                   "classes": list(digits.TASKS[spec["task"]].classes)})
    else:
        raw, info = _load_source(spec, f"expert {expert}")
        sd = adapter.complete_from_base(adapter.tower_state_dict(raw), base_sd)
        meta.update(info)
        _build_real_head(suite, expert, out_head)
    validate_state_dicts(base_sd, {expert: sd})
    meta["arch"] = suite_arch(suite)
    save_normalized(sd, out_model, meta)


def _build_real_head(suite: Mapping, expert: str, out_head: PathLike) -> None:
    """A shipped head (``head.source``) or a zero-shot head from the base's text tower."""
    from .data import heads

    spec = suite["experts"][expert]
    head_spec = spec.get("head")
    if spec.get("dataset", {}).get("kind") == "text":
        # text-to-text tasks are scored by the language model itself (data.language); the head
        # file only records that, so that every expert has the same outputs
        heads.save_head(out_head, torch.zeros(0, 0), None,
                        {"normalize": False, "logit_scale": 1.0, "expert": expert,
                         "kind": "text-to-text", "note": "no classification head: rank "
                         "classification / exact match with the T5 model"})
        return
    if head_spec is None:
        raise ConfigError(f"config field experts.{expert}.head: required for downloaded experts "
                          "({source: ...} or {zeroshot: true})")
    if "source" in head_spec:
        raw, info = _load_source(head_spec, f"head of {expert}")
        weight, bias, meta = heads.head_from_module(raw)
        meta.update(info)
    else:
        weight, meta = zero_shot_head_for_suite(suite, expert)
        bias = None
    meta["expert"] = expert
    heads.save_head(out_head, weight, bias, meta)


def zero_shot_head_for_suite(suite: Mapping, expert: str) -> tuple[torch.Tensor, dict]:
    """A zero-shot head for ``expert``'s dataset from the suite's full CLIP (``zeroshot_model``:
    image and text tower), with the class names and templates of its dataset block."""
    from .data import heads, vision

    spec = suite.get("zeroshot_model")
    if spec is None:
        raise ConfigError(f"config field zeroshot_model: required for experts.{expert}.head.zeroshot "
                          "(a full CLIP checkpoint with its text tower)")
    dcfg = vision.parse_dataset_cfg(suite["experts"][expert], expert, vision.VISION_DEFAULTS)
    classnames, templates = vision.prompts(dcfg, expert)
    raw, info = _load_source(spec, "zero-shot CLIP")
    arch = suite_arch(suite)
    if suite["adapter"] == "open_clip_vit":
        import open_clip

        model = open_clip.create_model(arch["model"], pretrained=None,
                                       force_quick_gelu=bool(arch.get("quick_gelu", False)))
        tokenizer = open_clip.get_tokenizer(arch["model"])
    elif suite["adapter"] == "hf_clip_vision":
        import transformers

        tok = suite.get("tokenizer")
        if tok is None:
            raise ConfigError("config field tokenizer: required to build zero-shot heads with "
                              "hf_clip_vision ({hub: <repo id>} or {path: <dir>} of a CLIP tokenizer)")
        from .data.language import load_tokenizer

        tokenizer = load_tokenizer(tok)
        config = transformers.CLIPConfig(**arch) if "vision_config" in arch else \
            transformers.CLIPConfig(vision_config=arch, projection_dim=arch.get("projection_dim", 512))
        model = transformers.CLIPModel(config)
        # transformers 4 saved the position_ids buffers that transformers 5 no longer keeps
        expected = set(model.state_dict())
        raw = {k: v for k, v in raw.items() if k in expected or not k.endswith("embeddings.position_ids")}
    else:
        raise ConfigError(f"config field adapter: zero-shot heads need a CLIP adapter, not {suite['adapter']!r}")
    try:  # strict: a missing text tower must not leave a randomly initialised one behind
        model.load_state_dict(raw)
    except RuntimeError as exc:
        raise CheckpointError(
            f"zeroshot_model {info['source_file']}: not a full CLIP checkpoint of config field arch "
            f"(hf_clip_vision: a vision-only arch gets transformers' default text tower; otherwise give "
            f"a CLIPConfig dict with text_config, vision_config and projection_dim): {exc}") from exc
    weight, meta = heads.zero_shot_head(model, tokenizer, classnames, templates)
    meta.update(zeroshot_model=info)
    return weight, meta


# ---------------------------------------------------------------------------------------------
# stage 2 and 3a: task vectors and spectra


def make_task_vector(suite: Mapping, expert: str, base_path: PathLike, expert_path: PathLike,
                     out: PathLike) -> None:
    from .io import hdf5
    from .io.checkpoints import load_normalized, sha256_file
    from .merging.task_vectors import task_vectors
    from .models import get_adapter

    base, _ = load_normalized(base_path)
    theta, _ = load_normalized(expert_path)
    tv = task_vectors(base, {expert: theta})[expert]
    layer_info = get_adapter(suite["adapter"]).layer_infos(tv)
    hdf5.write_state_dict(out, tv, layer_info, {
        "suite": suite["suite"], "expert": expert, "adapter": suite["adapter"],
        "base_sha256": sha256_file(base_path), "expert_sha256": sha256_file(expert_path),
    })


def expert_spectrum(tv_path: PathLike, out: PathLike) -> None:
    """Per-layer SVD (per q/k/v block) of every attention/MLP matrix of one task vector."""
    from .boosting import svd_factors
    from .io import hdf5

    tv, layer_info, attrs = hdf5.read_state_dict(tv_path)
    factors = svd_factors(tv, layer_info, layers="both", attn_mode="per_qkv")
    hdf5.write_factored(out, {}, factors, layer_info, dict(attrs))


# ---------------------------------------------------------------------------------------------
# stage 3b: merged task vectors


_RULE_HYPER = ("k", "merge", "base", "common_space_fraction", "pi")


def merged_task_vector(method: Mapping, tvs: Sequence[Mapping], layer_info: Mapping, *,
                       lambdas: Sequence[float] | None = None) -> tuple[dict, dict]:
    """Δ_merge of ``method`` (its rule, then LiNeS if configured) and attributes to record."""
    from .merging import merge
    from .merging.lines import lines_alpha, lines_scale

    rule = method["rule"]
    hyper = {k: method[k] for k in _RULE_HYPER if k in method}
    if rule == "consensus":
        if lambdas is None:
            raise ConfigError("consensus needs per-task TALL-mask lambdas (rule consensus_lambdas)")
        hyper["lambdas"] = list(lambdas)
    log.info("merging %d experts with %s %s", len(tvs), rule, hyper)
    delta = merge(rule, tvs, layer_info, **hyper)
    attrs: dict = {"rule": rule}
    if "lines" in method:
        a = method["lines"].get("alpha", "norm")
        a = lines_alpha(tvs, delta) if a == "norm" else float(a)
        b = float(method["lines"].get("beta", 0.5))
        delta = lines_scale(delta, layer_info, alpha=a, beta=b)
        attrs.update(lines_alpha=a, lines_beta=b)
        log.info("LiNeS: alpha=%.4g beta=%.4g", a, b)
    return delta, attrs


def boost_factors(method: Mapping, delta: Mapping, layer_info: Mapping) -> dict:
    """SVD factors of every matrix ``method`` boosts (empty for unboosted methods)."""
    from .boosting import svd_factors

    if "boost" not in method:
        return {}
    boost = method["boost"]
    return svd_factors(delta, layer_info, layers=boost.get("layers", "both"),
                       attn_mode=boost.get("attn_mode", "per_qkv"))


def merge_group(experts: Sequence[str], tv_paths: Sequence[PathLike], method: Mapping,
                out: PathLike, *, lambdas_path: PathLike | None = None,
                device: str = "auto") -> None:
    """Δ_merge of one (group, method), LiNeS applied, and for boosted methods the SVD factors
    of every boosted matrix, so that each grid point only rescales and reconstructs."""
    from .io import hdf5

    dev = resolve_device(device)
    tvs, layer_info = _load_task_vectors(tv_paths, dev)
    lambdas = None
    if lambdas_path is not None:
        chosen = read_json(lambdas_path)["lambdas"]
        lambdas = [chosen[e] for e in experts]
    delta, attrs = merged_task_vector(method, tvs, layer_info, lambdas=lambdas)
    factors = boost_factors(method, delta, layer_info)
    dense = {k: v.cpu() for k, v in delta.items() if k not in factors}
    factors = {k: [tuple(t.cpu() for t in f) for f in fs] for k, fs in factors.items()}
    attrs.update(experts=json.dumps(list(experts)), method=json.dumps(method, sort_keys=True))
    hdf5.write_factored(out, dense, factors, layer_info, attrs)


# ---------------------------------------------------------------------------------------------
# stage 4 and 5: grid points, reference accuracies, test evaluation


def boost_betas(method: Mapping, beta: float | None) -> dict[str, float | None]:
    """β per layer kind for one grid point: the grid β unless the method fixes a kind's β."""
    if beta is None or "boost" not in method:
        return {"attn": None, "mlp": None}
    boost = method["boost"]
    return {"attn": boost.get("beta_attn", beta), "mlp": boost.get("beta_mlp", beta)}


def reconstruct(dense: Mapping, factors: Mapping, layer_info: Mapping, method: Mapping,
                beta: float | None) -> dict:
    """Δ for one β: dense entries as they are, factored ones boosted (α applied later)."""
    from .boosting import boost_from_factors

    betas = boost_betas(method, beta)
    delta = dict(dense)
    for key, fs in factors.items():
        delta[key] = boost_from_factors(fs, beta=betas[layer_info[key].kind], alpha=1.0,
                                        dtype=fs[0][0].dtype)
    return delta


def merged_delta(merged_path: PathLike, method: Mapping, beta: float | None,
                 device: torch.device) -> dict:
    """Δ for one β from the merged cache of a (group, method)."""
    from .io import hdf5

    dense, factors, layer_info, _ = hdf5.read_factored(merged_path)
    dense = {k: v.to(device) for k, v in dense.items()}
    factors = {k: [tuple(t.to(device) for t in f) for f in fs] for k, fs in factors.items()}
    return reconstruct(dense, factors, layer_info, method, beta)


def load_base(base_path: PathLike, device: torch.device) -> dict:
    """The normalised base state dict on ``device`` (read once per job, reused per model)."""
    from .io.checkpoints import load_normalized

    base, _ = load_normalized(base_path)
    return {k: v.to(device) for k, v in base.items()}


def merged_module(suite: Mapping, base: Mapping, delta: Mapping, alpha: float,
                  device: torch.device):
    """θ = θ_base + α·Δ loaded into a fresh tower module on ``device`` (``base`` from
    :func:`load_base`)."""
    from .merging.task_vectors import apply_task_vector
    from .models import get_adapter

    adapter = get_adapter(suite["adapter"])
    theta = apply_task_vector(base, {k: v.to(base[k].dtype) for k, v in delta.items()}, alpha)
    module = adapter.build(suite_arch(suite))
    module.load_state_dict(theta)
    return adapter, module.to(device).eval(), theta


def _evaluate_on(suite, experts, adapter, module, split, eval_cfg, device) -> dict[str, float]:
    from .data import load_eval_task
    from .evaluate import evaluate

    root = suite_root(suite)
    tasks = [load_eval_task(suite, e, root=root) for e in experts]
    limit = eval_cfg.get(f"max_{split}_examples")
    return evaluate(adapter, module, tasks, split, device=device,
                    batch_size=int(eval_cfg.get("batch_size", 256)), max_examples=limit)


def run_grid_point(suite: Mapping, experts: Sequence[str], method: Mapping, group: str,
                   method_name: str, base_path: PathLike, merged_path: PathLike, alpha: float,
                   beta: float | None, out: PathLike, eval_cfg: Mapping,
                   save_merged: bool = False) -> None:
    """Reconstruct θ = θ_base + α·boost_β(Δ_merge) from the cache; validation accuracy per task."""
    device = resolve_device(eval_cfg.get("device", "auto"))
    delta = merged_delta(merged_path, method, beta, device)
    base = load_base(base_path, device)
    adapter, module, theta = merged_module(suite, base, delta, alpha, device)
    accuracy = _evaluate_on(suite, experts, adapter, module, "val", eval_cfg, device)
    if save_merged:
        from .io.checkpoints import save_normalized

        save_normalized({k: v.cpu() for k, v in theta.items()},
                        Path(out).with_suffix(".safetensors"),
                        {"group": group, "method": method_name, "alpha": alpha, "beta": beta})
    write_json(out, {"group": group, "method": method_name, "alpha": alpha, "beta": beta,
                     "split": "val", "device": str(device), "accuracy": accuracy})
    log.info("%s/%s a=%s b=%s: mean val accuracy %.4f", group, method_name, alpha, beta,
             sum(accuracy.values()) / len(accuracy))


def run_reference(suite: Mapping, expert: str, base_path: PathLike, expert_path: PathLike,
                  out: PathLike, eval_cfg: Mapping) -> None:
    """Accuracy of the expert itself and of the base (zero-shot) with the expert's head."""
    from .io.checkpoints import load_normalized
    from .models import get_adapter

    device = resolve_device(eval_cfg.get("device", "auto"))
    adapter = get_adapter(suite["adapter"])
    result = {"expert": expert, "device": str(device)}
    for name, path in (("expert", expert_path), ("zeroshot", base_path)):
        sd, _ = load_normalized(path)
        module = adapter.build(suite_arch(suite))
        module.load_state_dict(sd)
        module = module.to(device).eval()
        for split in ("val", "test"):
            acc = _evaluate_on(suite, [expert], adapter, module, split, eval_cfg, device)
            result.setdefault(split, {})[name] = acc[expert]
    write_json(out, result)


def selection_score(accuracy: Mapping[str, float], references: Mapping[str, Mapping],
                    metric: str) -> float:
    """Mean validation accuracy, normalised by each expert's own accuracy (the references'
    criterion) or absolute."""
    if metric == "absolute":
        return sum(accuracy.values()) / len(accuracy)
    vals = []
    for task, acc in accuracy.items():
        ref = references[task]["val"]["expert"]
        vals.append(acc / ref if ref > 0 else math.nan)
    return sum(vals) / len(vals)


def choose_point(grid: Sequence[Mapping], references: Mapping[str, Mapping],
                 metric: str = "normalized") -> Mapping:
    """The grid point with the best validation score; ties go to the smaller α, then β."""
    if not grid:
        raise ValueError("no grid points to choose from")

    def key(point):
        beta = -1.0 if point["beta"] is None else point["beta"]
        return (-selection_score(point["accuracy"], references, metric), point["alpha"], beta)

    return min(grid, key=key)


def run_test_point(suite: Mapping, experts: Sequence[str], method: Mapping, group: str,
                   method_name: str, grid_paths: Sequence[PathLike],
                   reference_paths: Sequence[PathLike], base_path: PathLike,
                   merged_path: PathLike, out: PathLike, eval_cfg: Mapping,
                   metric: str = "normalized") -> None:
    """Choose (α, β) on validation, evaluate that point on the test split."""
    grid = [read_json(p) for p in grid_paths]
    refs = {r["expert"]: r for r in map(read_json, reference_paths)}
    best = choose_point(grid, refs, metric)
    device = resolve_device(eval_cfg.get("device", "auto"))
    delta = merged_delta(merged_path, method, best["beta"], device)
    base = load_base(base_path, device)
    adapter, module, _ = merged_module(suite, base, delta, best["alpha"], device)
    accuracy = _evaluate_on(suite, experts, adapter, module, "test", eval_cfg, device)
    write_json(out, {"group": group, "method": method_name, "alpha": best["alpha"],
                     "beta": best["beta"], "split": "test", "device": str(device),
                     "val_score": selection_score(best["accuracy"], refs, metric),
                     "selection_metric": metric, "accuracy": accuracy})


def aggregate_scores(suite_name: str, groups: Mapping[str, Sequence[str]],
                     grid_paths: Sequence[PathLike], test_paths: Sequence[PathLike],
                     reference_paths: Sequence[PathLike], out: PathLike) -> None:
    """One row per (group, method, α, β, split, task) with the reference accuracies."""
    import pandas as pd

    from .io.atomic import atomic_path

    refs = {r["expert"]: r for r in map(read_json, reference_paths)}
    rows = []
    for path in list(grid_paths) + list(test_paths):
        point = read_json(path)
        for task, acc in point["accuracy"].items():
            ref = refs[task][point["split"]]
            rows.append({
                "suite": suite_name, "group": point["group"],
                "n_experts": len(groups[point["group"]]), "method": point["method"],
                "alpha": point["alpha"],
                "beta": math.nan if point["beta"] is None else point["beta"],
                "split": point["split"], "task": task, "accuracy": acc,
                "expert_accuracy": ref["expert"], "zeroshot_accuracy": ref["zeroshot"],
            })
    frame = pd.DataFrame(rows).sort_values(
        ["group", "method", "split", "alpha", "beta", "task"], na_position="first")
    with atomic_path(out) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")


# ---------------------------------------------------------------------------------------------
# HO-GSVD cache, TALL-mask λ selection, expert selection


def _load_task_vectors(tv_paths: Sequence[PathLike], device: torch.device):
    from .io import hdf5

    tvs, layer_info = [], None
    for path in tv_paths:
        tv, layer_info, _ = hdf5.read_state_dict(path)
        tvs.append({k: v.to(device) for k, v in tv.items()})
    return tvs, layer_info


def hogsvd_group(experts: Sequence[str], tv_paths: Sequence[PathLike], out: PathLike, *,
                 pi: float = 1e-2, layers: str = "both", device: str = "auto") -> None:
    """Per-layer HO-GSVD of one group's task vectors (each q/k/v block separately)."""
    import time

    from tqdm import tqdm

    from .boosting import boost_targets
    from .hogsvd import hogsvd
    from .io.hogsvd_cache import HOGSVDEntry, write_hogsvd_cache

    dev = resolve_device(device)
    tvs, layer_info = _load_task_vectors(tv_paths, dev)
    targets = boost_targets(layer_info, layers=layers, attn_mode="per_qkv")
    entries = []
    for key in tqdm(sorted(targets), desc="HO-GSVD", unit="layer", mininterval=5):
        blocks, info = targets[key], layer_info[key]
        for b in range(blocks):
            mats = [tv[key].chunk(blocks, dim=0)[b] for tv in tvs]
            start = time.perf_counter()
            res = hogsvd(mats, pi=pi)
            seconds = time.perf_counter() - start
            entries.append(HOGSVDEntry(key=key, row_block=b, kind=info.kind, block=info.block,
                                       V=res.V, sigma=res.sigma, eigvals=res.eigvals,
                                       transposed=res.transposed, seconds=seconds))
            log.info("%s[%d] %s: %.3f s", key, b, tuple(mats[0].shape), seconds)
    write_hogsvd_cache(out, list(experts), entries, {"pi": pi, "layers": layers})


def choose_tall_lambdas(suite: Mapping, experts: Sequence[str], base_path: PathLike,
                        tv_paths: Sequence[PathLike], lambdas: Sequence[float], out: PathLike,
                        eval_cfg: Mapping) -> None:
    """TALL masks' λ_t per task (Wang et al. 2024): the λ whose masked multi-task model
    θ_0 + m_t ∘ Δ_TA is most accurate on task t's validation split (ties: smaller λ)."""
    from .merging.consensus import tall_masks
    from .merging.task_arithmetic import task_arithmetic

    device = resolve_device(eval_cfg.get("device", "auto"))
    tvs, layer_info = _load_task_vectors(tv_paths, device)
    base = load_base(base_path, device)
    ta = task_arithmetic(tvs, layer_info)
    scores: dict[str, dict[str, float]] = {e: {} for e in experts}
    for lam in sorted(lambdas):
        masks = tall_masks(tvs, [lam] * len(tvs))
        for expert, mask in zip(experts, masks):
            delta = {k: v * mask[k] if k in mask else v for k, v in ta.items()}
            adapter, module, _ = merged_module(suite, base, delta, 1.0, device)
            acc = _evaluate_on(suite, [expert], adapter, module, "val", eval_cfg, device)
            scores[expert][str(lam)] = acc[expert]
    chosen = {e: float(max(sorted(s, key=float), key=lambda lam: s[lam])) for e, s in scores.items()}
    write_json(out, {"lambdas": chosen, "val_accuracy": scores})


def run_selection(suite: Mapping, universe: Sequence[str], selection: Mapping,
                  method_name: str, method: Mapping, alphas: Sequence[float],
                  betas: Sequence[float | None], hogsvd_path: PathLike,
                  tv_paths: Sequence[PathLike], reference_paths: Sequence[PathLike],
                  base_path: PathLike, out: PathLike, eval_cfg: Mapping) -> None:
    """Expert selection (paper Tables 5 and 10): ``k`` candidates chosen to minimise
    interference with the pre-selected pool (the HO-GSVD Alignment Matrix) vs random draws.
    Each selection is merged with ``method`` (α, β chosen on the merged tasks' validation
    splits) and evaluated on the test split of every expert of the universe."""
    import pandas as pd

    from .hogsvd import alignment_matrix, random_selection, select_experts
    from .io.atomic import atomic_path
    from .io.hogsvd_cache import read_hogsvd_cache

    cached, entries = read_hogsvd_cache(hogsvd_path)
    if list(cached) != list(universe):
        raise ValueError(f"{hogsvd_path}: experts {cached} differ from the universe {list(universe)}")
    align = alignment_matrix([e.sigma for e in entries])
    index = {e: i for i, e in enumerate(universe)}
    pool = [index[e] for e in selection["pool"]]
    ext = set(selection.get("ext", []))
    candidates = [index[e] for e in universe if e not in ext and index[e] not in pool]
    k = int(selection["k"])
    chosen = select_experts(align, pool, candidates, k, method=selection.get("strategy", "greedy"))
    settings = [("hogsvd", 0, chosen)] + [
        ("random", d, draw) for d, draw in enumerate(random_selection(
            candidates, k, int(selection.get("draws", 10)), int(selection.get("seed", 0))))]
    refs = {r["expert"]: r for r in map(read_json, reference_paths)}
    device = resolve_device(eval_cfg.get("device", "auto"))
    all_tvs, layer_info = _load_task_vectors(tv_paths, device)
    base = load_base(base_path, device)
    rows = []
    for setting, draw, picked in settings:
        members = [universe[i] for i in pool + list(picked)]
        tvs = [all_tvs[index[e]] for e in members]
        delta_fn = _selection_merger(method, tvs, layer_info)
        grid = []
        for beta in betas:
            delta = delta_fn(beta)
            for alpha in alphas:
                adapter, module, _ = merged_module(suite, base, delta, alpha, device)
                acc = _evaluate_on(suite, members, adapter, module, "val", eval_cfg, device)
                grid.append({"alpha": alpha, "beta": beta, "accuracy": acc})
        best = choose_point(grid, refs, eval_cfg.get("selection_metric", "normalized"))
        adapter, module, _ = merged_module(suite, base, delta_fn(best["beta"]),
                                           best["alpha"], device)
        test = _evaluate_on(suite, list(universe), adapter, module, "test", eval_cfg, device)
        for task, acc in test.items():
            sets = ["all"] + (["pool"] if task in selection["pool"] else
                              ["ext"] if task in ext else [])
            for task_set in sets:
                rows.append({"setting": setting, "draw": draw, "method": method_name,
                             "experts": "+".join(members), "alpha": best["alpha"],
                             "beta": math.nan if best["beta"] is None else best["beta"],
                             "split": "test", "task": task, "task_set": task_set,
                             "accuracy": acc, "expert_accuracy": refs[task]["test"]["expert"]})
        log.info("%s draw %d: %s", setting, draw, members)
    with atomic_path(out) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False, float_format="%.6g")


def _selection_merger(method: Mapping, tvs, layer_info):
    """β -> Δ for one selection: merge (+ LiNeS) once, SVD once, boost per β."""
    if method["rule"] == "consensus":
        raise ConfigError("experiments.selection.method: consensus needs per-task λ; "
                          "use a task_arithmetic / ties / hogsvd method")
    delta, _ = merged_task_vector(method, tvs, layer_info)
    factors = boost_factors(method, delta, layer_info)
    dense = {k: v for k, v in delta.items() if k not in factors}
    return lambda beta: reconstruct(dense, factors, layer_info, method, beta)
