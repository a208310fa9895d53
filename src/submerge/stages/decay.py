"""Proposition 1 summary (``workflow/rules/decay.smk``): the common and unique parts (HO-GSVD
split, Eq. 6) of the mean of the first N task vectors of the largest group, N = 1 … its size,
for every matrix of the group's HO-GSVD cache (:func:`submerge.decay.averaged_split`)."""

from __future__ import annotations

import json
import logging
import math
from typing import Sequence

from submerge.stages.common import PathLike, record_provenance

log = logging.getLogger(__name__)

SPECTRA_N = (1, 2, 5, 10, 20, 50)  # the N whose spectra the figure draws (those ≤ the group)


def decay_summary(hogsvd_path: PathLike, tv_paths: Sequence[PathLike], group: str,
                  out: PathLike, threshold: float) -> None:
    """JSON for the Proposition 1 figure::

        {"group", "experts", "threshold", "n": [1..N],
         "common_fraction": mean over matrices of the share of common directions,
         "matrices": [{"key", "row_block", "kind", "n_common", "common_fro": [N], "unique_fro": [N]}],
         "spectra": {"key", "row_block", "n": [...], "common_sv": [[...]], "unique_sv": [[...]]}}

    ``tv_paths``: the group's task vectors in the cache's expert order (the means are over
    prefixes of that order). Directions are common when every pair of experts' σ is within
    the factor ``threshold`` (:func:`submerge.hogsvd.common_unique_split`)."""
    import torch

    from submerge.decay import averaged_split
    from submerge.hogsvd import common_unique_split
    from submerge.io import hdf5
    from submerge.io.atomic import write_text_atomic
    from submerge.io.hogsvd_cache import read_hogsvd_cache

    experts, entries = read_hogsvd_cache(hogsvd_path, with_basis=True)
    if len(tv_paths) != len(experts):
        raise ValueError(f"decay_summary: {len(tv_paths)} task vectors for the {len(experts)} "
                         f"experts of {hogsvd_path}")
    blocks_of = {}
    for e in entries:
        blocks_of[e.key] = max(blocks_of.get(e.key, 0), e.row_block + 1)
    matrices, spectra = [], None
    cache: dict[str, list] = {}
    for e in entries:
        if e.key not in cache:
            cache = {e.key: [t.to(torch.float64) for t in hdf5.read_key(tv_paths, e.key)]}
        mats = [t.chunk(blocks_of[e.key], dim=0)[e.row_block] for t in cache[e.key]]
        mats = [m.T if e.transposed else m for m in mats]
        common = common_unique_split(e.sigma, threshold).common
        res = averaged_split(mats, e.V, common)
        matrices.append({"key": e.key, "row_block": e.row_block, "kind": e.kind,
                         "n_common": int(common.sum()), "n_directions": int(common.numel()),
                         "common_fro": res["common_fro"].tolist(),
                         "unique_fro": res["unique_fro"].tolist()})
        if spectra is None and 0 < int(common.sum()) < common.numel() and e.kind == "mlp":
            ns = [n for n in SPECTRA_N if n <= len(mats)]
            spectra = {"key": e.key, "row_block": e.row_block, "n": ns,
                       "common_sv": [res["common_sv"][n - 1].tolist() for n in ns],
                       "unique_sv": [res["unique_sv"][n - 1].tolist() for n in ns]}
    fraction = math.fsum(m["n_common"] / m["n_directions"] for m in matrices) / len(matrices)
    summary = {"group": group, "experts": list(experts), "threshold": threshold,
               "n": list(range(1, len(experts) + 1)), "common_fraction": fraction,
               "matrices": matrices, "spectra": spectra}
    write_text_atomic(out, json.dumps(summary) + "\n")
    record_provenance([out], [hogsvd_path, *tv_paths])
    log.info("Proposition 1 summary of group %s: %d matrices, %.0f%% of directions common",
             group, len(matrices), 100 * fraction)
