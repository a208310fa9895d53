"""Table builders checked cell by cell against an independent computation on hand-made
score frames (methods from the recipe), the validation choice shared with the test stage,
and the writer's three formats."""

from __future__ import annotations

import csv
from html.parser import HTMLParser
import math
import statistics
import zlib

import numpy as np
import pandas as pd
import pytest

from report_utils import make_recipe
from submerge.recipe import GridPoint, choose_point
from submerge.report import tables as T

METHODS = {
    "ta": {"merge": "task_arithmetic"},
    "ta_sb": {"merge": "task_arithmetic", "boost": {}},
    "ties": {"merge": "ties", "top_k_percent": 20},
    "ta_lines": {"merge": "task_arithmetic", "lines": {"protocol": "fixed_slope", "slope": 0.5}},
    "ta_lines_sb": {
        "merge": "task_arithmetic",
        "lines": {"protocol": "fixed_slope", "slope": 0.5},
        "boost": {},  # {} = boosted
        "label": "Ours",
    },
    "tsv": {"merge": "tsv_m"},  # configured, never scored
    "hosb": {"merge": "hogsvd", "boost": {}},  # boosted, no unboosted base configured
}
# "big" has 3 experts, "small" 2: column order must follow n_experts, not the name.
GROUP_TASKS = {"big": ["a", "b", "c"], "small": ["a", "b"]}
RECIPE = make_recipe(METHODS, GROUP_TASKS)
EXPERT = {"a": 0.9, "b": 0.8, "c": 0.5}
ZEROSHOT = {"a": 0.3, "b": 0.2, "c": 0.1}


def _acc(group, method, alpha, beta, split, task):
    """Deterministic, distinct accuracy per row (no structure a bug could hide behind)."""
    h = (zlib.crc32(repr((group, method, alpha, beta, split, task)).encode()) % 1000) / 1000.0
    return round(0.3 + 0.6 * h, 4)


def make_scores(skip=()):
    rows = []
    for g, tasks in GROUP_TASKS.items():
        for m, meta in METHODS.items():
            if m == "tsv" or (g, m) in skip:
                continue
            betas = [0.0, 0.01] if "boost" in meta else [math.nan]
            for a in (0.5, 1.0):
                for b in betas:
                    for t in tasks:
                        rows.append(
                            dict(
                                suite="s",
                                group=g,
                                n_experts=len(tasks),
                                method=m,
                                alpha=a,
                                beta=b,
                                split="val",
                                task=t,
                                accuracy=_acc(g, m, a, b, "val", t),
                                expert_accuracy=EXPERT[t],
                                zeroshot_accuracy=ZEROSHOT[t],
                            )
                        )
    val = pd.DataFrame(rows)
    # chosen point per (group, method): max mean of acc/expert on val — computed by hand
    test_rows = []
    for (g, m), sub in val.groupby(["group", "method"], sort=False):
        best, best_key = -1.0, None
        for key, pt in sub.groupby(["alpha", "beta"], dropna=False, sort=False):
            score = sum(r.accuracy / r.expert_accuracy for r in pt.itertuples()) / len(pt)
            if score > best:
                best, best_key = score, key
        a, b = best_key
        for t in GROUP_TASKS[g]:
            test_rows.append(
                dict(
                    suite="s",
                    group=g,
                    n_experts=len(GROUP_TASKS[g]),
                    method=m,
                    alpha=a,
                    beta=b,
                    split="test",
                    task=t,
                    accuracy=_acc(g, m, a, b, "test", t),
                    expert_accuracy=EXPERT[t],
                    zeroshot_accuracy=ZEROSHOT[t],
                )
            )
    return pd.concat([val, pd.DataFrame(test_rows)], ignore_index=True)


def expected_test(scores, group, method):
    rows = [
        r
        for r in scores.itertuples()
        if r.group == group and r.method == method and r.split == "test"
    ]
    acc = 100 * sum(r.accuracy for r in rows) / len(rows)
    norm = 100 * sum(r.accuracy / r.expert_accuracy for r in rows) / len(rows)
    return acc, norm


@pytest.fixture(scope="module")
def scores():
    return make_scores()


def test_main_results_cells(scores):
    table = T.main_results(scores, RECIPE)
    labels = T.method_labels(RECIPE.methods)
    assert list(table.index) == ["Zero-shot", "Finetuned"] + [labels[m] for m in METHODS]
    assert labels["ta_lines_sb"] == "Ours" and labels["ta_sb"] == "TA + SB"
    assert [c[0] for c in table.columns[::4]] == ["small", "big"]
    assert [c[1] for c in table.columns[:4]] == ["Acc", "Norm", "ΔAcc", "ΔNorm"]
    for g, tasks in GROUP_TASKS.items():
        zs = 100 * sum(ZEROSHOT[t] for t in tasks) / len(tasks)
        zs_norm = 100 * sum(ZEROSHOT[t] / EXPERT[t] for t in tasks) / len(tasks)
        ft = 100 * sum(EXPERT[t] for t in tasks) / len(tasks)
        assert table.loc["Zero-shot", (g, "Acc")] == pytest.approx(zs)
        assert table.loc["Zero-shot", (g, "Norm")] == pytest.approx(zs_norm)
        assert table.loc["Finetuned", (g, "Acc")] == pytest.approx(ft)
        assert table.loc["Finetuned", (g, "Norm")] == pytest.approx(100.0)
        for m in ("ta", "ta_sb", "ties", "ta_lines", "ta_lines_sb", "hosb"):
            acc, norm = expected_test(scores, g, m)
            assert table.loc[labels[m], (g, "Acc")] == pytest.approx(acc)
            assert table.loc[labels[m], (g, "Norm")] == pytest.approx(norm)
        # Δ of a boosted method against its own base (TA+SB vs TA, TA+LiNeS+SB vs TA+LiNeS)
        for boosted, base in (("ta_sb", "ta"), ("ta_lines_sb", "ta_lines")):
            acc_b, norm_b = expected_test(scores, g, boosted)
            acc_0, norm_0 = expected_test(scores, g, base)
            assert table.loc[labels[boosted], (g, "ΔAcc")] == pytest.approx(acc_b - acc_0)
            assert table.loc[labels[boosted], (g, "ΔNorm")] == pytest.approx(norm_b - norm_0)
        # not applicable for unboosted and reference rows
        for row in ("Zero-shot", "Finetuned", "TA", "TIES", "TA + LiNeS", "HO-GSVD + SB"):
            assert table.loc[row, (g, "ΔAcc")] == T.NA
        # configured but never scored: an explicit gap, not a zero
        assert math.isnan(table.loc["TSV-M", (g, "Acc")])


def test_missing_method_group_and_task_are_gaps(scores):
    partial = make_scores(skip={("big", "ties"), ("small", "ta")})
    # drop one task of one method: its average must not be over fewer tasks
    drop = (
        (partial["group"] == "big")
        & (partial["method"] == "ta")
        & (partial["task"] == "c")
        & (partial["split"] == "test")
    )
    partial = partial.loc[~drop]
    groups = {"small": ["a", "b"], "big": ["a", "b", "c"], "huge": list("abcdefgh")}
    table = T.main_results(partial, make_recipe(METHODS, groups))
    assert [c[0] for c in table.columns[::4]] == ["small", "big", "huge"]
    assert math.isnan(table.loc["TIES", ("big", "Acc")])
    assert not math.isnan(table.loc["TIES", ("small", "Acc")])
    assert math.isnan(table.loc["TA", ("small", "Norm")])
    assert math.isnan(table.loc["TA + SB", ("small", "ΔAcc")])  # base missing → gap
    assert math.isnan(table.loc["TA", ("big", "Acc")])  # 2 of 3 tasks → gap
    assert all(math.isnan(v) for v in table.loc["TA + SB", "huge"].iloc[:2])
    md = T.to_markdown(table)
    assert T.GAP in md
    # the Markdown row of TIES shows the gap in the "big" columns
    ties_row = next(line for line in md.splitlines() if line.startswith("| TIES |"))
    assert ties_row.split(" | ")[5] == T.GAP


def test_bad_scores_raise(scores):
    with pytest.raises(ValueError, match="fraction"):
        T.main_results(scores.assign(accuracy=scores["accuracy"] * 100), RECIPE)
    with pytest.raises(ValueError, match="lacks column"):
        T.main_results(scores.drop(columns="expert_accuracy"), RECIPE)
    # two test grid points for one (group, method)
    extra = scores.loc[(scores["split"] == "test") & (scores["method"] == "ta")].assign(alpha=0.123)
    with pytest.raises(ValueError, match="several grid points"):
        T.main_results(pd.concat([scores, extra]), RECIPE)


def test_base_method_and_labels():
    methods = make_recipe({
        "ta": {"merge": "task_arithmetic", "alpha": [0.1, 0.2]},
        "ties": {"merge": "ties", "top_k_percent": 20},
        "ties_sb": {"merge": "ties", "boost": {}},  # the default top_k_percent is 20
        "ties10_sb": {"merge": "ties", "top_k_percent": 10, "boost": {}},
        "sb_attn": {"merge": "task_arithmetic", "boost": {"layers": "attn"}, "groups": ["g"]},
        "sb_mlp": {"merge": "task_arithmetic", "boost": {"layers": "mlp"}},
        "ta_lines_sb": {"merge": "task_arithmetic", "lines": {}, "boost": {}},
    }, {"g": ["a", "b"], "h": ["a"]}).methods
    assert T.base_method("ties_sb", methods) == "ties"
    assert T.base_method("ties10_sb", methods) is None  # different top_k_percent: not its base
    assert T.base_method("sb_attn", methods) == "ta"  # grid and groups do not matter
    assert T.base_method("ta_lines_sb", methods) is None  # LiNeS does
    assert T.base_method("ta", methods) is None
    labels = T.method_labels(methods)
    assert labels["sb_attn"] == "TA + SB (sb_attn)" and labels["sb_mlp"] == "TA + SB (sb_mlp)"
    assert labels["ties_sb"] == "TIES + SB (ties_sb)"
    assert labels["ta"] == "TA" and labels["ta_lines_sb"] == "TA + LiNeS + SB"


def test_sota_comparison(scores):
    recipe = make_recipe({**METHODS, "isoc": {"merge": "iso_c"}}, GROUP_TASKS)
    table = T.sota_comparison(scores, recipe)
    assert list(table.index) == ["Finetuned", "TSV-M", "Iso-C", "Iso-CTS", "Ours"]
    acc, _ = expected_test(scores, "big", "ta_lines_sb")
    assert table.loc["Ours", ("big", "Acc")] == pytest.approx(acc)
    assert math.isnan(table.loc["Iso-CTS", ("big", "Acc")])  # not configured: gap row
    assert math.isnan(table.loc["Iso-C", ("small", "Acc")])  # configured, not scored


def test_beta_ablation(scores):
    table = T.beta_ablation(scores, RECIPE)
    assert list(table.index) == [
        ("TA + SB", 0.0),
        ("TA + SB", 0.01),
        ("Ours", 0.0),
        ("Ours", 0.01),
        ("HO-GSVD + SB", 0.0),
        ("HO-GSVD + SB", 0.01),
    ]
    for m, label in (("ta_sb", "TA + SB"), ("ta_lines_sb", "Ours"), ("hosb", "HO-GSVD + SB")):
        for g in GROUP_TASKS:
            chosen_beta = float(
                scores.loc[
                    (scores.split == "test") & (scores.method == m) & (scores.group == g), "beta"
                ].iloc[0]
            )
            for b in (0.0, 0.01):
                val = scores.loc[
                    (scores.split == "val")
                    & (scores.method == m)
                    & (scores.group == g)
                    & (scores.beta == b)
                ]
                by_alpha = {
                    a: (np.mean(sub.accuracy / sub.expert_accuracy), np.mean(sub.accuracy))
                    for a, sub in val.groupby("alpha")
                }
                best_alpha = max(by_alpha, key=lambda a: by_alpha[a][0])
                assert table.loc[(label, b), (g, "val")] == pytest.approx(
                    100 * by_alpha[best_alpha][1]
                )
                cell = table.loc[(label, b), (g, "test")]
                if b == chosen_beta:
                    assert cell == pytest.approx(expected_test(scores, g, m)[0])
                else:
                    assert math.isnan(cell)
    # selecting α by absolute accuracy (eval.selection_metric: absolute) reports the max acc
    by_acc = T.beta_ablation(scores, make_recipe(METHODS, GROUP_TASKS, metric="absolute"))
    val = scores.loc[
        (scores.split == "val")
        & (scores.method == "ta_sb")
        & (scores.group == "big")
        & (scores.beta == 0.01)
    ]
    assert by_acc.loc[("TA + SB", 0.01), ("big", "val")] == pytest.approx(
        100 * max(sub.accuracy.mean() for _, sub in val.groupby("alpha"))
    )
    with pytest.raises(ValueError, match="selection_metric"):
        T.best_on_val(scores, "f1")


def test_layer_ablation():
    methods = {
        "ta": {"merge": "task_arithmetic"},
        "sb_attn": {"merge": "task_arithmetic", "boost": {"layers": "attn"}, "label": "A"},
        "sb_mlp": {"merge": "task_arithmetic", "boost": {"layers": "mlp"}},
        "sb_both": {"merge": "task_arithmetic", "boost": {}},
        "sb_full": {"merge": "task_arithmetic", "boost": {"attn_mode": "full"}},  # another family
    }
    rows = []
    for m, acc in (("ta", 0.5), ("sb_attn", 0.6), ("sb_mlp", 0.7), ("sb_both", 0.8)):
        for split, a in (("val", 0.5), ("val", 1.0), ("test", 1.0)):
            for t in ("a", "b"):
                v = acc + (0.05 if a == 1.0 else 0) + (0.01 if split == "test" else 0)
                rows.append(
                    dict(
                        group="g",
                        n_experts=2,
                        method=m,
                        alpha=a,
                        beta=0.0 if m != "ta" else math.nan,
                        split=split,
                        task=t,
                        accuracy=v,
                        expert_accuracy=0.9,
                        zeroshot_accuracy=0.1,
                    )
                )
    table = T.layer_ablation(pd.DataFrame(rows), make_recipe(methods, {"g": ["a", "b"]}))
    assert list(table.index) == [("TA + SB", "attn"), ("TA + SB", "mlp"), ("TA + SB", "both")]
    assert table.loc[("TA + SB", "mlp"), ("g", "val")] == pytest.approx(75.0)
    assert table.loc[("TA + SB", "both"), ("g", "test")] == pytest.approx(86.0)
    only_ta = make_recipe({"ta": methods["ta"]}, {"g": ["a", "b"]})
    assert len(T.layer_ablation(pd.DataFrame(rows), only_ta)) == 0


def test_per_task_accuracy(scores):
    table = T.per_task_accuracy(scores, RECIPE, group="big")
    assert list(table.index) == ["a", "b", "c", "Average"]
    for t in ("a", "b", "c"):
        row = scores.loc[
            (scores.split == "test")
            & (scores.group == "big")
            & (scores.task == t)
            & (scores.method == "ties")
        ]
        assert table.loc[t, "TIES"] == pytest.approx(100 * row.accuracy.iloc[0])
        assert table.loc[t, "Finetuned"] == pytest.approx(100 * EXPERT[t])
        assert table.loc[t, "Zero-shot"] == pytest.approx(100 * ZEROSHOT[t])
    assert table.loc["Average", "TIES"] == pytest.approx(expected_test(scores, "big", "ties")[0])
    assert table["TSV-M"].isna().all()
    both = T.per_task_accuracy(scores, RECIPE)
    assert list(both.index.get_level_values(0).unique()) == ["small", "big"]
    with pytest.raises(ValueError, match="group 'nope'"):
        T.per_task_accuracy(scores, RECIPE, group="nope")


def test_expert_selection():
    rows = []
    accs = {
        "random": {0: (0.70, 0.40), 1: (0.74, 0.46), 2: (0.75, 0.50)},
        "hogsvd": {math.nan: (0.80, 0.45)},
    }  # a single HO-GSVD selection may have no draw id
    for setting, draws in accs.items():
        for d, (pool, ext) in draws.items():
            for t, tset, base in (
                ("p1", "pool", pool),
                ("p2", "pool", pool + 0.02),
                ("e1", "ext", ext),
            ):
                rows.append(
                    dict(
                        setting=setting, draw=d, split="test", task=t, task_set=tset, accuracy=base
                    )
                )
            rows.append(
                dict(setting=setting, draw=d, split="val", task="p1", task_set="pool", accuracy=0.0)
            )
    table = T.expert_selection(pd.DataFrame(rows))
    assert list(table.index) == ["Random (3 draws)", "HO-GSVD (1 draw)", "HO-GSVD − Random"]
    pool_means = [100 * (p + p + 0.02) / 2 for p, _ in accs["random"].values()]
    assert table.loc["Random (3 draws)", ("Pool", "mean")] == pytest.approx(
        statistics.mean(pool_means)
    )
    assert table.loc["Random (3 draws)", ("Pool", "std")] == pytest.approx(
        statistics.stdev(pool_means)
    )
    ext = [100 * e for _, e in accs["random"].values()]
    assert table.loc["Random (3 draws)", ("Ext", "std")] == pytest.approx(statistics.stdev(ext))
    assert table.loc["HO-GSVD (1 draw)", ("Pool", "mean")] == pytest.approx(81.0)
    assert table.loc["HO-GSVD (1 draw)", ("Pool", "std")] == T.NA
    # 95% t-interval over the 3 draws: t_{0.975,2} = 4.303
    half = 4.303 * statistics.stdev(pool_means) / math.sqrt(3)
    assert table.loc["Random (3 draws)", ("Pool", "±95% CI")] == pytest.approx(half)
    diff = table.loc["HO-GSVD − Random"]
    assert diff[("Pool", "mean")] == pytest.approx(81.0 - statistics.mean(pool_means))
    assert diff[("Pool", "±95% CI")] == pytest.approx(half)


def test_timing_table(tmp_path):
    from submerge.report.build import timing_frame

    groups = {"g8": [f"e{i}" for i in range(8)], "g4": [f"e{i}" for i in range(4)]}
    recipe = make_recipe({"ta": METHODS["ta"], "ta_sb": METHODS["ta_sb"]}, groups)
    timing = pd.DataFrame(
        [
            dict(method="ta", group="g8", n_experts=8, merge="task_arithmetic", seconds=1.0,
                 max_rss_mb=100.0),
            dict(method="ta", group="g8", n_experts=8, merge="task_arithmetic", seconds=3.0,
                 max_rss_mb=120.0),
            dict(method="ta_sb", group="g8", n_experts=8, merge="task_arithmetic", seconds=7.0,
                 max_rss_mb=300.0),
            dict(method="ta_sb", group="g4", n_experts=4, merge="task_arithmetic", seconds=0.5,
                 max_rss_mb=50.0),
            dict(method="other", group="g4", n_experts=4, merge="ties", seconds=9.0, max_rss_mb=9.0),
        ]
    )
    assert list(timing.columns) == list(T.TIMING_COLUMNS)
    table = T.timing_table(timing, recipe)
    assert list(table.index) == ["TA", "TA + SB"]
    assert [c[0] for c in table.columns[::2]] == ["g4", "g8"]
    assert table.loc["TA", ("g8", "Time (s)")] == pytest.approx(2.0)  # mean of repeats
    assert table.loc["TA", ("g8", "Max RSS (MB)")] == pytest.approx(110.0)
    assert table.loc["TA + SB", ("g8", "Time (s)")] == pytest.approx(7.0)
    assert table.loc["TA + SB", ("g8", "Max RSS (MB)")] == pytest.approx(300.0)
    assert math.isnan(table.loc["TA", ("g4", "Time (s)")])
    # from the merged rule's benchmark files (benchmarks/{suite}/merged/{group}/{method}.tsv)
    paths = []
    for g, m, sec in (("g8", "ta", 1.5), ("g4", "ta_sb", 0.25)):
        path = tmp_path / g / f"{m}.tsv"
        path.parent.mkdir(exist_ok=True)
        path.write_text("s\th:m:s\tmax_rss\n%s\t0:00:01\t12.5\n" % sec)
        paths.append(path)
    frame = timing_frame(paths, recipe)
    assert list(frame.columns) == list(T.TIMING_COLUMNS)
    assert frame.set_index(["group", "method"]).loc[("g4", "ta_sb"), "n_experts"] == 4
    assert set(frame["merge"]) == {"task_arithmetic"}
    assert T.timing_table(frame, recipe).loc["TA", ("g8", "Time (s)")] == pytest.approx(1.5)


def test_format_cell():
    assert T.format_cell(-0.04, 1) == "0.0"
    assert T.format_cell(-0.04, 1, signed=True) == "+0.0"
    assert T.format_cell(2.5, 2, signed=True) == "+2.50"
    assert T.format_cell(3, 2) == "3"
    assert T.format_cell(-1.25, 1, signed=True) == "-1.2"  # round half to even of the binary value
    assert T.format_cell(math.nan, 1) == T.GAP
    assert T.format_cell("", 1) == ""
    assert T.format_cell("x", 1) == "x"


def test_write_table_formats(tmp_path, scores):
    table = T.main_results(scores, RECIPE)
    paths = T.write_table(table, tmp_path / "main", caption="Main results (%)", label="tab:main")
    assert [p.name for p in paths] == ["main.csv", "main.md", "main.tex", "main.html"]
    tex = paths[2].read_text()
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert tex.count(rule) == 1
    assert r"\multicolumn{4}{c}{small}" in tex and r"\cmidrule(lr){2-5}" in tex
    assert r"$\Delta$Acc" in tex and "---" in tex and r"Main results (\%)" in tex
    body = tex.split(r"\midrule")[1].split(r"\bottomrule")[0].strip().splitlines()
    assert len(body) == len(table)
    assert all(line.count("&") == len(table.columns) for line in body)
    md = paths[1].read_text().splitlines()
    notes = table.attrs.get("notes") or []  # footnotes after a blank line
    assert md[2].startswith("| Method | small Acc")
    assert len(md) == 4 + len(table) + (1 + len(notes) if notes else 0)
    with open(paths[0], newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0][:3] == ["Method", "small Acc", "small Norm"]
    by_label = {r[0]: r for r in rows[1:]}
    acc, _ = expected_test(scores, "small", "ta_sb")
    assert float(by_label["TA + SB"][1]) == pytest.approx(acc, abs=1e-4)
    assert by_label["TA + SB"][3].startswith(("+", "-"))
    assert by_label["TSV-M"][1] == "" and by_label["TA"][3] == ""
    # deterministic bytes
    first = [p.read_bytes() for p in paths]
    T.write_table(table, tmp_path / "main", caption="Main results (%)", label="tab:main")
    assert [p.read_bytes() for p in paths] == first


class _Cells(HTMLParser):
    """The rows of an HTML table: each a list of (tag, text, colspan)."""

    def __init__(self):
        super().__init__()
        self.rows, self.tables, self._cell = [], 0, None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables += 1
        elif tag == "tr":
            self.rows.append([])
        elif tag in ("th", "td"):
            self._cell = [tag, "", int(dict(attrs).get("colspan", 1))]

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1] += data

    def handle_endtag(self, tag):
        if tag in ("th", "td") and self._cell is not None:
            self.rows[-1].append(tuple(self._cell))
            self._cell = None


def test_html_table_has_the_markdown_cells(tmp_path, scores):
    """The report's HTML table: one table, a header row per column level (the group spanning
    its four columns), then the same cells as the Markdown table, escaped."""
    table = T.main_results(scores, RECIPE)
    paths = T.write_table(table, tmp_path / "main", caption="Main results <%>")
    html = paths[3].read_text()
    assert "<script" not in html and "Main results &lt;%&gt;" in html
    parsed = _Cells()
    parsed.feed(html)
    assert parsed.tables == 1
    top, leaf, *body = parsed.rows
    assert [(t, c) for t, _, c in top] == [("th", 1)] + [("th", 4)] * 2  # small, big
    assert [text for _, text, _ in top[1:]] == ["small", "big"]
    assert [text for _, text, _ in leaf] == ["Acc", "Norm", "ΔAcc", "ΔNorm"] * 2
    md_rows = [[c.strip() for c in line.strip("|").split(" | ")]
               for line in paths[1].read_text().splitlines()[4:] if line.startswith("|")]
    assert [[text for _, text, _ in row] for row in body] == md_rows
    assert all(row[0][0] == "th" and {t for t, _, _ in row[1:]} == {"td"} for row in body)
    # a one-level header: one row of column names; a gap is "—"
    flat = pd.DataFrame({"acc": [1.25, math.nan]}, index=pd.Index(["x", "y"], name="k"))
    parsed = _Cells()
    parsed.feed(T.write_table(flat, tmp_path / "flat")[3].read_text())
    assert parsed.rows == [[("th", "k", 1), ("th", "acc", 1)], [("th", "x", 1), ("td", "1.2", 1)],
                           [("th", "y", 1), ("td", T.GAP, 1)]]


def test_write_table_multiindex_rows_and_decimals(tmp_path, scores):
    table = T.beta_ablation(scores, RECIPE)
    paths = T.write_table(table, tmp_path / "beta", decimals={"val": 2, "*": 1})
    md = paths[1].read_text().splitlines()
    assert md[0].startswith("| Method | β | small val")
    assert md[2].startswith("| TA + SB | 0.00 |") and md[3].startswith("|  | 0.01 |")
    val_cell = md[2].split(" | ")[2]
    assert len(val_cell.split(".")[1]) == 2
    assert r"$\beta$" in paths[2].read_text()
    empty = T.write_table(T.layer_ablation(scores, RECIPE), tmp_path / "empty")
    assert r"\bottomrule" in empty[2].read_text()


def test_validation_only_scores_give_gaps(scores):
    val_only = scores.loc[scores["split"] == "val"]
    assert T.grid_summary(val_only, "test").empty
    table = T.main_results(val_only, RECIPE)
    assert math.isnan(table.loc["TA", ("big", "Acc")])
    assert math.isnan(table.loc["Finetuned", ("small", "Acc")])
    with pytest.raises(ValueError, match="empty"):
        T.main_results(scores.iloc[:0], RECIPE)


# ------------------------------------------- the tables choose the point the test stage chose

EXPERT_VAL = {"a": 0.912345678, "b": 0.8, "c": 0.7654321}  # more digits than scores.csv keeps
EXPERT_TEST = {"a": 0.9, "b": 0.85, "c": 0.75}


def _tied_grids():
    """Grid JSON-like dicts (what a sweep writes per point) with ties: exact, and ties that only
    appear at SCORE_DIGITS (differences below the 6th significant digit)."""
    near = 1e-9  # lost when scores.csv is written with %.6g; choose_point ignores it too

    def acc(base, bump=0.0):
        return {"a": base + bump, "b": base - 0.1, "c": base - 0.2}

    grids = {
        # unboosted: α 0.2 is better by 1e-9 at full precision, a tie at 6 digits → smaller α
        "ta": {(0.4, None): acc(0.7), (0.2, None): acc(0.8, near), (0.1, None): acc(0.8)},
        # boosted: (0.5, 0.01) and (1.0, 0.0) tie → smaller α wins over smaller β
        "ta_sb": {(0.5, 0.0): acc(0.6), (0.5, 0.01): acc(0.9), (1.0, 0.0): acc(0.9),
                  (1.0, 0.01): acc(0.9, -near)},
        # boosted: a tie between two β at one α → smaller β
        "ties_sb": {(0.5, 0.02): acc(0.75), (0.5, 0.0): acc(0.75, near), (1.0, 0.02): acc(0.5)},
    }
    return {m: [{"group": "g", "method": m, "alpha": a, "beta": b, "split": "val", "accuracy": acc_}
                for (a, b), acc_ in points.items()]
            for m, points in grids.items()}


def _scores_csv(grids, chosen, path):
    rows = []
    for m, grid in grids.items():
        points = [(p, "val", p["accuracy"]) for p in grid]
        a, b = chosen[m]
        points.append(({"alpha": a, "beta": b}, "test", {t: 0.5 for t in EXPERT_TEST}))
        for p, split, accuracy in points:
            for task, value in accuracy.items():
                ref = EXPERT_VAL if split == "val" else EXPERT_TEST
                rows.append(dict(suite="s", group="g", n_experts=3, method=m, alpha=p["alpha"],
                                 beta=math.nan if p["beta"] is None else p["beta"], split=split,
                                 task=task, accuracy=value, expert_accuracy=ref[task],
                                 zeroshot_accuracy=0.1))
    pd.DataFrame(rows).to_csv(path, index=False, float_format="%.6g")
    return pd.read_csv(path)


@pytest.mark.parametrize("metric", ["normalized", "absolute"])
def test_tables_choose_the_point_the_test_stage_chose(tmp_path, metric):
    grids = _tied_grids()
    chosen = {}
    for m, grid in grids.items():  # as the test stage does, from the grid files
        point, _ = choose_point([(GridPoint(p["alpha"], p["beta"]), p["accuracy"]) for p in grid],
                                dict(EXPERT_VAL), metric)
        chosen[m] = (point.alpha, point.beta)
    assert chosen == {"ta": (0.1, None), "ta_sb": (0.5, 0.01), "ties_sb": (0.5, 0.0)}
    scores = _scores_csv(grids, chosen, tmp_path / "scores.csv")
    best = T.best_on_val(scores, metric)
    got = {r.method: (r.alpha, None if math.isnan(r.beta) else r.beta) for r in best.itertuples()}
    assert got == chosen
    # per β (the β ablation's val column): the same function restricted to that β's points
    per_beta = T.best_on_val(scores, metric, by=("group", "method", "beta"))
    for m, grid in grids.items():
        for beta in {p["beta"] for p in grid}:
            point, _ = choose_point([(GridPoint(p["alpha"], p["beta"]), p["accuracy"])
                                     for p in grid if p["beta"] == beta], dict(EXPERT_VAL), metric)
            row = per_beta.loc[(per_beta["method"] == m)
                               & (per_beta["beta"].isna() if beta is None else per_beta["beta"] == beta)]
            assert len(row) == 1 and row["alpha"].iloc[0] == point.alpha
    # the tables read the same point: β ablation's test cell sits at the chosen β
    recipe = make_recipe({"ta": {"merge": "task_arithmetic"},
                          "ta_sb": {"merge": "task_arithmetic", "boost": {}},
                          "ties_sb": {"merge": "ties", "boost": {}}},
                         {"g": ["a", "b", "c"]}, metric=metric)
    table = T.beta_ablation(scores, recipe)
    assert not math.isnan(table.loc[("TA + SB", 0.01), ("g", "test")])
    assert math.isnan(table.loc[("TA + SB", 0.0), ("g", "test")])


def test_best_on_val_skips_incomplete_points(scores):
    short = scores.loc[~((scores.split == "val") & (scores.method == "ta") & (scores.group == "big")
                         & (scores.alpha == 1.0) & (scores.task == "c"))]
    best = T.best_on_val(short, "normalized")
    row = best.loc[(best.group == "big") & (best.method == "ta")]
    assert row["alpha"].tolist() == [0.5]  # the only point scored on every task
    with pytest.raises(ValueError, match="'group' and 'method'"):
        T.best_on_val(scores, "normalized", by=("group",))
