"""Stage 3b (``workflow/rules/merge.smk``): per (group, method) the merged task vector Δ_merge
(without α, LiNeS applied) and, for boosted methods, the SVD factors of every boosted matrix,
so that each grid point only rescales and reconstructs; the TALL-mask λ of Consensus.

Both stream the group's task vectors from their HDF5 files one parameter of every expert at a
time (:func:`submerge.stages.common.open_task_vectors`): the memory is about the merged task
vector (and its factors) plus one parameter of each expert, flat in the number of experts."""

from __future__ import annotations

import json
import logging
from typing import Mapping, Sequence

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

        cache = read_hogsvd_cache(paths[merges.HOGSVD_CACHE], with_basis=True)
        if list(cache.experts) != list(experts):
            raise ValueError(f"{cache.path}: HO-GSVD of experts {cache.experts}, not of the group "
                             f"{list(experts)}; delete it and rerun (rule hogsvd)")
        kwargs["cache"] = cache
    return kwargs


def merged_task_vector(method: Method, tvs, layer_info: Mapping,
                       extra: Mapping | None = None) -> tuple[dict, dict]:
    """Δ_merge of ``method`` (its merge function, then LiNeS if configured) and attributes to
    record. ``tvs``: the task vectors, in memory or a source read one parameter at a time
    (:class:`submerge.merging.source.TaskVectorSource`). ``extra``: the merge function's extra
    inputs (:func:`extra_merge_inputs`)."""
    from submerge.merging import merge
    from submerge.merging.lines import lines_alpha, lines_scale

    kwargs = {**method.merge_kwargs(), **(extra or {})}
    log.info("merging %d experts with %s %s", len(tvs), method.merge, dict(method.hyper))
    delta = merge(method.merge, tvs, layer_info, **kwargs)
    attrs: dict = {"merge": method.merge}
    if method.lines is not None:
        scale = method.lines.scale
        scale = lines_alpha(tvs, delta) if scale == LINES_NORM else float(scale)
        if method.lines.tunes_slope:  # reference protocol: LiNeS per grid point (point_delta)
            attrs.update(lines_scale=scale, lines_protocol=method.lines.protocol)
            log.info("LiNeS (reference protocol): scale=%.4g, β tuned per grid point", scale)
            return delta, attrs
        slope = float(method.lines.slope)
        delta = lines_scale(delta, layer_info, alpha=scale, beta=slope)
        attrs.update(lines_scale=scale, lines_slope=slope)
        log.info("LiNeS: scale=%.4g slope=%.4g", scale, slope)
    return delta, attrs


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


def boost_factors(method: Method, delta: Mapping, layer_info: Mapping, *,
                  consume: bool = False) -> dict:
    """SVD factors of every matrix ``method`` boosts (empty for unboosted methods), key by key;
    ``consume``: remove each factored key from ``delta`` (a dict) once its factors exist, so
    that the matrix and its factors are not both held for every key. Each key's factors are a
    :class:`submerge.boosting.BoostFactors`."""
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
        if consume and key in out:
            del delta[key]
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
    of every boosted matrix."""
    from submerge.io import hdf5

    dev = resolve_device(device)
    extra = extra_merge_inputs(method, experts, extra_paths or {})
    with open_task_vectors(tv_paths, dev) as source:
        layer_info = source.layer_info
        delta, attrs = merged_task_vector(method, source, layer_info, extra)
    factors = boost_factors(method, delta, layer_info, consume=True)
    # to the host for writing (no-ops on the CPU)
    dense = {k: v.cpu() for k, v in delta.items() if k not in factors}
    factors = {k: [tuple(t.cpu() for t in f) for f in fs] for k, fs in factors.items()}
    attrs.update(experts=json.dumps(list(experts)),
                 method=json.dumps(method.to_params(), sort_keys=True))
    hdf5.write_factored(out, dense, factors, layer_info, attrs)
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
