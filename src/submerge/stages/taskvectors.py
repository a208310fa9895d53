"""Stage 2 (``workflow/rules/taskvectors.smk``): one task vector per expert,
Δ = θ_expert − θ_base, as HDF5 (one dataset per parameter), with TIES' trim threshold for
every integer top-k % recorded in its manifest, so that a TIES merge streams one parameter at a
time instead of flattening every task vector first."""

from __future__ import annotations

from submerge.recipe import Suite
from submerge.stages.common import PathLike, record_provenance


def make_task_vector(suite: Suite, expert: str, base_path: PathLike, expert_path: PathLike,
                     out: PathLike) -> None:
    from submerge.io import hdf5
    from submerge.io.checkpoints import load_normalized, sha256_file
    from submerge.merging.task_vectors import task_vectors
    from submerge.merging.ties import threshold_table
    from submerge.models import get_adapter

    base, _ = load_normalized(base_path)
    theta, _ = load_normalized(expert_path)
    tv = task_vectors(base, {expert: theta})[expert]
    layer_info = get_adapter(suite.adapter).layer_infos(tv)
    hdf5.write_state_dict(out, tv, layer_info, {
        "suite": suite.name, "expert": expert, "adapter": suite.adapter,
        "base_sha256": sha256_file(base_path), "expert_sha256": sha256_file(expert_path),
    }, stats={hdf5.TIES_THRESHOLDS: threshold_table(tv)})
    record_provenance([out], [base_path, expert_path])
