"""Stage 3b (``workflow/rules/merge.smk``): per (group, method) the merged task vector Δ_merge
(without α, LiNeS applied) and, for boosted methods, the SVD factors of every boosted matrix,
so that each grid point only rescales and reconstructs; the TALL-mask λ of Consensus."""

from __future__ import annotations

import json
import logging
from typing import Mapping, Sequence

from submerge import merges
from submerge.io.jsonio import read_json, write_json
from submerge.recipe import LINES_NORM, EvalSettings, Method, Suite
from submerge.stages.common import (PathLike, evaluate_on, load_base, load_task_vectors,
                                    merged_module, record_provenance, resolve_device)

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


def merged_task_vector(method: Method, tvs: Sequence[Mapping], layer_info: Mapping,
                       extra: Mapping | None = None) -> tuple[dict, dict]:
    """Δ_merge of ``method`` (its merge function, then LiNeS if configured) and attributes to
    record. ``extra``: the merge function's extra inputs (:func:`extra_merge_inputs`)."""
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


def boost_factors(method: Method, delta: Mapping, layer_info: Mapping) -> dict:
    """SVD factors of every matrix ``method`` boosts (empty for unboosted methods)."""
    from submerge.boosting import svd_factors

    if method.boost is None:
        return {}
    return svd_factors(delta, layer_info, layers=method.boost.layers,
                       attn_mode=method.boost.attn_mode)


def reconstruct(dense: Mapping, factors: Mapping, layer_info: Mapping, method: Method,
                beta: float | None) -> dict:
    """Δ for one β: dense entries as they are, factored ones boosted (α applied later)."""
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
    tvs, layer_info = load_task_vectors(tv_paths, dev)
    extra = extra_merge_inputs(method, experts, extra_paths or {})
    delta, attrs = merged_task_vector(method, tvs, layer_info, extra)
    factors = boost_factors(method, delta, layer_info)
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
    from submerge.merging.consensus import tall_masks
    from submerge.merging.task_arithmetic import task_arithmetic

    device = resolve_device(settings.device)
    tvs, layer_info = load_task_vectors(tv_paths, device)
    base = load_base(base_path, device)
    ta = task_arithmetic(tvs, layer_info)
    scores: dict[str, dict[str, float]] = {e: {} for e in experts}
    for lam in sorted(lambdas):
        masks = tall_masks(tvs, [lam] * len(tvs))
        for expert, mask in zip(experts, masks):
            delta = {k: v * mask[k] if k in mask else v for k, v in ta.items()}
            adapter, module, _ = merged_module(suite, base, delta, 1.0, device)
            acc = evaluate_on(suite, [expert], adapter, module, "val", settings, device,
                              eval_data)
            scores[expert][str(lam)] = acc[expert]
    chosen = {e: float(max(sorted(s, key=float), key=lambda lam: s[lam])) for e, s in scores.items()}
    write_json(out, {"lambdas": chosen, "val_accuracy": scores})
