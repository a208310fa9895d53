"""The one list of tables and figures: every entry has its function, inputs and caption, the
rules' file lists come from it, and the tables/figures jobs (the scripts, run as Snakemake runs
them) write exactly the declared files without importing torch."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from report_utils import report_config
from submerge.report import build, provenance, registry

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ROOT / "workflow" / "report"


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_registry_imports_neither_pandas_matplotlib_nor_torch():
    """report.smk imports the registry while Snakemake builds the DAG."""
    out = _run("import sys, json; import submerge.report.registry as r, submerge.report; "
               "print(json.dumps([m for m in ('pandas', 'matplotlib', 'torch') if m in sys.modules]))")
    assert json.loads(out.stdout) == []


def test_every_entry_has_function_inputs_caption_and_files():
    entries = [*registry.TABLES.values(), *registry.FIGURES.values()]
    assert [t.name for t in registry.TABLES.values()] == list(registry.TABLES)
    for e in entries:
        assert callable(e.function()), e.name
        assert e.inputs and all(i in registry.INPUTS for i in e.inputs), e.name
        assert (CAPTIONS / e.rst).is_file(), f"no caption {e.rst}"
    # no caption without an entry (besides the landing page's: workflow.rst, the overview's
    # and the attached config's)
    landing = ["workflow.rst", "overview.rst", "config.rst"]
    assert sorted(p.name for p in CAPTIONS.glob("*.rst")) == sorted([e.rst for e in entries]
                                                                      + landing)
    assert set(build.LOADERS) == set(registry.INPUTS)
    # report.smk maps every input to its files
    smk = (ROOT / "workflow" / "rules" / "report.smk").read_text()
    for name in registry.INPUTS:
        assert f'"{name}":' in smk, name
    t = registry.TABLES["main_results"]
    assert t.files == ("main_results.csv", "main_results.md", "main_results.tex",
                       "main_results.html", "main_results.csv.json")
    assert t.report_file == "main_results.html"
    assert provenance.sidecar_path("main_results.csv").name == t.files[-1]
    f = registry.FIGURES["rank_collapse"]
    assert f.files == ("rank_collapse.png", "rank_collapse.pdf", "rank_collapse.pdf.json")
    assert f.report_file == "rank_collapse.png"
    with pytest.raises(ValueError, match="twice"):
        registry._table("main_results", "main_results", ("scores",), "")
    with pytest.raises(ValueError, match="unknown inputs"):
        registry._figure("new", "spectra", ("nope",))


def test_rule_files_come_from_the_registry():
    flagged = []

    def report(path, **kwargs):  # Snakemake's report() flag
        flagged.append((path, kwargs))
        return path

    outputs = registry.rule_outputs(registry.TABLES, "r/tables", report)
    assert outputs == [f"r/tables/{f}" for t in registry.TABLES.values() for f in t.files]
    # every table is in the report as HTML (rendered inline), not as a CSV to download
    assert [p for p, _ in flagged] == [f"r/tables/{t}.html" for t in registry.TABLES]
    assert flagged[0] == ("r/tables/main_results.html",
                          {"caption": "../report/main_results.rst", "category": "Tables",
                           "labels": {"table": "main_results"}})
    assert len(flagged) == len(registry.TABLES)
    flagged.clear()
    registry.rule_outputs(registry.FIGURES, "r/figures", report)
    assert [p for p, _ in flagged] == [f"r/figures/{f}.png" for f in registry.FIGURES]
    assert all(k["category"] == "Figures" for _, k in flagged)
    targets = registry.target_files("r")
    assert targets[: len(outputs)] == outputs and len(set(targets)) == len(targets)
    files = {name: [f"{name}.x"] for name in registry.INPUTS} | {"selection": []}
    assert registry.rule_inputs(registry.TABLES, files) == {
        "scores": ["scores.x"], "selection": [], "benchmarks": ["benchmarks.x"],
        "table8": ["table8.x"]}
    assert list(registry.rule_inputs(registry.FIGURES, files)) == [
        "scores", "spectra_summary", "singular_values", "hogsvd_summary", "decay_summary"]


# ----------------------------------------------------------------- the jobs, without torch

METHODS = {
    "ta": {"merge": "task_arithmetic"},
    "ta_sb": {"merge": "task_arithmetic", "boost": {}},
    "tsv": {"merge": "tsv_m"},
}
GROUPS = {"g2": ["a", "b"], "g3": ["a", "b", "c"]}
EXPERT = {"a": 0.9, "b": 0.8, "c": 0.7}


def _inputs(root: Path, with_selection: bool) -> dict[str, list[str]]:
    rng = np.random.default_rng(0)
    rows = []
    for g, tasks in GROUPS.items():
        for m in METHODS:
            betas = [0.0, 0.01] if "boost" in METHODS[m] else [math.nan]
            for a in (0.5, 1.0):
                for b in betas:
                    chosen = a == 0.5 and (math.isnan(b) or b == 0.0)  # the test point
                    for split in ("val", "test") if chosen else ("val",):
                        for t in tasks:
                            rows.append(dict(suite="s", group=g, n_experts=len(tasks), method=m,
                                             alpha=a, beta=b, split=split, task=t,
                                             accuracy=float(rng.uniform(0.3, 0.7)),
                                             expert_accuracy=EXPERT[t], zeroshot_accuracy=0.2))
    files: dict[str, list[str]] = {}
    scores = root / "scores.csv"
    pd.DataFrame(rows).to_csv(scores, index=False, float_format="%.6g")
    files["scores"] = [str(scores)]
    files["selection"] = []
    if with_selection:
        sel = root / "selection.csv"
        pd.DataFrame([dict(setting=s, draw=d, split="test", task=t, task_set=ts, accuracy=0.5 + 0.01 * d)
                      for s, draws in (("random", (0, 1)), ("hogsvd", (0,)))
                      for d in draws for t, ts in (("a", "pool"), ("c", "ext"))]).to_csv(sel, index=False)
        files["selection"] = [str(sel)]
    files["benchmarks"] = []
    for g in GROUPS:
        for m in METHODS:
            path = root / "benchmarks" / g / f"{m}.tsv"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("s\th:m:s\tmax_rss\n1.25\t0:00:01\t100.0\n")
            files["benchmarks"].append(str(path))
    summary, sigma = [], []
    for g, tasks in GROUPS.items():
        for m in ("ta", "ta_sb"):
            for kind in ("attn", "mlp"):
                s = np.sort(rng.gamma(1.0, 1.0, 12))[::-1] * len(tasks)
                key = f"blocks.0.{kind}.weight"
                summary.append(dict(group=g, n_experts=len(tasks), method=m, boosted=m == "ta_sb",
                                    key=key, block=0, kind=kind, stable_rank=float((s**2).sum() / s[0]**2),
                                    energy_rank=5))
                for state in {m == "ta_sb", False}:
                    sigma += [dict(group=g, n_experts=len(tasks), method=m, boosted=state, kind=kind,
                                   key=key, index=i, sigma=float(v)) for i, v in enumerate(s)]
    for name, frame in (("spectra_summary", summary), ("singular_values", sigma)):
        path = root / f"{name}.csv"
        pd.DataFrame(frame).to_csv(path, index=False)
        files[name] = [str(path)]
    hog = root / "hogsvd_summary.json"
    n = len(GROUPS["g3"])
    hog.write_text(json.dumps({
        "group": "g3", "experts": GROUPS["g3"],
        "alignment": {k: rng.uniform(0, 1, (n, n)).tolist() for k in ("attn", "mlp", "mean")},
        "importance": {"key": "blocks.0.attn.out_proj.weight", "row_block": 0,
                       "sigma": np.exp(rng.normal(0, 1, (n, 16))).tolist(),
                       "merged": np.exp(rng.normal(0, 1, 16)).tolist()}}))
    files["hogsvd_summary"] = [str(hog)]
    files["table8"] = []  # not configured: the table is a note
    decay = root / "decay_summary.json"
    decay.write_text(json.dumps({
        "group": "g3", "experts": GROUPS["g3"], "threshold": 2.0, "n": list(range(1, n + 1)),
        "common_fraction": 0.5,
        "matrices": [{"key": "k", "row_block": 0, "kind": "mlp", "n_common": 2, "n_directions": 4,
                      "common_fro": [1.0] * n, "unique_fro": [1 / (i + 1) ** 0.5 for i in range(n)]}],
        "spectra": {"key": "k", "row_block": 0, "n": [1, 2], "common_sv": [[2.0, 1.0], [2.0, 1.0]],
                    "unique_sv": [[1.0, 0.5], [0.7, 0.3]]}}))
    files["decay_summary"] = [str(decay)]
    return files


# Runs scripts/<kind>.py as Snakemake's `script:` does (a `snakemake` object in its globals).
DRIVER = r"""
import json, runpy, sys
from types import SimpleNamespace

spec = json.load(open(sys.argv[1]))

class Files(list):  # snakemake.input: a list with named parts
    def __init__(self, named):
        super().__init__(p for v in named.values() for p in v)
        self._named = named
    def items(self):
        return self._named.items()

snakemake = SimpleNamespace(input=Files(spec["input"]), output=spec["output"], log=[spec["log"]], threads=1,
                            params=SimpleNamespace(config=spec["config"]), wildcards=SimpleNamespace())
runpy.run_path(spec["script"], init_globals={"snakemake": snakemake}, run_name="__main__")
heavy = [m for m in ("torch", "submerge.stages", "submerge.pipeline") if m in sys.modules]
print(json.dumps({"heavy": heavy}))
"""


@pytest.mark.parametrize("with_selection", [True, False])
def test_report_jobs_write_the_declared_files_without_torch(tmp_path, with_selection):
    files = _inputs(tmp_path, with_selection)
    config = report_config(METHODS, GROUPS, selection=None)
    for kind, entries in (("tables", registry.TABLES), ("figures", registry.FIGURES)):
        out_dir = tmp_path / "results" / kind
        outputs = [str(out_dir / f) for e in entries.values() for f in e.files]
        needed = registry.inputs_of(entries.values())
        spec = {"script": str(ROOT / "scripts" / f"{kind}.py"), "config": config,
                "input": {name: files[name] for name in needed}, "output": outputs,
                "log": str(tmp_path / f"{kind}.log")}
        (tmp_path / f"{kind}.json").write_text(json.dumps(spec))
        done = _run(DRIVER, str(tmp_path / f"{kind}.json"))
        assert json.loads(done.stdout.splitlines()[-1]) == {"heavy": []}
        assert sorted(p.name for p in out_dir.iterdir()) == sorted(Path(o).name for o in outputs)
        for e in entries.values():  # each sidecar records the entry's own inputs and the config
            side = json.loads((out_dir / e.files[-1]).read_text())
            assert [i["path"] for i in side["inputs"]] == [p for n in e.inputs for p in files[n]]
            assert side["config"] == json.loads(json.dumps(config))
            assert provenance.audit(out_dir / e.files[-1]).ok
    tables_dir = tmp_path / "results" / "tables"
    main = pd.read_csv(tables_dir / "main_results.csv")
    assert list(main["Method"]) == ["Zero-shot", "Finetuned", "TA", "TA + SB", "TSV-M"]
    timing = pd.read_csv(tables_dir / "merging_time.csv")
    assert timing.loc[0, "g2 Time (s)"] == pytest.approx(1.25)
    selection = pd.read_csv(tables_dir / "expert_selection.csv")
    if with_selection:
        assert list(selection["Selection"]) == ["Random (2 draws)", "HO-GSVD (1 draw)", "HO-GSVD − Random"]
    else:
        assert list(selection.columns) == ["note"]
        assert "experiments.selection not configured" in selection.loc[0, "note"]


def test_check_outputs():
    build.check_outputs(["a/x.csv", "a/./y.md"], ["a/y.md", "a/x.csv"])
    with pytest.raises(RuntimeError, match="declared but not written"):
        build.check_outputs(["a/x.csv"], ["a/x.csv", "a/x.md"])
    assert build.named_inputs({"scores": "s.csv", "selection": [], "b": ["1", "2"]}) == {
        "scores": ["s.csv"], "selection": [], "b": ["1", "2"]}
