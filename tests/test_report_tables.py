"""Table builders checked cell by cell against an independent computation on hand-made
score frames, and the writer's three formats."""

from __future__ import annotations

import csv
import math
import statistics
import zlib

import numpy as np
import pandas as pd
import pytest

from submerge.report import tables as T

METHODS = {
    "ta": {"rule": "task_arithmetic"},
    "ta_sb": {"rule": "task_arithmetic", "boost": {"kind": "sb"}},
    "ties": {"rule": "ties", "k": 20},
    "ta_lines": {"rule": "task_arithmetic", "lines": {"beta": 0.5}},
    "ta_lines_sb": {
        "rule": "task_arithmetic",
        "lines": {"beta": 0.5},
        "boost": {},  # {} = boosted
        "label": "Ours",
    },
    "tsv": {"rule": "tsv_m"},  # configured, never scored
    "hosb": {"rule": "hogsvd", "boost": {}},  # boosted, no unboosted base configured
}
# "big" has 3 experts, "small" 2: column order must follow n_experts, not the name.
GROUP_TASKS = {"big": ["a", "b", "c"], "small": ["a", "b"]}
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
    table = T.main_results(scores, METHODS)
    labels = T.method_labels(METHODS)
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
    table = T.main_results(partial, METHODS, groups=groups)
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
        T.main_results(scores.assign(accuracy=scores["accuracy"] * 100), METHODS)
    with pytest.raises(ValueError, match="lacks column"):
        T.main_results(scores.drop(columns="expert_accuracy"), METHODS)
    # two test grid points for one (group, method)
    extra = scores.loc[(scores["split"] == "test") & (scores["method"] == "ta")].assign(alpha=0.123)
    with pytest.raises(ValueError, match="several grid points"):
        T.main_results(pd.concat([scores, extra]), METHODS)


def test_base_method_and_labels():
    methods = {
        "ta": {"rule": "task_arithmetic"},
        "ties": {"rule": "ties", "k": 20},
        "ties_sb": {"rule": "ties", "k": 20, "boost": {"kind": "sb"}},
        "ties10_sb": {"rule": "ties", "k": 10, "boost": {"kind": "sb"}},
        "sb_attn": {"rule": "task_arithmetic", "boost": {"layers": "attn"}},
        "sb_mlp": {"rule": "task_arithmetic", "boost": {"layers": "mlp"}},
    }
    assert T.base_method("ties_sb", methods) == "ties"
    assert T.base_method("ties10_sb", methods) is None  # different k: not its base
    assert T.base_method("sb_attn", methods) == "ta"
    assert T.base_method("ta", methods) is None
    labels = T.method_labels(methods)
    assert labels["sb_attn"] == "TA + SB (sb_attn)" and labels["sb_mlp"] == "TA + SB (sb_mlp)"
    assert labels["ties_sb"] == "TIES + SB (ties_sb)"


def test_sota_comparison(scores):
    methods = {**METHODS, "isoc": {"rule": "iso_c"}}
    table = T.sota_comparison(scores, methods)
    assert list(table.index) == ["Finetuned", "TSV-M", "Iso-C", "Iso-CTS", "Ours"]
    acc, _ = expected_test(scores, "big", "ta_lines_sb")
    assert table.loc["Ours", ("big", "Acc")] == pytest.approx(acc)
    assert math.isnan(table.loc["Iso-CTS", ("big", "Acc")])  # not configured: gap row
    assert math.isnan(table.loc["Iso-C", ("small", "Acc")])  # configured, not scored


def test_beta_ablation(scores):
    table = T.beta_ablation(scores, METHODS)
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
    by_acc = T.beta_ablation(scores, METHODS, select_by="absolute")
    val = scores.loc[
        (scores.split == "val")
        & (scores.method == "ta_sb")
        & (scores.group == "big")
        & (scores.beta == 0.01)
    ]
    assert by_acc.loc[("TA + SB", 0.01), ("big", "val")] == pytest.approx(
        100 * max(sub.accuracy.mean() for _, sub in val.groupby("alpha"))
    )
    with pytest.raises(ValueError, match="select_by"):
        T.beta_ablation(scores, METHODS, select_by="f1")


def test_layer_ablation():
    methods = {
        "ta": {"rule": "task_arithmetic"},
        "sb_attn": {"rule": "task_arithmetic", "boost": {"kind": "sb", "layers": "attn"}},
        "sb_mlp": {"rule": "task_arithmetic", "boost": {"kind": "sb", "layers": "mlp"}},
        "sb_both": {"rule": "task_arithmetic", "boost": {"kind": "sb"}},
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
    table = T.layer_ablation(pd.DataFrame(rows), methods)
    assert list(table.index) == [("TA + SB", "attn"), ("TA + SB", "mlp"), ("TA + SB", "both")]
    assert table.loc[("TA + SB", "mlp"), ("g", "val")] == pytest.approx(75.0)
    assert table.loc[("TA + SB", "both"), ("g", "test")] == pytest.approx(86.0)
    assert len(T.layer_ablation(pd.DataFrame(rows), {"ta": methods["ta"]})) == 0


def test_per_task_accuracy(scores):
    table = T.per_task_accuracy(scores, METHODS, group="big")
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
    both = T.per_task_accuracy(scores, METHODS)
    assert list(both.index.get_level_values(0).unique()) == ["small", "big"]
    with pytest.raises(ValueError, match="group 'nope'"):
        T.per_task_accuracy(scores, METHODS, group="nope")


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
    assert list(table.index) == ["Random (3 draws)", "HO-GSVD (1 draw)"]
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


def test_timing_table():
    timing = pd.DataFrame(
        [
            dict(method="ta", group="g8", n_experts=8, rule="merge", seconds=1.0, max_rss_mb=100.0),
            dict(method="ta", group="g8", n_experts=8, rule="merge", seconds=3.0, max_rss_mb=120.0),
            dict(
                method="ta_sb", group="g8", n_experts=8, rule="merge", seconds=2.0, max_rss_mb=100.0
            ),
            dict(
                method="ta_sb", group="g8", n_experts=8, rule="boost", seconds=5.0, max_rss_mb=300.0
            ),
            dict(
                method="ta_sb", group="g4", n_experts=4, rule="merge", seconds=0.5, max_rss_mb=50.0
            ),
            dict(
                method="other", group="g4", n_experts=4, rule="merge", seconds=9.0, max_rss_mb=9.0
            ),
        ]
    )
    table = T.timing_table(timing, {"ta": METHODS["ta"], "ta_sb": METHODS["ta_sb"]})
    assert list(table.index) == ["TA", "TA + SB"]
    assert [c[0] for c in table.columns[::2]] == ["g4", "g8"]
    assert table.loc["TA", ("g8", "Time (s)")] == pytest.approx(2.0)  # mean of repeats
    assert table.loc["TA", ("g8", "Max RSS (MB)")] == pytest.approx(110.0)
    assert table.loc["TA + SB", ("g8", "Time (s)")] == pytest.approx(7.0)  # sum over rules
    assert table.loc["TA + SB", ("g8", "Max RSS (MB)")] == pytest.approx(300.0)
    assert math.isnan(table.loc["TA", ("g4", "Time (s)")])


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
    table = T.main_results(scores, METHODS)
    paths = T.write_table(table, tmp_path / "main", caption="Main results (%)", label="tab:main")
    assert [p.name for p in paths] == ["main.csv", "main.md", "main.tex"]
    tex = paths[2].read_text()
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert tex.count(rule) == 1
    assert r"\multicolumn{4}{c}{small}" in tex and r"\cmidrule(lr){2-5}" in tex
    assert r"$\Delta$Acc" in tex and "---" in tex and r"Main results (\%)" in tex
    body = tex.split(r"\midrule")[1].split(r"\bottomrule")[0].strip().splitlines()
    assert len(body) == len(table)
    assert all(line.count("&") == len(table.columns) for line in body)
    md = paths[1].read_text().splitlines()
    assert md[2].startswith("| Method | small Acc") and len(md) == 4 + len(table)
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


def test_write_table_multiindex_rows_and_decimals(tmp_path, scores):
    table = T.beta_ablation(scores, METHODS)
    paths = T.write_table(table, tmp_path / "beta", decimals={"val": 2, "*": 1})
    md = paths[1].read_text().splitlines()
    assert md[0].startswith("| Method | β | small val")
    assert md[2].startswith("| TA + SB | 0.00 |") and md[3].startswith("|  | 0.01 |")
    val_cell = md[2].split(" | ")[2]
    assert len(val_cell.split(".")[1]) == 2
    assert r"$\beta$" in paths[2].read_text()
    empty = T.write_table(T.layer_ablation(scores, METHODS), tmp_path / "empty")
    assert r"\bottomrule" in empty[2].read_text()


def test_validation_only_scores_give_gaps(scores):
    val_only = scores.loc[scores["split"] == "val"]
    assert T.grid_summary(val_only, "test").empty
    table = T.main_results(val_only, METHODS)
    assert math.isnan(table.loc["TA", ("big", "Acc")])
    assert math.isnan(table.loc["Finetuned", ("small", "Acc")])
    with pytest.raises(ValueError, match="empty"):
        T.main_results(scores.iloc[:0], METHODS)
