"""The HTML report (``snakemake --report``) opened in a real browser, headless Chromium: the
landing page shows the main results table with the numbers of ``main_results.csv``, every table
is an HTML table inside the report, no figure is missing (each image decodes in the browser),
and the job parameters name the attached config instead of printing it.

The report is built by the project's Snakefile: the report rules (tables, figures, overview)
run on the synthetic inputs of test_report_registry.py in a temporary
working directory, then ``--report``; seconds, no torch job. Chromium is Debian's ``chromium``
package (tests/browser/setup.sh, run by ``make test``); without it this test skips, except under
``make test`` (SUBMERGE_REQUIRE_BROWSER=1), where it fails.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image as mpimg
import pandas as pd
import pytest

from report_utils import report_config
from submerge.recipe import EDGE_MARK
from submerge.report import landing, registry
# the synthetic inputs of every report input, and their methods and groups, of the report jobs'
# test: a new input or entry of the registry is covered here too
from test_report_registry import GROUPS, METHODS, _inputs
from workflow_utils import snakemake, write_config

R = "results/s"
REPORT_RULES = ("tables", "figures", "report_overview")


def chromium() -> str:
    for name in (os.environ.get("SUBMERGE_CHROMIUM"), "chromium", "chromium-browser"):
        if name and shutil.which(name):
            return shutil.which(name)
    why = "no chromium on PATH (bash tests/browser/setup.sh installs Debian's chromium)"
    if os.environ.get("SUBMERGE_REQUIRE_BROWSER") == "1":
        pytest.fail(why + "; make test requires it")
    pytest.skip(why)


def run_chromium(page: Path, profile: Path, *args: str) -> str:
    """Chromium headless on ``page``, after its scripts ran (virtual time), printing stdout."""
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--hide-scrollbars",
           "--virtual-time-budget=15000", *args, page.resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"{cmd}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(workdir, report.html): the report rules run on synthetic inputs, then --report."""
    chromium()  # no browser: skip or fail before building anything
    workdir = tmp_path_factory.mktemp("browser")
    (workdir / "inputs").mkdir()
    files = _inputs(workdir / "inputs", with_selection=False)
    places = {"scores": f"{R}/scores.csv",
              "spectra_summary": f"{R}/summaries/spectra_summary.csv",
              "singular_values": f"{R}/summaries/singular_values.csv",
              "hogsvd_summary": f"{R}/summaries/hogsvd_summary.json",
              "decay_summary": f"{R}/summaries/decay_summary.json"}
    for name, dest in places.items():
        (workdir / dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(files[name][0], workdir / dest)
    for path in map(Path, files["benchmarks"]):  # the merged rule's benchmark files
        dest = workdir / "benchmarks" / "s" / "merged" / path.parent.name / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dest)
    config = write_config(workdir, report_config(METHODS, GROUPS))
    targets = landing.target_files(R)
    snakemake(workdir, config, "--allowed-rules", *REPORT_RULES, "--", *targets, timeout=600)
    report = workdir / "report.html"
    snakemake(workdir, config, "--report", str(report), "--", *targets, timeout=600)
    return workdir, report


class _Tables(HTMLParser):
    """Every <table> of a page as rows of cell texts, and the id of its enclosing element."""

    def __init__(self):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.ids: list[str] = []
        self._open: list[str] = []
        self._cell: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""
        if attrs.get("id"):
            self.ids.append(attrs["id"])

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self.tables:
            self.tables[-1][-1].append(" ".join(self._cell.split()))
            self._cell = None


def _main_table(dom: str) -> list[list[str]]:
    """The main results table on the landing page (the one whose header starts "Method")."""
    start = dom.find('id="submerge-overview"')
    assert start >= 0, "the landing page does not show the overview"
    parser = _Tables()
    parser.feed(dom[start:])
    found = [t for t in parser.tables if t and t[-1] and any(r and r[0] == "Method" for r in t)]
    assert found, "no main results table on the landing page"
    return [r for r in found[0] if r]


def test_landing_page_shows_the_main_table(built, tmp_path):
    workdir, report = built
    dom = run_chromium(report, tmp_path / "profile", "--dump-dom")
    rows = _main_table(dom)
    csv = pd.read_csv(workdir / R / "tables" / "main_results.csv")
    top = [r for r in rows if r[0] == "Method"][0]  # "Method" spans the two header rows
    leaf = rows[rows.index(top) + 1]
    body = rows[rows.index(top) + 2:]
    assert [r[0] for r in body] == list(csv["Method"])
    # header: each group over its columns, then the columns (the CSV's "<group> <column>")
    assert top[1:] == list(dict.fromkeys(c.split(" ")[0] for c in csv.columns[1:]))
    assert leaf == [c.split(" ", 1)[1] for c in csv.columns[1:]]
    assert set(top[1:]) == set(GROUPS)
    checked = 0
    for row, (_, expected) in zip(body, csv.iterrows()):
        for cell, column in zip(row[1:], csv.columns[1:]):
            value = expected[column]
            if isinstance(value, float) and math.isnan(value):
                assert cell in ("", "—"), (row[0], column, cell)
                continue
            # a point on the edge of its grid is marked (recipe.EDGE_MARK) after the number
            number = cell.removesuffix(EDGE_MARK)
            assert abs(float(number) - float(value)) <= 0.05 + 1e-9, (row[0], column, cell, value)
            checked += 1
    assert checked >= 2 * len(csv)  # numbers, not only gaps
    # what was merged and a line per table and figure, linked
    text = re.sub(r"<[^>]+>", " ", dom)
    for g, members in GROUPS.items():
        assert ", ".join(members) in text
    for e in [*registry.TABLES.values(), *registry.FIGURES.values()]:
        assert f"{R}/" in dom and e.report_file in dom, e.name
    # no config wall of text anywhere on the page
    assert "example.org/head_a.pt" not in dom


# Appended to a copy of the report: every figure decoded as an <img> in the page (its natural
# size once loaded, -1 on error), every table's HTML decoded, written into the DOM as JSON.
CHECK = """<script>
window.addEventListener("load", function () {
  var out = {images: {}, tables: {}, params: {}}, pending = 0;
  function done() { var pre = document.createElement("pre"); pre.id = "submerge-check";
    pre.textContent = JSON.stringify(out); document.body.appendChild(pre); }
  Object.keys(results).forEach(function (path) {
    var r = results[path];
    out.params[path] = r.job_properties.params;
    if (r.mime_type.indexOf("image/") === 0) {
      pending += 1;
      var img = new Image();
      img.onload = function () { out.images[path] = [img.naturalWidth, img.naturalHeight];
        if (--pending === 0) done(); };
      img.onerror = function () { out.images[path] = [-1, -1]; if (--pending === 0) done(); };
      img.src = r.data_uri;
    } else if (r.mime_type === "text/html") {
      var b64 = r.data_uri.split("base64,")[1];
      out.tables[path] = new TextDecoder().decode(Uint8Array.from(atob(b64), function (c) {
        return c.charCodeAt(0); }));
    }
  });
  if (pending === 0) done();
});
</script>"""


def test_no_figure_is_missing_and_tables_are_html(built, tmp_path):
    workdir, report = built
    page = tmp_path / "report_checked.html"
    page.write_text(report.read_text(encoding="utf-8").replace("</body>", CHECK + "</body>"),
                    encoding="utf-8")
    dom = run_chromium(page, tmp_path / "profile", "--dump-dom")
    found = re.search(r'<pre id="submerge-check">(.*?)</pre>', dom, re.S)
    assert found, "the check script did not finish"
    out = json.loads(found.group(1).replace("&amp;", "&").replace("&lt;", "<")
                     .replace("&gt;", ">").replace("&quot;", '"'))
    figures = {f"{R}/figures/{f.report_file}" for f in registry.FIGURES.values()}
    assert set(out["images"]) == figures  # every figure, and only figures, as images
    for path, (width, height) in out["images"].items():
        png = mpimg.imread(workdir / path)
        assert (height, width) == png.shape[:2], path  # decoded by the browser, full size
    tables = {f"{R}/tables/{t.report_file}" for t in registry.TABLES.values()}
    assert tables <= set(out["tables"])  # every table as HTML shown in the report
    for path in tables:
        parser = _Tables()
        parser.feed(out["tables"][path])
        assert len(parser.tables) == 1 and len(parser.tables[0]) >= 2, path
    # the job parameters name the config file instead of printing the config
    for path, params in out["params"].items():
        assert "experts" not in params and len(params) < 400, (path, params[:200])
    config = f"{R}/report/{landing.CONFIG}"
    assert config in out["params"] and "example.org" not in "".join(out["params"].values())


def test_screenshot_of_the_landing_page(built, tmp_path):
    _, report = built
    shot = tmp_path / "landing.png"
    run_chromium(report, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1400,1000")
    img = mpimg.imread(shot)
    assert img.shape[:2] == (1000, 1400)
    # the overview is drawn: dark text on the white content area, right of the navigation
    content = img[60:700, 400:1000, :3].mean(axis=2)
    assert (content < 0.3).mean() > 0.01 and (content > 0.9).mean() > 0.3
