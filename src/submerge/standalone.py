"""Merging and rank diagnostics outside the pipeline (``submerge merge``, ``submerge
diagnose``), on the pipeline's own stage functions: each expert is loaded, normalised by its
adapter and turned into an HDF5 task vector by
:func:`submerge.stages.taskvectors.make_task_vector`, one at a time, then
:func:`submerge.stages.merge.merge_group` merges them (LiNeS, the SVD factors of boosting),
:func:`submerge.stages.merge.reconstruct` boosts at β and
:func:`submerge.stages.common.merged_module` applies α; :func:`submerge.export.write_export`
writes the result in the source's format. No second implementation of any of these steps.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from submerge.errors import CheckpointError, ConfigError
from submerge.recipe import GridPoint, HOGSVDSettings, MergeRecipe, Suite

log = logging.getLogger(__name__)

ENERGY_FRAC = 0.9  # the cumulative-energy rank's share of Σσ² (as the report's rank collapse figure)


@dataclass
class Sources:
    """The fetched checkpoint files and the architecture they are read with."""

    adapter: str
    arch: dict
    base_file: Path
    expert_files: dict[str, Path]


def _fetch(spec: Mapping, what: str) -> Path:
    from submerge.io.download import fetch
    from submerge.stages.common import cache_dir

    try:
        return fetch(spec["source"], cache_dir())
    except (CheckpointError, ConfigError) as exc:
        raise CheckpointError(f"{what}: {exc}") from None


def _hf_config(recipe: MergeRecipe, base_file: Path) -> dict | None:
    """The ``config.json`` beside the base checkpoint (a local directory or the same hub repo)."""
    source = recipe.base["source"]
    if "hub" in source:
        hub = {k: v for k, v in source["hub"].items() if k != "file"}
        try:
            path = _fetch({"source": {"hub": {**hub, "file": "config.json"}}}, "base config.json")
        except CheckpointError:
            return None
    else:
        path = base_file.parent / "config.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def resolve_sources(recipe: MergeRecipe) -> Sources:
    """Fetch every checkpoint (a missing or mismatching file fails here, before any work) and
    settle the adapter and architecture: the recipe's, else a normalised checkpoint's sidecar
    (``results/<suite>/models/*.json``), else the HF ``config.json`` beside the base."""
    base_file = _fetch(recipe.base, "base")
    experts = {name: _fetch(spec, f"expert {name}") for name, spec in recipe.experts.items()}
    adapter, arch = recipe.adapter, recipe.arch
    sidecar = base_file.with_suffix(".json")
    meta = {}
    if sidecar.is_file() and base_file.suffix == ".safetensors":
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
        except ValueError:
            meta = {}
    if isinstance(meta, dict) and "arch" in meta and "adapter" in meta:
        adapter = adapter or meta["adapter"]
        arch = arch or meta["arch"]
    if adapter is None or arch is None:
        config = _hf_config(recipe, base_file)
        if config is not None:
            from submerge.models import adapter_for_hf_config

            adapter = adapter or adapter_for_hf_config(config)
            arch = arch or {k: v for k, v in config.items()
                            if k not in ("architectures", "transformers_version", "torch_dtype", "dtype")}
    if adapter is None:
        raise ConfigError(f"config field adapter: cannot tell the architecture of {base_file}; "
                          "give it (open_clip_vit, hf_clip_vision or hf_t5)")
    if arch is None:
        raise ConfigError(f"config field arch: required for {base_file} (an open_clip model name "
                          "such as ViT-B-32, or a mapping; HF models: a config.json beside the base)")
    from submerge.models import get_adapter

    get_adapter(adapter)  # ConfigError for an unknown adapter
    return Sources(adapter=adapter, arch=dict(arch), base_file=base_file, expert_files=experts)


def _load_tower(adapter, spec: Mapping, what: str, path: Path) -> tuple[dict, str]:
    """The normalised tower of a checkpoint and its sha256."""
    from submerge.stages.common import load_source

    try:
        raw, info = load_source(spec, what)
        return adapter.tower_state_dict(raw), info["source_sha256"]
    except (CheckpointError, ValueError) as exc:
        raise CheckpointError(f"{what} ({path}): {exc}") from None


def task_vector_files(recipe: MergeRecipe, sources: Sources, workdir: Path
                      ) -> tuple[Path, dict[str, str], list[Path]]:
    """The normalised base's file, the sha256 of every checkpoint (``"base"`` and each expert) and
    one HDF5 task vector per expert under ``workdir``: each expert is loaded, checked against
    the base, normalised to a file and turned into its task vector by the pipeline's
    :func:`~submerge.stages.taskvectors.make_task_vector`, one expert at a time."""
    from tqdm import tqdm

    from submerge.io.checkpoints import save_normalized
    from submerge.merging.task_vectors import validate_state_dicts
    from submerge.models import get_adapter
    from submerge.stages.taskvectors import make_task_vector

    adapter = get_adapter(sources.adapter)
    suite = _suite(sources)
    base, base_sha = _load_tower(adapter, recipe.base, "base", sources.base_file)
    base_path = workdir / "base.safetensors"
    meta = {"adapter": adapter.name, "arch": sources.arch}
    save_normalized(base, base_path, {**meta, "model": "base", "source_sha256": base_sha})
    shas, paths = {"base": base_sha}, []
    for name in tqdm(list(recipe.experts), desc="task vectors", unit="expert", disable=None):
        spec, path = recipe.experts[name], sources.expert_files[name]
        what = f"expert {name}"
        sd, shas[name] = _load_tower(adapter, spec, what, path)
        try:
            sd = adapter.complete_from_base(sd, base)
            validate_state_dicts(base, {name: sd})
        except (CheckpointError, ValueError) as exc:
            raise CheckpointError(f"{what} ({path}) does not match the base "
                                  f"({sources.base_file}): {exc}") from None
        expert_path = workdir / f"expert-{name}.safetensors"
        save_normalized(sd, expert_path, {**meta, "model": name, "source_sha256": shas[name]})
        del sd
        paths.append(workdir / f"tv-{name}.h5")
        make_task_vector(suite, name, base_path, expert_path, paths[-1])
        expert_path.unlink()  # one normalised expert on disk at a time
        expert_path.with_suffix(".json").unlink()
    return base_path, shas, paths


def _extra_inputs(recipe: MergeRecipe, experts: list[str], tv_paths: list[Path], workdir: Path,
                  tag: str = "") -> dict:
    """The extra inputs of the merge function, made here where that is possible (HO-GSVD)."""
    from submerge import merges
    from submerge.stages.spectra import hogsvd_group

    extra = {}
    for need in recipe.method.needs:
        if need == merges.HOGSVD_CACHE:
            path = workdir / f"hogsvd{tag}.h5"
            hogsvd_group(experts, tv_paths, path, HOGSVDSettings(), recipe.device)
            extra[need] = path
        else:
            raise ConfigError(f"config field method.merge: {recipe.method.merge!r} needs {need} "
                              "chosen on validation data, which only the pipeline has; use the "
                              "pipeline (config/) or another merge function")
    return extra


def _suite(sources: Sources) -> Suite:
    return Suite(name="merge", adapter=sources.adapter, view={"arch": sources.arch})


def merge(recipe: MergeRecipe, output: Path, *, command: str = "submerge merge") -> Path:
    """``submerge merge``: the merged model of ``recipe`` written to ``output`` (a directory, in
    the source's format, :func:`submerge.export.write_export`)."""
    from submerge.export import ModelCard, write_export
    from submerge.stages.export import chosen_model
    from submerge.stages.merge import merge_group

    if recipe.alpha is None:
        raise ConfigError("config field alpha: required (the scale of the merged task vector)")
    sources = resolve_sources(recipe)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    experts = list(recipe.experts)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".submerge-merge-") as tmp:
        work = Path(tmp)
        base_path, shas, tv_paths = task_vector_files(recipe, sources, work)
        extra = _extra_inputs(recipe, experts, tv_paths, work)
        merged_path = work / "merged.h5"
        merge_group(experts, tv_paths, recipe.method, merged_path, extra_paths=extra,
                    device=recipe.device)
        point = GridPoint(recipe.alpha, recipe.beta if recipe.method.boosted else None)
        adapter, module = chosen_model(_suite(sources), recipe.method, point, base_path,
                                       merged_path, recipe.device)
        card = ModelCard(
            title=f"{recipe.method.label} merge of {len(experts)} experts",
            method=recipe.method, alpha=recipe.alpha,
            beta=recipe.beta if recipe.method.boosted else None,
            experts={e: shas[e] for e in experts}, base_sha256=shas["base"],
            chosen=f"given ({command})")
        write_export(adapter, module.cpu(), sources.arch, output, card,
                     inputs=[sources.base_file, *sources.expert_files.values()])
    return output


def diagnose(recipe: MergeRecipe, out_dir: Path, *, energy_frac: float = ENERGY_FRAC,
             with_hogsvd: bool = False) -> dict[str, Path]:
    """``submerge diagnose``: the rank-collapse curve of ``recipe``'s experts. For n = 1..N the
    first n experts are merged (:func:`~submerge.stages.merge.merge_group`) and every boosted
    matrix's stable rank and cumulative-energy rank is taken before and after boosting at β
    (:func:`~submerge.stages.merge.reconstruct`). Writes ``rank_collapse.csv`` (per matrix),
    ``rank_collapse.md`` (means per n), ``rank_collapse.png``; with ``with_hogsvd`` the HO-GSVD
    alignment matrix of all experts (``alignment.csv``, ``alignment.png``). Each output set
    gets a provenance sidecar. Returns the files by name."""
    import pandas as pd
    from tqdm import tqdm

    from submerge import spectral
    from submerge.io import hdf5
    from submerge.io.atomic import atomic_path
    from submerge.stages.common import record_provenance
    from submerge.stages.merge import merge_group, reconstruct

    if recipe.method.boost is None:
        raise ConfigError("config field method.boost: diagnose compares before and after "
                          "Subspace Boosting; the method needs a boost setting")
    sources = resolve_sources(recipe)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    experts = list(recipe.experts)
    inputs = [sources.base_file, *sources.expert_files.values()]
    files: dict[str, Path] = {}
    rows = []
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".submerge-diagnose-") as tmp:
        work = Path(tmp)
        _, _, tv_paths = task_vector_files(recipe, sources, work)
        for n in tqdm(range(1, len(experts) + 1), desc="experts added", unit="merge", disable=None):
            extra = _extra_inputs(recipe, experts[:n], tv_paths[:n], work, tag=f"-{n}")
            merged_path = work / f"merged-{n}.h5"
            merge_group(experts[:n], tv_paths[:n], recipe.method, merged_path, extra_paths=extra,
                        device=recipe.device)
            dense, factors, layer_info, _ = hdf5.read_factored(merged_path)
            for state, method, beta in (("before", _unboosted(recipe), None),
                                        ("after", recipe.method, recipe.beta)):
                delta = reconstruct({}, factors, layer_info, method, beta)
                for key in sorted(delta):
                    info = layer_info[key]
                    s = spectral.singular_values(delta[key])
                    rows.append({"n_experts": n, "expert_added": experts[n - 1], "key": key,
                                 "block": info.block, "kind": info.kind, "boosting": state,
                                 "stable_rank": spectral.stable_rank(s),
                                 "energy_rank": spectral.energy_rank(s, energy_frac)})
            merged_path.unlink()
        frame = pd.DataFrame(rows)
        files["csv"] = out_dir / "rank_collapse.csv"
        with atomic_path(files["csv"]) as path:
            frame.to_csv(path, index=False, float_format="%.6g")
        summary = (frame.groupby(["n_experts", "expert_added", "boosting"], sort=False)
                   [["stable_rank", "energy_rank"]].mean().unstack("boosting"))
        files["md"] = out_dir / "rank_collapse.md"
        _write_markdown(summary, files["md"], energy_frac, recipe)
        files["png"] = out_dir / "rank_collapse.png"
        _plot_curve(summary, files["png"], energy_frac)
        record_provenance([files["csv"], files["md"], files["png"]], inputs)
        if with_hogsvd:
            files.update(_alignment(experts, tv_paths, work, out_dir, recipe, inputs))
    return files


def _unboosted(recipe: MergeRecipe):
    """The recipe's method without boosting (Δ rebuilt from its SVD factors as it is)."""
    from dataclasses import replace

    return replace(recipe.method, boost=None)


def _write_markdown(summary, path: Path, energy_frac: float, recipe: MergeRecipe) -> None:
    from submerge.io.atomic import write_text_atomic

    energy = f"energy rank ({energy_frac:.0%})"
    lines = [f"Rank collapse of {recipe.method.label} (β = {recipe.beta:g}): mean over the boosted "
             "matrices of the merged task vector as experts are added.", "",
             f"| N | expert added | stable rank | stable rank + SB | {energy} | {energy} + SB |",
             "|--:|---|--:|--:|--:|--:|"]
    for (n, added), row in summary.iterrows():
        lines.append(f"| {n} | {added} | {row[('stable_rank', 'before')]:.2f} | "
                     f"{row[('stable_rank', 'after')]:.2f} | {row[('energy_rank', 'before')]:.1f} | "
                     f"{row[('energy_rank', 'after')]:.1f} |")
    write_text_atomic(path, "\n".join(lines) + "\n")


def _plot_curve(summary, path: Path, energy_frac: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from submerge.io.atomic import atomic_path

    n = [k[0] for k in summary.index]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, col, label in ((axes[0], "stable_rank", "mean stable rank"),
                           (axes[1], "energy_rank", f"mean energy rank ({energy_frac:.0%})")):
        ax.plot(n, summary[(col, "before")], "o-", label="merged")
        ax.plot(n, summary[(col, "after")], "s--", label="+ Subspace Boosting")
        ax.set_xlabel("experts merged")
        ax.set_ylabel(label)
        ax.set_xticks(n)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _alignment(experts, tv_paths, work: Path, out_dir: Path, recipe: MergeRecipe,
               inputs) -> dict[str, Path]:
    """The HO-GSVD alignment matrix (paper Eq. 7, mean over all matrices) of all experts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from submerge.io.atomic import atomic_path
    from submerge.stages.common import record_provenance
    from submerge.stages.report import hogsvd_summary
    from submerge.stages.spectra import hogsvd_group

    cache, summary_path = work / "hogsvd-all.h5", work / "hogsvd_summary.json"
    hogsvd_group(experts, tv_paths, cache, HOGSVDSettings(), recipe.device)
    hogsvd_summary(cache, tv_paths, "experts", summary_path)
    matrix = json.loads(summary_path.read_text(encoding="utf-8"))["alignment"]["mean"]
    csv, png = out_dir / "alignment.csv", out_dir / "alignment.png"
    with atomic_path(csv) as tmp:
        pd.DataFrame(matrix, index=experts, columns=experts).to_csv(tmp, float_format="%.6g")
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * len(experts), 1 + 0.5 * len(experts)))
    im = ax.imshow(matrix, cmap="viridis")
    ax.set_xticks(range(len(experts)), experts, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(experts)), experts, fontsize=8)
    fig.colorbar(im, ax=ax, label="alignment (HO-GSVD)")
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    record_provenance([csv, png], inputs)
    return {"alignment_csv": csv, "alignment_png": png}
