"""The one list of the report's tables and figures (imports neither pandas, matplotlib nor
torch: ``workflow/rules/report.smk`` reads it while Snakemake builds the DAG).

Each entry names its function, the report inputs it reads (:data:`INPUTS`) and, for a table,
the caption of its Markdown/LaTeX; the caption of the HTML report is
``workflow/report/<name>.rst``. The rules ``tables`` and ``figures`` declare every file of
every entry (:attr:`Table.files`, :attr:`Figure.files`), :mod:`submerge.report.build` writes
them in this order, and ``tests/test_report_registry.py`` checks that the three agree.

* a table builder ``submerge.report.tables.<builder>(*inputs, recipe) -> DataFrame``
  (cells as described in :mod:`submerge.report.tables`);
* a figure function ``submerge.report.figures.<function>(*inputs, recipe, stem) -> [pdf, png]``;

where ``inputs`` are the loaded :data:`INPUTS` named by the entry, in its order, and ``recipe``
is the :class:`submerge.recipe.Recipe` of the run's config.

Adding a table or figure: the function, one :func:`_table`/:func:`_figure` line below and the
caption ``workflow/report/<name>.rst`` (see ``docs/extending.md``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from submerge.report.provenance import SIDECAR_SUFFIX


@dataclass(frozen=True)
class Input:
    """One input of the report: ``loader`` in :mod:`submerge.report.build` turns its files
    into what the functions get; ``absent`` says why a configuration has no such files."""

    name: str
    doc: str
    absent: str = ""


INPUTS: dict[str, Input] = {
    i.name: i
    for i in (
        Input("scores", "results/{suite}/scores.csv (pandas frame, submerge.report.tables.SCORE_COLUMNS)"),
        Input("selection", "results/{suite}/selection/selection.csv (pandas frame, SELECTION_COLUMNS)",
              absent="experiments.selection not configured"),
        Input("benchmarks", "the merged rule's benchmark files, one per (group, method) "
                            "(pandas frame, TIMING_COLUMNS)"),
        Input("spectra_summary", "results/{suite}/summaries/spectra_summary.csv: stable and "
                                 "energy rank per merged matrix (pandas frame)"),
        Input("singular_values", "results/{suite}/summaries/singular_values.csv: singular "
                                 "values per merged matrix, before/after boosting (pandas frame)"),
        Input("hogsvd_summary", "results/{suite}/summaries/hogsvd_summary.json: alignment "
                                "matrices and subspace importance of the largest group (dict)"),
        Input("table8", "results/{suite}/experiments/table8.csv: the β_attn × β_mlp grid "
                        "(pandas frame, submerge.stages.beta_grid.COLUMNS)",
              absent="experiments.table8 not configured"),
        Input("decay_summary", "results/{suite}/summaries/decay_summary.json: common and "
                               "unique parts of the mean of N task vectors (dict, "
                               "submerge.stages.decay.decay_summary)"),
    )
}


@dataclass(frozen=True)
class Table:
    name: str
    builder: str  # function of submerge.report.tables
    inputs: tuple[str, ...]
    caption: str  # title of the .md / .tex

    @property
    def files(self) -> tuple[str, ...]:
        """What the table writes: CSV, Markdown, LaTeX, HTML and the CSV's provenance sidecar."""
        csv = f"{self.name}.csv"
        return csv, f"{self.name}.md", f"{self.name}.tex", f"{self.name}.html", csv + SIDECAR_SUFFIX

    @property
    def report_file(self) -> str:
        """The file shown in the HTML report: the table as HTML (rendered inline)."""
        return f"{self.name}.html"

    @property
    def rst(self) -> str:
        return f"{self.name}.rst"

    def function(self) -> Callable:
        return getattr(importlib.import_module("submerge.report.tables"), self.builder)


@dataclass(frozen=True)
class Figure:
    name: str
    function_name: str  # function of submerge.report.figures
    inputs: tuple[str, ...]

    @property
    def files(self) -> tuple[str, ...]:
        """What the figure writes: PNG (the report's item), PDF and the provenance sidecar
        (named after the PDF, the first file the figure function returns)."""
        pdf = f"{self.name}.pdf"
        return f"{self.name}.png", pdf, pdf + SIDECAR_SUFFIX

    @property
    def report_file(self) -> str:
        """The file shown in the HTML report: the PNG."""
        return f"{self.name}.png"

    @property
    def rst(self) -> str:
        return f"{self.name}.rst"

    def function(self) -> Callable:
        return getattr(importlib.import_module("submerge.report.figures"), self.function_name)


TABLES: dict[str, Table] = {}
FIGURES: dict[str, Figure] = {}


def _check(name: str, inputs: tuple[str, ...]) -> None:
    if name in TABLES or name in FIGURES:
        raise ValueError(f"report entry {name!r} registered twice")
    unknown = [i for i in inputs if i not in INPUTS]
    if unknown:
        raise ValueError(f"report entry {name!r}: unknown inputs {unknown} (known: {list(INPUTS)})")


def _table(name: str, builder: str, inputs: tuple[str, ...], caption: str) -> None:
    _check(name, inputs)
    TABLES[name] = Table(name, builder, inputs, caption)


def _figure(name: str, function: str, inputs: tuple[str, ...]) -> None:
    _check(name, inputs)
    FIGURES[name] = Figure(name, function, inputs)


def inputs_of(entries) -> list[str]:
    """The inputs the given entries read, each once, in registry order."""
    used = {i for e in entries for i in e.inputs}
    return [i for i in INPUTS if i in used]


# --------------------------------------------------------- the rules' files (report.smk)

TABLES_DIR, FIGURES_DIR = "tables", "figures"  # under the results root results/{suite}


def target_files(root: str) -> list[str]:
    """Every file of every table and figure under the results root ``root``."""
    return ([f"{root}/{TABLES_DIR}/{f}" for t in TABLES.values() for f in t.files]
            + [f"{root}/{FIGURES_DIR}/{f}" for e in FIGURES.values() for f in e.files])


def rule_inputs(entries, files: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """The named inputs of the rule that writes ``entries`` (a registry dict): each input they
    read with its files (``files``: input name -> files, [] where the config has none)."""
    return {name: list(files[name]) for name in inputs_of(entries.values())}


def rule_outputs(entries, directory: str, report: Callable, *, caption_dir: str = "../report"
                 ) -> list:
    """Every file of ``entries`` (:data:`TABLES` or :data:`FIGURES`) in ``directory``; the
    report file of each (the table's HTML, the PNG) flagged with Snakemake's ``report`` and its
    caption (``caption_dir``: ``workflow/report`` relative to the rule file)."""
    kind, category = ("table", "Tables") if entries is TABLES else ("figure", "Figures")
    out = []
    for e in entries.values():
        out += [report(f"{directory}/{f}", caption=f"{caption_dir}/{e.rst}", category=category,
                       labels={kind: e.name}) if f == e.report_file else f"{directory}/{f}"
                for f in e.files]
    return out


# ------------------------------------------------------------------------------------ tables

_table("main_results", "main_results", ("scores",),
       "Average absolute and normalised test accuracy (%) per group; "
       "Δ = gain of Subspace Boosting over the same method without it.")
_table("sota_comparison", "sota_comparison", ("scores",),
       "TSV-M, Iso-C, Iso-CTS next to TA + LiNeS + SB (test accuracy, %).")
_table("beta_ablation", "beta_ablation", ("scores",),
       "Accuracy (%) per boosting threshold β (validation; test at the chosen point).")
_table("layer_ablation", "layer_ablation", ("scores",),
       "Accuracy (%) when boosting attention, MLP or both layer kinds.")
_table("per_task_accuracy", "per_task_accuracy", ("scores",),
       "Test accuracy (%) per task, method and group.")
_table("expert_selection", "expert_selection", ("selection",),
       "Expert selection: HO-GSVD alignment vs random draws (test accuracy, %).")
_table("merging_time", "timing_table", ("benchmarks",),
       "Wall time and peak memory of the merge job (Δ_merge + SVD cache) per method.")
_table("kind_beta_grid", "kind_beta_grid", ("table8",),
       "Table 8: β per layer kind (MLP, attention) of one boosted method on one group: "
       "validation score and test accuracy (%) of each pair at its α chosen on validation; "
       "✓ the pair chosen on validation; † a chosen value on the edge of its list.")

# ----------------------------------------------------------------------------------- figures

_figure("rank_collapse", "rank_collapse", ("spectra_summary",))
_figure("spectra", "spectra", ("singular_values",))
_figure("accuracy_vs_experts", "accuracy_vs_experts", ("scores",))
_figure("alpha_beta_heatmap", "alpha_beta_heatmap", ("scores",))
_figure("alignment_matrix", "alignment_heatmap", ("hogsvd_summary",))
_figure("subspace_importance", "subspace_importance", ("hogsvd_summary",))
_figure("proposition1", "proposition1", ("decay_summary",))
