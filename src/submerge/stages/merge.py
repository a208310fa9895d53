"""Stage 3b (``workflow/rules/merge.smk``): per (group, method) the merged task vector Δ_merge
(without α, LiNeS applied) and, for boosted methods, the SVD factors of every boosted matrix,
so that each grid point only rescales and reconstructs; the TALL-mask λ of Consensus.

Both stream the group's task vectors from their HDF5 files one parameter of every expert at a
time (:func:`submerge.stages.common.open_task_vectors`): the memory is about the merged task
vector (and its factors) plus one parameter of each expert, flat in the number of experts."""

from __future__ import annotations

import json
import logging
from typing import Iterator, Mapping, Sequence

from torch import Tensor

from submerge import merges
from submerge.io.jsonio import read_json, write_json
from submerge.recipe import LINES_NORM, EvalSettings, Method, Suite
from submerge.stages.common import (PathLike, evaluate_on, load_base, merged_module,
                                    open_task_vectors, record_provenance, resolve_device)

log = logging.getLogger(__name__)


def extra_merge_inputs(method: Method, experts: Sequence[str],
                       paths: Mapping[str, PathLike]) -> dict:
    """The merge function's extra keyword arguments, read from the extra input files the
    workflow hands it (``paths``: :data:`submerge.merges.EXTRA_INPUTS` name → file)."""
    missing = [n for n in method.needs if n not in paths]
    if missing:
        raise ValueError(f"method {method.name!r} needs the extra inputs {missing}")
    kwargs: dict = {}
    if merges.TALL_LAMBDAS in method.needs:
        chosen = read_json(paths[merges.TALL_LAMBDAS])["lambdas"]
        kwargs["lambdas"] = [chosen[e] for e in experts]
    if merges.HOGSVD_CACHE in method.needs:
        from submerge.io.hogsvd_cache import read_hogsvd_cache

        cache = read_hogsvd_cache(paths[merges.HOGSVD_CACHE], with_basis="lazy")
        if list(cache.experts) != list(experts):
            raise ValueError(f"{cache.path}: HO-GSVD of experts {cache.experts}, not of the group "
                             f"{list(experts)}; delete it and rerun (rule hogsvd)")
        kwargs["cache"] = cache
    return kwargs


def merged_task_vector(method: Method, tvs, layer_info: Mapping,
                       extra: Mapping | None = None) -> tuple[dict, dict]:
    """Δ_merge of ``method`` (its merge function, then LiNeS if configured) and attributes to
    record, in memory (:func:`merged_items`, collected)."""
    items, attrs = merged_items(method, tvs, layer_info, extra)
    return dict(items), attrs


def merged_items(method: Method, tvs, layer_info: Mapping, extra: Mapping | None = None, *,
                 spill_dir: PathLike | None = None) -> tuple[Iterator[tuple[str, Tensor]], dict]:
    """Δ_merge of ``method`` (its merge function, then LiNeS if configured) one key at a time
    in sorted order, and the attributes to record, complete once the items are consumed (LiNeS'
    norm-based scale needs the L1 norm of the whole merged task vector). ``tvs``: the task
    vectors, in memory or a source read one parameter at a time
    (:class:`submerge.merging.source.TaskVectorSource`). ``extra``: the merge function's extra
    inputs (:func:`extra_merge_inputs`). LiNeS at a fixed slope with the norm-based scale
    scales every key by a value known only after the last one: the unscaled keys wait in a
    temporary store under ``spill_dir`` (or in memory without one)."""
    from submerge.merging import merge_items

    kwargs = {**method.merge_kwargs(), **(extra or {})}
    log.info("merging %d experts with %s %s", len(tvs), method.merge, dict(method.hyper))
    items = merge_items(method.merge, tvs, layer_info, **kwargs)
    attrs: dict = {"merge": method.merge}
    lines = method.lines
    if lines is None:
        return items, attrs
    if lines.tunes_slope:  # reference protocol: LiNeS per grid point (point_delta)
        return _lines_reference(items, tvs, method, attrs), attrs
    if lines.scale != LINES_NORM:
        return _lines_fixed(items, layer_info, float(lines.scale), float(lines.slope), attrs), attrs
    return _lines_norm(items, tvs, layer_info, float(lines.slope), attrs, spill_dir), attrs


def _lines_reference(items: Iterator, tvs, method: Method, attrs: dict) -> Iterator:
    """The merged keys unchanged; LiNeS' scale recorded for the grid points."""
    from submerge.merging.lines import l1_norm, lines_alpha

    norm = method.lines.scale == LINES_NORM
    total = 0.0
    for key, value in items:
        if norm:
            total += l1_norm(value)
        yield key, value
    scale = lines_alpha(tvs, merged_l1=total) if norm else float(method.lines.scale)
    attrs.update(lines_scale=scale, lines_protocol=method.lines.protocol)
    log.info("LiNeS (reference protocol): scale=%.4g, β tuned per grid point", scale)


def _lines_fixed(items: Iterator, layer_info: Mapping, scale: float, slope: float,
                 attrs: dict) -> Iterator:
    """The merged keys scaled by LiNeS at ``scale`` and ``slope``."""
    from submerge.layers import num_blocks
    from submerge.merging.lines import lines_scale

    attrs.update(lines_scale=scale, lines_slope=slope)
    log.info("LiNeS: scale=%.4g slope=%.4g", scale, slope)
    blocks = num_blocks(layer_info)
    for key, value in items:
        yield key, lines_scale({key: value}, layer_info, alpha=scale, beta=slope, num_blocks=blocks)[key]


def _lines_norm(items: Iterator, tvs, layer_info: Mapping, slope: float, attrs: dict,
                spill_dir: PathLike | None) -> Iterator:
    """LiNeS at ``slope`` with the norm-based scale: every merged key first (in a temporary
    task-vector store under ``spill_dir``, or in memory), then the scaled keys."""
    import tempfile

    from submerge.io import hdf5
    from submerge.merging.lines import l1_norm, lines_alpha

    total = 0.0
    if spill_dir is None:
        held = {}
        for key, value in items:
            total += l1_norm(value)
            held[key] = value
        yield from _lines_fixed(iter(held.items()), layer_info, lines_alpha(tvs, merged_l1=total),
                                slope, attrs)
        return
    with tempfile.TemporaryDirectory(dir=spill_dir, prefix=".lines-") as tmp:
        path = f"{tmp}/unscaled.h5"
        with hdf5.StoreWriter(path, "state_dict", layer_info) as writer:
            for key, value in items:
                total += l1_norm(value)
                writer.dense(key, value)
        with hdf5.TaskVectorFiles([path], getattr(tvs, "device", "cpu")) as stored:
            unscaled = ((key, stored.read_one(0, key)) for key in stored.keys)
            yield from _lines_fixed(unscaled, layer_info, lines_alpha(tvs, merged_l1=total),
                                    slope, attrs)


def point_delta(delta: Mapping, layer_info: Mapping, method: Method, alpha: float,
                lines_scale_value: float | None) -> tuple[dict, float]:
    """The task vector and merge coefficient of a grid point's α for ``delta`` (already boosted
    at the point's β): ``(delta, α)``, or under LiNeS' reference protocol (wang-kee/LiNeS
    ``src/eval/eval.py``) ``(LiNeS(delta; scale, β=α), 1.0)`` with the scale fixed at merge
    time (``lines_scale_value``, the merged cache's ``lines_scale``). Boosting is positively
    homogeneous per matrix and LiNeS scales whole matrices, so LiNeS after boosting equals
    LiNeS before it."""
    from submerge.merging.lines import lines_scale

    if method.lines is None or not method.lines.tunes_slope:
        return dict(delta), float(alpha)
    if lines_scale_value is None:
        raise ValueError(f"method {method.name!r}: the merged cache has no lines_scale (LiNeS "
                         "reference protocol); delete it and rerun (rule merged)")
    return lines_scale(delta, layer_info, alpha=float(lines_scale_value), beta=float(alpha)), 1.0


def boost_factors(method: Method, delta: Mapping, layer_info: Mapping) -> dict:
    """SVD factors of every matrix of ``delta`` that ``method`` boosts (empty for unboosted
    methods), key by key. Each key's factors are a :class:`submerge.boosting.BoostFactors`."""
    from submerge.boosting import boost_targets, svd_factors

    if method.boost is None:
        return {}
    out = {}
    for key in boost_targets(layer_info, layers=method.boost.layers,
                             attn_mode=method.boost.attn_mode):
        if key not in delta:
            continue
        out.update(svd_factors({key: delta[key]}, layer_info, layers=method.boost.layers,
                               attn_mode=method.boost.attn_mode))
    return out


def reconstruct(dense: Mapping, factors: Mapping, layer_info: Mapping, method: Method,
                beta: float | None) -> dict:
    """Δ for one β: dense entries as they are, factored ones boosted (α applied later).
    ``factors`` as :func:`boost_factors` returns them (:class:`submerge.boosting.BoostFactors`)
    keep each block's polar factor ``U Vh`` for the next β; plain lists of ``(U, S, Vh)`` (as
    ``io.hdf5.read_factored`` returns them) give the same result, bitwise, computing it anew."""
    from submerge.boosting import boost_from_factors

    betas = method.boost.betas(beta) if method.boost is not None else {"attn": None, "mlp": None}
    delta = dict(dense)
    for key, fs in factors.items():
        delta[key] = boost_from_factors(fs, beta=betas[layer_info[key].kind], alpha=1.0,
                                        dtype=fs[0][0].dtype)
    return delta


def merge_group(experts: Sequence[str], tv_paths: Sequence[PathLike], method: Method,
                out: PathLike, *, extra_paths: Mapping[str, PathLike] | None = None,
                device: str = "auto") -> None:
    """Δ_merge of one (group, method), LiNeS applied, and for boosted methods the SVD factors
    of every boosted matrix, written key by key as the merge produces them (the merged task
    vector is never held whole)."""
    from pathlib import Path

    from submerge.io import hdf5

    dev = resolve_device(device)
    extra = extra_merge_inputs(method, experts, extra_paths or {})
    with open_task_vectors(tv_paths, dev) as source:
        layer_info = source.layer_info
        with hdf5.StoreWriter(out, "factored", layer_info) as writer:
            items, attrs = merged_items(method, source, layer_info, extra, spill_dir=Path(out).parent)
            for key, delta in items:
                factors = boost_factors(method, {key: delta}, layer_info).get(key)
                if factors is None:
                    writer.dense(key, delta)
                else:
                    writer.factors(key, factors)
            writer.attrs.update(attrs, experts=json.dumps(list(experts)),
                                method=json.dumps(method.to_params(), sort_keys=True))
    record_provenance([out], [*tv_paths, *(extra_paths or {}).values()])


def choose_tall_lambdas(suite: Suite, experts: Sequence[str], base_path: PathLike,
                        tv_paths: Sequence[PathLike], lambdas: Sequence[float], out: PathLike,
                        settings: EvalSettings, eval_data: Sequence[PathLike] = ()) -> None:
    """TALL masks' λ_t per task (Wang et al. 2024): the λ whose masked multi-task model
    θ_0 + m_t ∘ Δ_TA is most accurate on task t's validation split (ties: smaller λ)."""
    device = resolve_device(settings.device)
    base = load_base(base_path, device)
    scores: dict[str, dict[str, float]] = {e: {} for e in experts}
    with open_task_vectors(tv_paths, device) as source:
        mtl, ta = _tall_sums(source)
        for lam in sorted(lambdas):
            for i, expert in enumerate(experts):
                delta = _tall_masked(source, i, lam, mtl, ta)
                adapter, module, _ = merged_module(suite, base, delta, 1.0, device)
                acc = evaluate_on(suite, [expert], adapter, module, "val", settings, device,
                                  eval_data)
                scores[expert][str(lam)] = acc[expert]
    chosen = {e: float(max(sorted(s, key=float), key=lambda lam: s[lam])) for e, s in scores.items()}
    write_json(out, {"lambdas": chosen, "val_accuracy": scores})


def _tall_sums(source) -> tuple[dict, dict]:
    """Δ_MTL = Σ_t Δ_t in the compute dtype (what the TALL masks compare with) and Δ_TA in the
    task vectors' dtype (the same tensors for float32), one parameter at a time."""
    from submerge.merging.task_arithmetic import sum_tensors

    mtl = {key: sum_tensors(source.read(key)) for key in source.iter_keys("TALL: TA")}
    return mtl, {key: mtl[key].to(source.meta(key)[1]) for key in source.keys}


def _tall_masked(source, index: int, lam: float, mtl: Mapping, ta: Mapping) -> dict:
    """m_t ∘ Δ_TA for task ``index`` at λ (its mask needs its own task vector only)."""
    from submerge.merging.consensus import tall_masks_key

    return {k: ta[k] * tall_masks_key([source.read_one(index, k)], [lam], mtl[k])[0]
            for k in source.keys}
