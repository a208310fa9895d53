"""Stage 6 (``workflow/rules/report.smk``): the summaries of the spectra and HO-GSVD caches that
the report draws. These two jobs read the HDF5 caches (torch); they write plain CSV/JSON, so the
``tables`` and ``figures`` jobs (:mod:`submerge.report.build`) import no torch.

* :func:`spectra_summary` (rule ``spectra_summary``): ``summaries/spectra_summary.csv`` and
  ``summaries/singular_values.csv``;
* :func:`hogsvd_summary` (rule ``hogsvd_summary``): ``summaries/hogsvd_summary.json``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

import torch

from submerge.io.atomic import atomic_path, write_text_atomic
from submerge.io.jsonio import read_json
from submerge.recipe import Method

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

SUMMARY_COLUMNS = ("group", "n_experts", "method", "boosted", "key", "block", "kind",
                   "stable_rank", "energy_rank")
SIGMA_COLUMNS = ("group", "n_experts", "method", "boosted", "kind", "key", "index", "sigma")
ENERGY_FRAC = 0.9  # the cumulative-energy rank's share of Σσ² (the rank collapse figure's label)


def _write_csv(rows: list[dict], columns: Sequence[str], path: PathLike) -> None:
    import pandas as pd

    with atomic_path(path) as tmp:
        pd.DataFrame(rows, columns=list(columns)).to_csv(tmp, index=False, float_format="%.6g")


def spectra_summary(merged: Mapping[tuple[str, str], PathLike],
                    test_points: Mapping[tuple[str, str], PathLike],
                    n_experts: Mapping[str, int], methods: Mapping[str, Method],
                    out_summary: PathLike, out_sigma: PathLike, *,
                    energy_frac: float = ENERGY_FRAC) -> None:
    """Stable rank, cumulative-energy rank and singular values of every attention/MLP matrix
    of each merged task vector (LiNeS included): for unboosted methods as merged, for boosted
    ones after boosting at the β of their test point (the β chosen on validation; the singular
    values of boosted methods are also listed before boosting, ``boosted=False``, for the
    before/after spectra figure).

    ``merged`` / ``test_points``: (group, method) -> path of the merged cache / test JSON;
    ``n_experts``: group -> its size; ``methods``: the recipe's methods (only their
    ``boost`` is read)."""
    from submerge import spectral
    from submerge.boosting import boost_singular_values
    from submerge.io import hdf5

    rows, sig_rows = [], []
    for (group, name), path in sorted(merged.items()):
        method = methods[name]
        dense, factors, layer_info, _ = hdf5.read_factored(path)
        chosen = read_json(test_points[(group, name)])
        betas = (method.boost.betas(chosen.get("beta")) if method.boosted
                 else {"attn": None, "mlp": None})
        before: dict[str, torch.Tensor] = {}  # boosted methods: their spectra before boosting
        after: dict[str, torch.Tensor] = {}
        for key, fs in factors.items():
            beta = betas[layer_info[key].kind]
            parts = [boost_singular_values(s, beta) if beta is not None else s for _, s, _ in fs]
            # the singular values of the row-stacked blocks, as in the stable rank of the key
            boosted = [(u * s) @ vh for (u, _, vh), s in zip(fs, parts)]
            after[key] = spectral.singular_values(torch.cat(boosted))
            before[key] = spectral.singular_values(torch.cat([(u * s) @ vh for u, s, vh in fs]))
        for key, value in dense.items():
            if layer_info[key].kind in ("attn", "mlp") and value.ndim == 2:
                after[key] = spectral.singular_values(value)
        for key, s in after.items():
            info = layer_info[key]
            base = {"group": group, "n_experts": n_experts[group], "method": name,
                    "boosted": method.boosted, "key": key, "block": info.block, "kind": info.kind}
            rows.append({**base, "stable_rank": spectral.stable_rank(s),
                         "energy_rank": spectral.energy_rank(s, energy_frac)})
            states = [(method.boosted, s)] + ([(False, before[key])] if key in before else [])
            for state, values in states:
                for i, sigma in enumerate(values.tolist()):
                    sig_rows.append({"group": group, "n_experts": n_experts[group], "method": name,
                                     "boosted": state, "kind": info.kind, "key": key,
                                     "index": i, "sigma": sigma})
        log.info("spectra of %s/%s: %d matrices", group, name, len(after))
    _write_csv(rows, SUMMARY_COLUMNS, out_summary)
    _write_csv(sig_rows, SIGMA_COLUMNS, out_sigma)


def hogsvd_summary(hogsvd_path: PathLike, tv_paths: Sequence[PathLike], group: str,
                   out: PathLike) -> None:
    """What the HO-GSVD figures draw, from one group's HO-GSVD cache and task vectors, as JSON::

        {"group": str, "experts": [N names],
         "alignment": {"attn": N×N, "mlp": N×N, "mean": N×N},   # Eq. 7, per layer kind
         "importance": {"key": str, "row_block": int,
                        "sigma": N×M,     # each expert's generalised singular values
                        "merged": M}}     # those of the mean task vector, same basis

    ``alignment``: per layer kind present and over all matrices ("mean"). ``importance``
    (paper Fig. 5a): an attention output projection in the middle of the network;
    ``merged`` = ‖(mean_i A_i) V^{-T} e_k‖. ``tv_paths``: the group's task vectors, in
    the cache's expert order."""
    from submerge.hogsvd import alignment_matrix
    from submerge.io import hdf5
    from submerge.io.hogsvd_cache import read_hogsvd_cache

    experts, entries = read_hogsvd_cache(hogsvd_path, with_basis=True)
    if len(tv_paths) != len(experts):
        raise ValueError(f"hogsvd_summary: {len(tv_paths)} task vectors for the {len(experts)} "
                         f"experts of {hogsvd_path}")
    alignment = {}
    for kind in ("attn", "mlp"):
        sig = [e.sigma for e in entries if e.kind == kind]
        if sig:
            alignment[kind] = alignment_matrix(sig).tolist()
    alignment["mean"] = alignment_matrix([e.sigma for e in entries]).tolist()

    attn = [e for e in entries if e.kind == "attn"] or entries
    blocks = sorted({e.block for e in attn if e.block is not None})
    block = blocks[len(blocks) // 2] if blocks else None
    pick = next((e for e in attn if e.block == block and "out" in e.key), attn[0])
    n_blocks = sum(e.key == pick.key for e in entries)  # q/k/v blocks were decomposed separately
    mean = torch.stack([t.to(torch.float64) for t in hdf5.read_key(tv_paths, pick.key)]).mean(0)
    a = mean.chunk(n_blocks, dim=0)[pick.row_block]
    a = a.T if pick.transposed else a
    merged = torch.linalg.solve(pick.V.to(torch.float64), a.T).T.norm(dim=0)  # ‖A V^{-T} e_k‖
    summary = {"group": group, "experts": list(experts), "alignment": alignment,
               "importance": {"key": pick.key, "row_block": pick.row_block,
                              "sigma": pick.sigma.tolist(), "merged": merged.tolist()}}
    write_text_atomic(out, json.dumps(summary) + "\n")
    log.info("HO-GSVD summary of group %s: %d experts, importance of %s/%d", group, len(experts),
             pick.key, pick.row_block)


def keyed(paths: Sequence[PathLike]) -> dict[tuple[str, str], Path]:
    """``.../{group}/{method}.<ext>`` paths by (group, method)."""
    return {(Path(p).parent.name, Path(p).stem): Path(p) for p in paths}
