"""The HTML report's landing page (submerge.report.landing): what the suite is, what was merged,
the main table, a linked line per registry entry; the config attached instead of printed."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

from report_utils import make_recipe, report_config
from submerge.report import landing, registry

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ROOT / "workflow" / "report"
METHODS = {"ta": {"merge": "task_arithmetic", "label": "Task Arithmetic"},
           "ta_sb": {"merge": "task_arithmetic", "boost": {}, "groups": ["g3"]}}
GROUPS = {"g2": ["cars", "dtd"], "g3": ["cars", "dtd", "eurosat"]}


def test_caption_titles():
    assert landing.caption_title("Main results (paper Table 1 shape): average **test** ...") \
        == "Main results (paper Table 1 shape)"
    assert landing.caption_title("HO-GSVD matrix (paper Eq. 7, Figs. 3/13) of ``g``: x. y") \
        == "HO-GSVD matrix (paper Eq. 7, Figs. 3/13) of g"
    assert landing.caption_title('Curves per method. Suite ``{{ snakemake.config["suite"] }}``: x') \
        == "Curves per method"
    # every entry of the registry has a short title (the landing page lists them)
    for e in [*registry.TABLES.values(), *registry.FIGURES.values()]:
        title = landing.caption_title((CAPTIONS / e.rst).read_text())
        assert 5 < len(title) <= 120 and "{" not in title and "``" not in title, (e.name, title)


def _overview(tmp_path):
    recipe = make_recipe(METHODS, GROUPS)
    main = '<table class="submerge-table"><tr><td>73.5</td></tr></table>'
    captions = {e.name: (CAPTIONS / e.rst).read_text()
                for e in [*registry.TABLES.values(), *registry.FIGURES.values()]}
    return recipe, landing.overview_html(recipe, "results/s", main, captions)


def test_overview_says_what_was_merged_and_links_every_section(tmp_path):
    recipe, html = _overview(tmp_path)
    assert "73.5" in html  # the main table, inline
    for g, members in GROUPS.items():
        assert f"<th>{g}</th><td>{len(members)}</td><td>{', '.join(members)}</td>" in html
    assert "Task Arithmetic" in html and "TA + Subspace Boosting" in html
    links = re.findall(r"javascript:app\.showResultInfo\('([^']*)'\)", html)
    expected = [f"results/s/tables/{t.report_file}" for t in registry.TABLES.values()]
    expected += [f"results/s/figures/{f.report_file}" for f in registry.FIGURES.values()]
    # every entry once in the sections list; the main table once more; the config
    assert sorted(set(links)) == sorted(set(expected) | {"results/s/report/config.yaml"})
    assert all(links.count(p) == 1 for p in expected if "main_results" not in p)
    assert "javascript:app.showCategory('Tables')" in html
    assert "javascript:app.showCategory('About%20this%20run')" in html
    assert html.count("<table") == 3 and "<script" not in html


def test_write_overview_and_config(tmp_path):
    cfg = report_config(METHODS, GROUPS)
    recipe = make_recipe(METHODS, GROUPS)
    main = tmp_path / "main_results.html"
    main.write_text("<table><tr><td>61.0</td></tr></table>")
    paths = landing.write_overview(recipe, cfg, tmp_path / "results" / "s", main,
                                   landing.caption_texts(CAPTIONS.glob("main_results.rst")))
    assert [p.name for p in paths] == ["overview.html", "config.yaml"]
    assert "61.0" in paths[0].read_text()
    import yaml

    assert yaml.safe_load(paths[1].read_text()) == json.loads(json.dumps(cfg))


def test_config_param_prints_one_line_and_is_the_config():
    cfg = report_config(METHODS, GROUPS)
    param = landing.ConfigParam(cfg)
    # Snakemake records params by repr (a change reruns the job) and passes them pickled
    assert repr(param) == repr(cfg) and param == cfg
    assert pickle.loads(pickle.dumps(param)) == cfg
    assert json.loads(json.dumps(param)) == json.loads(json.dumps(cfg))
    # the report prints f"{name}={value}": one line naming the attached file
    text = f"{param}"
    assert "\n" not in text and len(text) < 80 and landing.CONFIG in text
    assert "experts" not in text
    assert landing.ConfigParam({**cfg, "suite": "t"}).digest() != param.digest()
