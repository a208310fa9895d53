"""The landing page of the HTML report (``snakemake --report``) and what keeps the report free
of a config wall of text.

Snakemake shows the workflow description (``report: "workflow/report/workflow.rst"`` in the
Snakefile) on the report's first page; that rst only includes ``overview.html``, written here
by the rule ``report_overview`` (``workflow/rules/report.smk``): what the suite is, what was
merged (groups, experts, methods with their grids), the main results table rendered inline,
and one line per section of the report (every table and figure of
:mod:`submerge.report.registry`, with the title of its caption, linked to it), so that a new
registry entry appears there without touching this module. The run's configuration is attached
as ``config.yaml`` (linked from the overview) instead of being printed under every result.

Imports neither pandas, matplotlib nor torch (``report.smk`` imports :class:`ConfigParam` while
Snakemake builds the DAG).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from html import escape
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence
from urllib.parse import quote

from submerge.report import registry
from submerge.report.provenance import SIDECAR_SUFFIX

OVERVIEW_DIR = "report"  # under the results root results/{suite}
OVERVIEW, CONFIG = "overview.html", "config.yaml"
CATEGORY = "About this run"  # the report's category of the two files above
MAIN_TABLE = "main_results"  # the table shown on the landing page
PAPER = "Subspace-Boosted Model Merging (Skorobogat et al., arXiv 2506.16506)"
PAPER_URL = "https://arxiv.org/abs/2506.16506"

PathLike = str | os.PathLike


class ConfigParam(dict):
    """The config a report job gets as a param: the dict itself for the job, for Snakemake's
    params record (``repr``) and for pickling into the script; but one line where Snakemake
    prints it (``str``: the report's "Job parameters" of every table and figure), naming the
    attached ``config.yaml`` and the config's hash instead of the whole config."""

    def digest(self) -> str:
        text = json.dumps(self, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def __str__(self) -> str:
        return f"<{CONFIG} (see '{CATEGORY}'), sha256 {self.digest()}>"


def overview_files(root: str) -> tuple[str, str, str]:
    """The overview, the attached config and their provenance sidecar under the results root
    ``root``."""
    d = f"{root}/{OVERVIEW_DIR}"
    return f"{d}/{OVERVIEW}", f"{d}/{CONFIG}", f"{d}/{OVERVIEW}{SIDECAR_SUFFIX}"


def target_files(root: str) -> list[str]:
    """Every file of the report rules under ``root``: the tables and figures of the registry,
    then the overview, the config and their sidecar."""
    return [*registry.target_files(root), *overview_files(root)]


# ------------------------------------------------------------------------------- captions

TITLE_MAX = 120
_JINJA = re.compile(r"\{\{.*?\}\}|\{%.*?%\}", re.S)
_RST = re.compile(r"``(.*?)``|\*\*(.*?)\*\*|\*(.*?)\*")


def caption_title(text: str) -> str:
    """The title of a caption (``workflow/report/<name>.rst``): its text up to the first colon
    or full stop outside brackets (Jinja and rst inline markup removed), e.g. "Main results
    (paper Table 1 shape)"; a longer one without its bracketed parts, then cut at a word to at
    most :data:`TITLE_MAX` characters."""
    text = _JINJA.sub("", text)
    text = _RST.sub(lambda m: next(g for g in m.groups() if g is not None), text)
    text = " ".join(text.split())
    depth, title = 0, text
    for i, ch in enumerate(text):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth = max(0, depth - 1)
        elif depth == 0 and (ch == ":" or ch == "." and (i + 1 == len(text) or text[i + 1] == " ")):
            title = text[:i]
            break
    if len(title) > TITLE_MAX:  # a long first sentence: without its brackets, then cut
        title = re.sub(r"\s*\([^()]*\)", "", title)
    if len(title) > TITLE_MAX:
        title = title[: title.rfind(" ", 0, TITLE_MAX - 1)] + " …"
    return title.strip()


# ------------------------------------------------------------------------------ overview


def _link_item(path: str) -> str:
    """A link that opens the report's item ``path`` (its key in the report's data)."""
    return f"javascript:app.showResultInfo('{quote(path, safe='/')}')"


def _link_category(name: str) -> str:
    return f"javascript:app.showCategory('{quote(name)}')"


def _code(text: Any) -> str:
    return f"<code>{escape(str(text))}</code>"


def _numbers(values: Sequence[Any]) -> str:
    return ", ".join("none" if v is None else f"{v:g}" for v in values)


def _method_rows(recipe) -> list[str]:
    rows = []
    for name, m in recipe.methods.items():
        parts = [escape(m.spec.label)]
        if m.hyper:
            parts.append(escape(", ".join(f"{k}={v}" for k, v in m.hyper.items())))
        if m.lines is not None:
            parts.append("LiNeS")
        if m.boost is not None:
            parts.append(f"Subspace Boosting ({escape(m.boost.layers)} layers, "
                         f"attention {escape(m.boost.attn_mode)})")
        betas = _numbers(m.betas) if m.boost is not None else "—"
        rows.append(f"<tr><th>{escape(m.label or name)}</th><td>{_code(name)}</td>"
                    f"<td>{' + '.join(parts)}</td><td>{_numbers(m.alphas)}</td>"
                    f"<td>{betas}</td><td>{escape(', '.join(m.groups))}</td></tr>")
    return rows


def _sections(root: str, captions: Mapping[str, str], config_path: str) -> list[str]:
    out = ["<ul>"]
    for category, entries, directory in (("Tables", registry.TABLES, registry.TABLES_DIR),
                                         ("Figures", registry.FIGURES, registry.FIGURES_DIR)):
        out.append(f'<li><a href="{_link_category(category)}"><b>{category}</b></a>'
                   f" ({len(entries)}):<ul>")
        for e in entries.values():
            title = caption_title(captions.get(e.name, "")) or e.name
            out.append(f'<li><a href="{_link_item(f"{root}/{directory}/{e.report_file}")}">'
                       f"{escape(title)}</a> {_code(e.name)}</li>")
        out.append("</ul></li>")
    out.append(f'<li><a href="{_link_category(CATEGORY)}"><b>{CATEGORY}</b></a>: this page and '
               f'the configuration these results were computed with, <a href="'
               f'{_link_item(config_path)}">{CONFIG}</a> (settings that change no result, '
               f"such as the device, left out).</li>")
    out.append("</ul>")
    return out


# the landing page's layout in Snakemake's report: the overview full width above the rule
# graph, from the top (the report centres and narrows its description otherwise)
LANDING_STYLE = """<style>
div.justify-center:has(#submerge-overview) { align-items: flex-start; justify-content: flex-start; }
div.gap-3:has(#submerge-overview) { flex-direction: column; }
div.prose:has(#submerge-overview) { max-width: 72rem; }
#submerge-overview { font-size: 14px; line-height: 1.45; color: #111; }
#submerge-overview h1 { font-size: 1.6em; margin: 0 0 0.4em 0; }
#submerge-overview h2 { font-size: 1.2em; margin: 1.1em 0 0.4em 0; }
#submerge-overview p, #submerge-overview li { margin: 0.3em 0; }
#submerge-overview ul { padding-left: 1.3em; list-style: disc; }
#submerge-overview a { color: #0b5cad; }
#submerge-overview code { font-size: 0.9em; background: #eef0f3; padding: 0 0.25em; }
#submerge-overview code::before, #submerge-overview code::after { content: none; }
#submerge-overview table.submerge-list td { text-align: left; }
</style>"""


def overview_html(recipe, root: str, main_table: str, captions: Mapping[str, str]) -> str:
    """The landing page (an HTML fragment) of the results root ``root`` ("results/<suite>",
    as the rules spell it): ``main_table`` is the main table's HTML (:func:`tables.to_html`),
    ``captions`` the caption text of each registry entry (name -> rst)."""
    suite = recipe.suite
    n_boosted = sum(m.boosted for m in recipe.methods.values())
    metric = recipe.eval.selection_metric
    config_path = overview_files(root)[1]
    groups = "".join(
        f"<tr><th>{escape(g)}</th><td>{len(members)}</td><td>{escape(', '.join(members))}</td></tr>"
        for g, members in recipe.groups.items())
    main_title = caption_title(captions.get(MAIN_TABLE, "")) or MAIN_TABLE
    parts = [
        LANDING_STYLE,
        '<div id="submerge-overview">',
        f"<h1>submerge report: suite {_code(suite.name)}</h1>",
        f'<p>A reproduction of <a href="{PAPER_URL}">{escape(PAPER)}</a>. Each expert is a '
        f"model finetuned from one base model ({_code(suite.adapter)}) on one task; a merge "
        "combines their task vectors (expert minus base) into one model. Every method below "
        "merges each group of experts at every point of its grid (the scaling coefficient α "
        "and, for Subspace Boosting, the threshold β); the point is chosen on the validation "
        f"split ({escape(metric)} accuracy averaged over the group's tasks) and the merged "
        "model at that point is evaluated once on the test split.</p>",
        f"<p>{len(recipe.experts)} experts, {len(recipe.groups)} groups, "
        f"{len(recipe.methods)} methods ({n_boosted} with Subspace Boosting). The navigation "
        "on the left lists every table and figure; each opens with its description and the "
        "job that made it.</p>",
        f"<h2>{escape(main_title)}</h2>",
        main_table,
        f'<p>(<a href="{_link_item(f"{root}/{registry.TABLES_DIR}/{MAIN_TABLE}.html")}">'
        "its full description</a>; — = no result.)</p>",
        "<h2>What was merged</h2>",
        '<table class="submerge-table submerge-list"><thead><tr><th class="index">group</th><th>N</th>'
        "<th>experts</th></tr></thead><tbody>" + groups + "</tbody></table>",
        '<table class="submerge-table submerge-list"><thead><tr><th class="index">method</th><th>name</th>'
        "<th>merge</th><th>α grid</th><th>β grid</th><th>groups</th></tr></thead><tbody>"
        + "".join(_method_rows(recipe)) + "</tbody></table>",
        "<h2>Sections of this report</h2>",
        *_sections(root, captions, config_path),
        "</div>",
    ]
    return "\n".join(parts) + "\n"


def config_yaml(config: Mapping[str, Any], root: str) -> str:
    """The attached configuration: ``config`` as YAML with a header saying what it is."""
    import yaml

    head = (f"# The configuration of {root} as the results depend on it (settings that change no\n"
            "# result, such as the device, left out): run with --configfile <this file>.\n")
    return head + yaml.safe_dump(json.loads(json.dumps(dict(config))), sort_keys=False,
                                 allow_unicode=True)


class CaptionTexts(ConfigParam):
    """name -> text of the entries' captions, as a job param: one line where Snakemake prints
    it (the report's "Job parameters"), the texts themselves for the job."""

    def __str__(self) -> str:
        return f"<{len(self)} captions of workflow/report/, sha256 {self.digest()}>"


def caption_texts(caption_files: Iterable[PathLike]) -> CaptionTexts:
    """name -> text of the entries' captions (``workflow/report/<name>.rst``): the rule gets
    them as a param, so that a fresh clone elsewhere (other paths, same texts) reruns nothing."""
    return CaptionTexts({Path(p).stem: Path(p).read_text(encoding="utf-8") for p in caption_files})


def write_overview(recipe, config: Mapping[str, Any], root: PathLike, main_table: PathLike,
                   captions: Mapping[str, str]) -> list[Path]:
    """Write ``overview.html`` and ``config.yaml`` under ``root``/report (atomically) and
    return their paths; ``captions``: :func:`caption_texts` of the entries."""
    from submerge.io.atomic import write_text_atomic

    root_text = Path(root).as_posix()
    html = overview_html(recipe, root_text, Path(main_table).read_text(encoding="utf-8"),
                         captions)
    paths = [Path(p) for p in overview_files(root_text)[:2]]
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(paths[0], html)
    write_text_atomic(paths[1], config_yaml(config, root_text))
    return paths
