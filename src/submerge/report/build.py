"""The ``tables`` and ``figures`` jobs of ``workflow/rules/report.smk``: every entry of
:mod:`submerge.report.registry`, each with its provenance sidecar (no torch: the summaries of
the caches come from :mod:`submerge.stages.report`).

``inputs`` maps each report input (:data:`submerge.report.registry.INPUTS`) to its files, an
empty list where the config has none (no ``experiments.selection``); an entry whose input is
absent, or whose function finds nothing to show (ValueError), is still written, as a one-line
note (tables) or a figure stating why (figures), so that the outputs are always the same files.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd

from submerge.recipe import Recipe
from submerge.report import provenance, registry, tables

log = logging.getLogger(__name__)

PathLike = str | os.PathLike
Inputs = Mapping[str, Sequence[PathLike]]


# ------------------------------------------------------------------------------- inputs


def timing_frame(benchmarks: Sequence[PathLike], recipe: Recipe) -> pd.DataFrame:
    """Merging time per (group, method) from the ``merged`` rule's benchmark files
    (``benchmarks/{suite}/merged/{group}/{method}.tsv``; Snakemake's ``s`` and ``max_rss``
    columns), with the method's merge function."""
    rows = []
    for path in sorted(map(Path, benchmarks)):
        group, method = path.parent.name, path.stem
        bench = pd.read_csv(path, sep="\t")
        merge = recipe.methods[method].merge if method in recipe.methods else ""
        rows.append({"method": method, "group": group, "n_experts": len(recipe.groups.get(group, ())),
                     "merge": merge, "seconds": float(bench["s"].iloc[0]),
                     "max_rss_mb": float(pd.to_numeric(bench["max_rss"], errors="coerce").iloc[0])})
    return pd.DataFrame(rows, columns=list(tables.TIMING_COLUMNS))


def _csv(paths: Sequence[PathLike], recipe: Recipe) -> pd.DataFrame:
    return pd.read_csv(paths[0])


def _json(paths: Sequence[PathLike], recipe: Recipe) -> Any:
    return json.loads(Path(paths[0]).read_text(encoding="utf-8"))


# how each input of the registry is loaded: (its files, the recipe) -> what the functions get
LOADERS: dict[str, Callable[[Sequence[PathLike], Recipe], Any]] = {
    "scores": _csv,
    "selection": _csv,
    "benchmarks": timing_frame,
    "spectra_summary": _csv,
    "singular_values": _csv,
    "hogsvd_summary": _json,
    "table8": _csv,
    "decay_summary": _json,
}


class _Loaded:
    """The inputs, each loaded once on first use."""

    def __init__(self, inputs: Inputs, recipe: Recipe):
        self.files = {name: [Path(p) for p in inputs.get(name, ())] for name in registry.INPUTS}
        self.recipe = recipe
        self._cache: dict[str, Any] = {}

    def absent(self, names: Sequence[str]) -> list[str]:
        return [n for n in names if not self.files[n]]

    def __getitem__(self, name: str) -> Any:
        if name not in self._cache:
            self._cache[name] = LOADERS[name](self.files[name], self.recipe)
        return self._cache[name]

    def paths(self, names: Sequence[str]) -> list[Path]:
        return [p for n in names for p in self.files[n]]


def _why_absent(names: Sequence[str]) -> str:
    return "; ".join(registry.INPUTS[n].absent or f"no {n} input" for n in names)


# ------------------------------------------------------------------------------- tables


def _note(message: str) -> pd.DataFrame:
    """A table that states why there is nothing to show (one "note" cell)."""
    return pd.DataFrame(index=pd.Index([message], name="note"))


def build_tables(inputs: Inputs, recipe: Recipe, out_dir: PathLike, *,
                 config: Mapping[str, Any]) -> list[Path]:
    """Every table of :data:`~submerge.report.registry.TABLES` as CSV + Markdown + LaTeX in
    ``out_dir``, each with a sidecar recording its own inputs and ``config``."""
    out_dir = Path(out_dir)
    loaded = _Loaded(inputs, recipe)
    written: list[Path] = []
    for table in registry.TABLES.values():
        absent = loaded.absent(table.inputs)
        if absent:
            frame = _note(_why_absent(absent))
        else:
            try:
                frame = table.function()(*[loaded[n] for n in table.inputs], recipe)
            except ValueError as err:  # nothing to show for this suite's config
                log.warning("table %s: %s", table.name, err)
                frame = _note(str(err))
        paths = tables.write_table(frame, out_dir / table.name, caption=table.caption,
                                   label=f"tab:{table.name}")
        sidecar = provenance.write_sidecar(paths, loaded.paths(table.inputs), config=config)
        written += [*paths, sidecar]
    return written


# ------------------------------------------------------------------------------ figures


def _placeholder(stem: Path, message: str) -> list[Path]:
    """A figure that states why there is nothing to plot (the file set stays fixed)."""
    from matplotlib.figure import Figure

    from submerge.report import figures

    fig = Figure(figsize=(6, 1.5))
    fig.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    return figures.save_figure(fig, stem)


def build_figures(inputs: Inputs, recipe: Recipe, out_dir: PathLike, *,
                  config: Mapping[str, Any]) -> list[Path]:
    """Every figure of :data:`~submerge.report.registry.FIGURES` as PDF + PNG in ``out_dir``,
    each with a sidecar recording its own inputs and ``config``."""
    out_dir = Path(out_dir)
    logging.getLogger("fontTools").setLevel(logging.WARNING)  # PDF font subsetting, per glyph table
    loaded = _Loaded(inputs, recipe)
    written: list[Path] = []
    for figure in registry.FIGURES.values():
        stem = out_dir / figure.name
        absent = loaded.absent(figure.inputs)
        if absent:
            paths = _placeholder(stem, _why_absent(absent))
        else:
            try:
                paths = figure.function()(*[loaded[n] for n in figure.inputs], recipe, stem)
            except ValueError as err:  # nothing to show for this suite's config
                log.warning("figure %s: %s", figure.name, err)
                paths = _placeholder(stem, str(err))
        sidecar = provenance.write_sidecar(paths, loaded.paths(figure.inputs), config=config)
        written += [*paths, sidecar]
    return written


# ----------------------------------------------------------------------- the rules' side


def named_inputs(files) -> dict[str, list[str]]:
    """A Snakemake job's named inputs (``snakemake.input``) as name -> list of paths."""
    return {name: [value] if isinstance(value, (str, os.PathLike)) else [str(v) for v in value]
            for name, value in files.items()}


def check_outputs(written: Sequence[PathLike], declared: Sequence[PathLike]) -> None:
    """Every file written is one the rule declares, and the other way round (Snakemake only
    notices the second)."""
    w = {os.path.normpath(p) for p in written}
    d = {os.path.normpath(p) for p in declared}
    if w != d:
        raise RuntimeError(f"report outputs differ from the rule's: written but not declared "
                           f"{sorted(w - d)}, declared but not written {sorted(d - w)}")
