"""Stage 3a (``workflow/rules/spectra.smk``): spectra caches that do not depend on a merge
method: the per-layer SVD of each expert's task vector, and the per-layer HO-GSVD of each
group."""

from __future__ import annotations

import logging
import time
from typing import Sequence

from submerge.recipe import HOGSVDSettings
from submerge.stages.common import PathLike, open_task_vectors, resolve_device

log = logging.getLogger(__name__)


def expert_spectrum(tv_path: PathLike, out: PathLike) -> None:
    """Per-layer SVD (per q/k/v block) of every attention/MLP matrix of one task vector."""
    from submerge.boosting import svd_factors
    from submerge.io import hdf5

    tv, layer_info, attrs = hdf5.read_state_dict(tv_path)
    factors = svd_factors(tv, layer_info, layers="both", attn_mode="per_qkv")
    hdf5.write_factored(out, {}, factors, layer_info, dict(attrs))


def hogsvd_group(experts: Sequence[str], tv_paths: Sequence[PathLike], out: PathLike,
                 settings: HOGSVDSettings, device: str = "auto") -> None:
    """Per-layer HO-GSVD of one group's task vectors (each q/k/v block separately), reading
    one parameter of every expert at a time."""
    from submerge.io.hogsvd_cache import write_hogsvd_cache

    dev = resolve_device(device)
    with open_task_vectors(tv_paths, dev) as source:
        entries = _hogsvd_entries(source, settings)
    write_hogsvd_cache(out, list(experts), entries, {"pi": settings.pi, "layers": settings.layers})


def _hogsvd_entries(source, settings: HOGSVDSettings) -> list:
    """The HO-GSVD of every target (key, row block) of ``source``, one key at a time."""
    from tqdm import tqdm

    from submerge.boosting import boost_targets
    from submerge.hogsvd import hogsvd
    from submerge.io.hogsvd_cache import HOGSVDEntry

    layer_info = source.layer_info
    targets = boost_targets(layer_info, layers=settings.layers, attn_mode="per_qkv")
    entries = []
    for key in tqdm(sorted(targets), desc="HO-GSVD", unit="layer", mininterval=5):
        blocks, info = targets[key], layer_info[key]
        tensors = list(source.read(key))  # the HO-GSVD needs every expert's matrix at once
        for b in range(blocks):
            mats = [x.chunk(blocks, dim=0)[b] for x in tensors]
            start = time.perf_counter()
            res = hogsvd(mats, pi=settings.pi)
            seconds = time.perf_counter() - start
            entries.append(HOGSVDEntry(key=key, row_block=b, kind=info.kind, block=info.block,
                                       V=res.V, sigma=res.sigma, eigvals=res.eigvals,
                                       transposed=res.transposed, seconds=seconds))
            log.info("%s[%d] %s: %.3f s", key, b, tuple(mats[0].shape), seconds)
        del tensors, mats  # before the next key is read
    return entries
