"""The audit of a results directory (unreadable / missing sidecars), the provenance chain
down to the checkpoints, the stable script path of Snakemake jobs and the code version."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

import submerge
from submerge import cli
from submerge.report import provenance as P


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _checkpoint(path: Path, payload: bytes, source_sha: str) -> None:
    """A normalised checkpoint as io.checkpoints.save_normalized leaves it: the file and
    ``path.with_suffix('.json')`` holding its sha256 and the source's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    meta = {"source": {"url": "https://example.org/x.pt"}, "source_sha256": source_sha,
            "sha256": _sha(path), "dtype": "float32", "n_params": 3}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


@pytest.fixture()
def tree(tmp_path, monkeypatch):
    """results/: checkpoints -> grid point (with sidecar) -> scores.csv (with sidecar) ->
    a table and a figure (PDF + PNG, sidecar named after the PDF); cwd = tmp_path."""
    monkeypatch.chdir(tmp_path)
    res = Path("results")
    base, expert = res / "models" / "base.safetensors", res / "models" / "experts" / "e1.safetensors"
    _checkpoint(base, b"base weights", "a" * 64)
    _checkpoint(expert, b"expert weights", "b" * 64)
    merged = res / "merged" / "g" / "ta.h5"
    merged.parent.mkdir(parents=True)
    merged.write_bytes(b"merged")  # made by the pipeline, no sidecar of its own
    point = res / "grid" / "g" / "ta" / "a0.3.json"
    point.parent.mkdir(parents=True)
    point.write_text('{"accuracy": 0.5}\n')
    P.write_sidecar(point, [base, expert, merged], command=["x"])
    scores = res / "scores.csv"
    scores.write_text("group,method,accuracy\ng,ta,0.5\n")
    P.write_sidecar(scores, [point, base], command=["x"])
    (res / "tables").mkdir()
    table = [res / "tables" / f"main{ext}" for ext in (".csv", ".md", ".tex")]
    for t in table:
        t.write_text(t.name)
    P.write_sidecar(table, [scores], command=["x"])
    (res / "figures").mkdir()
    fig = [res / "figures" / "acc.pdf", res / "figures" / "acc.png"]
    for f in fig:
        f.write_bytes(f.name.encode())
    P.write_sidecar(fig, [scores], command=["x"])
    return types.SimpleNamespace(res=res, base=base, expert=expert, merged=merged, point=point,
                                 scores=scores, table=table, fig=fig)


def _audit(capsys, *args):
    code = cli.main(["audit", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


# ----------------------------------------------------------------- 1. directory audits


def test_clean_directory(tree, capsys):
    # other JSON (checkpoint sidecars, the grid point) and files without sidecars are fine
    code, out, err = _audit(capsys, tree.res)
    assert code == 0, out + err
    assert "4 audited: 0 changed, 0 error(s)" in out


@pytest.mark.parametrize("garbage", ['{"schema": "submerge.provenance/1", "outp', "",
                                     '{"something": "else"}', "[1, 2]"])
def test_garbage_sidecar_is_an_error(tree, capsys, garbage):
    bad = P.sidecar_path(tree.table[0])
    bad.write_text(garbage)
    code, out, err = _audit(capsys, tree.res)
    assert code == 2
    assert f"{bad}: not a valid provenance sidecar" in err
    assert "1 error(s)" in out
    code, out, err = _audit(capsys, bad)  # named directly
    assert code == 2 and str(bad) in err


def test_deleted_sidecar_is_an_error(tree, capsys):
    P.sidecar_path(tree.fig[0]).unlink()  # the figure's (named after the PDF)
    code, out, err = _audit(capsys, tree.res)
    assert code == 2
    assert f"{tree.fig[0]}: no provenance sidecar" in err
    assert f"{tree.fig[1]}: no provenance sidecar" in err  # its PNG too
    assert "2 error(s)" in out
    code, _, err = _audit(capsys, tree.res / "tables")  # the table alone is fine
    assert code == 0, err


def test_garbage_figure_sidecar_is_reported_once(tree, capsys):
    P.sidecar_path(tree.fig[0]).write_text("not json")
    code, out, err = _audit(capsys, tree.res / "figures")
    assert code == 2
    assert "acc.pdf.json: not a valid provenance sidecar: invalid JSON" in err
    assert "1 error(s)" in out  # the PNG is not reported again


def test_only_tables_and_figures_need_sidecars(tree, capsys):
    (tree.res / "summaries").mkdir()
    (tree.res / "summaries" / "spectra_summary.csv").write_text("x")
    (tree.res / "tables" / "notes.md").write_text("x")
    (tree.res / "figures" / "legend.txt").write_text("x")
    (tree.res / "grid" / "g" / "ta" / "a0.5.json").write_text("{}")
    code, out, err = _audit(capsys, tree.res)
    assert code == 0, out + err
    sidecars, errors = P.scan_directory(tree.res)
    assert errors == [] and len(sidecars) == 4


def test_table_without_sidecar_is_an_error(tree):
    extra = tree.res / "tables" / "extra.csv"
    extra.write_text("a\n1\n")
    _, errors = P.scan_directory(tree.res)
    assert errors == [f"{extra}: no provenance sidecar (expected {extra}.json or a sidecar "
                      "listing it)"]


# ----------------------------------------------------------------- 2. the chain


def test_sidecars_point_at_upstream_sidecars(tree):
    fig = json.loads(P.sidecar_path(tree.fig[0]).read_text())
    assert fig["inputs"][0]["sidecar"] == "../scores.csv.json"
    point = json.loads(P.sidecar_path(tree.point).read_text())
    base, expert, merged = point["inputs"]
    assert base["sidecar"] == "../../../models/base.json" and base["source_sha256"] == "a" * 64
    assert expert["sidecar"] == "../../../models/experts/e1.json"
    assert merged["sidecar"] is None and "source_sha256" not in merged


def test_chain_reaches_the_checkpoints(tree, capsys):
    root = P.provenance_chain(tree.fig[1])  # via the PNG
    assert root.ok and root.kind == "provenance" and root.path == tree.fig[1]
    assert [c.path for c in root.children] == [tree.scores]
    scores = root.children[0]
    assert scores.kind == "provenance"
    point, base_again = scores.children
    assert [(c.path, c.kind) for c in point.children] == [
        (tree.base, "checkpoint"), (tree.expert, "checkpoint"), (tree.merged, "none")]
    assert point.children[0].info["sha256"] == _sha(tree.base)
    assert point.children[0].info["source_sha256"] == "a" * 64
    assert base_again.kind == "checkpoint"

    code, out, err = _audit(capsys, "--chain", tree.fig[1])
    assert code == 0, out + err
    assert f"sha256 {_sha(tree.base)}" in out and f"sha256 {_sha(tree.expert)}" in out
    assert f"source_sha256 {'a' * 64}" in out and f"source_sha256 {'b' * 64}" in out
    assert f"{tree.merged}  [ok]" in out and "no provenance recorded" in out
    assert "1 audited: 0 changed, 0 error(s)" in out


def test_chain_of_a_sidecar_and_repeats(tree):
    # the table and the figure share scores.csv; from the directory each is expanded once
    root = P.provenance_chain(P.sidecar_path(tree.table[0]))
    assert root.path == tree.table[0]
    text = P.render_chain(root)
    assert text.count(str(tree.merged)) == 1 and "[ok]" in text


def test_audit_follows_the_chain(tree, capsys):
    result = P.audit(tree.fig[0])
    assert result.ok and len(result.findings) == 3  # pdf, png, scores.csv
    assert {f.path for f in result.upstream} >= {tree.base, tree.expert, tree.merged, tree.point}
    assert P.audit(tree.fig[0], follow=False).upstream == ()

    tree.base.write_bytes(b"retrained")  # a checkpoint changed after the figure was made
    result = P.audit(tree.fig[0])
    assert not result.ok
    problems = {(f.role, f.path, f.status, f.via) for f in result.problems}
    assert problems == {
        ("input", tree.base, "changed", P.sidecar_path(tree.point)),
        ("input", tree.base, "changed", P.sidecar_path(tree.scores)),
        ("checkpoint", tree.base, "changed", tree.base.with_suffix(".json")),
    }
    assert not P.audit(tree.fig[0], follow=False).problems  # one step back sees nothing
    code, out, _ = _audit(capsys, tree.fig[0])
    assert code == 1 and "CHANGED" in out and str(tree.base) in out
    code, out, _ = _audit(capsys, "--shallow", tree.fig[0])
    assert code == 0
    code, out, _ = _audit(capsys, "--chain", tree.fig[0])
    assert code == 1 and "[changed]" in out and "CHANGED checkpoint" in out


def test_audit_reports_broken_upstream_sidecars(tree, capsys):
    tree.expert.with_suffix(".json").write_text("{garbage")
    P.sidecar_path(tree.scores).unlink()  # recorded in the figure's sidecar, now deleted
    root = P.provenance_chain(tree.fig[0])
    assert not root.ok and root.children[0].kind == "invalid"
    result = P.audit(tree.fig[0])
    assert [(f.role, f.status, f.path.name) for f in result.problems] == [
        ("sidecar", "invalid", "scores.csv.json")]
    assert "recorded sidecar is missing" in result.report()
    result = P.audit(tree.point)
    assert [(f.role, f.status, f.path.name) for f in result.problems] == [
        ("sidecar", "invalid", "e1.json")]
    assert "invalid JSON" in result.report()
    code, out, _ = _audit(capsys, "--chain", tree.point)
    assert code == 1 and "INVALID sidecar" in out


def test_chain_without_recorded_pointers(tree):
    """Sidecars written before the pointers existed: upstream sidecars are found by name."""
    for sidecar in (P.sidecar_path(tree.fig[0]), P.sidecar_path(tree.scores),
                    P.sidecar_path(tree.point)):
        data = json.loads(sidecar.read_text())
        data.pop("sidecar_sha256")  # older sidecars have no hash of their own either
        for inp in data["inputs"]:
            inp.pop("sidecar"), inp.pop("source_sha256", None)
        sidecar.write_text(json.dumps(data))
    root = P.provenance_chain(tree.fig[0])
    kinds = {n.path: n.kind for n in root.walk()}
    assert kinds[tree.scores] == "provenance" and kinds[tree.base] == "checkpoint"
    assert kinds[tree.merged] == "none" and root.ok


def test_real_normalised_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    from submerge.io.checkpoints import save_normalized

    ckpt = tmp_path / "base.safetensors"
    save_normalized({"w": torch.ones(2)}, ckpt, {"source_sha256": "c" * 64})
    out = tmp_path / "point.json"
    out.write_text("{}")
    P.write_sidecar(out, [ckpt], command=["x"])
    (node,) = P.provenance_chain(out).children
    assert node.kind == "checkpoint" and node.info["sha256"] == _sha(ckpt)
    assert node.info["source_sha256"] == "c" * 64 and node.findings[0].status == "ok"


# ----------------------------------------------------------------- 3. Snakemake scripts


def test_snakemake_temp_script_is_recorded_by_its_stable_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "scripts").mkdir()
    script = tmp_path / "scripts" / "figures.py"
    script.write_text("print('figures')\n")
    temp = tmp_path / ".snakemake" / "scripts" / "tmpk3_x9qz1.figures.py"
    monkeypatch.setattr(sys, "argv", [str(temp)])
    # what Snakemake's preamble leaves in the script's __main__
    fake_main = types.SimpleNamespace(__file__=str(script),
                                      snakemake=types.SimpleNamespace(rule="figures"))
    monkeypatch.setitem(sys.modules, "__main__", fake_main)
    out = tmp_path / "fig.pdf"
    out.write_bytes(b"pdf")
    data = json.loads(P.write_sidecar(out).read_text())
    assert data["command"] == "scripts/figures.py"
    assert data["script"] == {"path": "scripts/figures.py", "sha256": _sha(script),
                              "rule": "figures", "temp": str(temp)}

    # no Snakemake object (e.g. the script re-run by hand): scripts/<name> beside .snakemake
    monkeypatch.setitem(sys.modules, "__main__", types.SimpleNamespace())
    command, record = P.script_record([sys.executable, ".snakemake/scripts/tmpabc.tables.py", "-v"])
    assert command == f"{sys.executable} scripts/tables.py -v"
    assert record == {"path": "scripts/tables.py", "sha256": None, "rule": None,
                      "temp": ".snakemake/scripts/tmpabc.tables.py"}
    # a string command naming a temp script is mapped too; anything else is kept
    data = json.loads(P.write_sidecar(out, command=f"python {temp}").read_text())
    assert data["command"] == "python scripts/figures.py"
    assert data["script"]["sha256"] == _sha(script)
    assert P.script_record(["snakemake", "-c1"]) == ("snakemake -c1", None)
    data = json.loads(P.write_sidecar(out, command="a | b").read_text())
    assert data["command"] == "a | b" and data["script"] is None


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_stable_script_path_is_relative_to_the_git_toplevel(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    (repo / "work").mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    script = repo / "scripts" / "scores.py"
    script.write_text("x = 1\n")
    temp = repo / "work" / ".snakemake" / "scripts" / "tmp1234abcd.scores.py"
    main = types.SimpleNamespace(__file__=str(script), snakemake=types.SimpleNamespace(rule="scores"))
    command, record = P.script_record([str(temp)], main=main)
    assert command == "scripts/scores.py" and record["rule"] == "scores"


# ----------------------------------------------------------------- 4. code version


def test_source_hash(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub" / "__pycache__").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("a = 1\n")
    first = P.source_hash(pkg)
    assert first[1] == 2 and len(first[0]) == 64
    (pkg / "sub" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"x")
    (pkg / "sub" / "__pycache__" / "b.py").write_text("ignored")
    (pkg / "data.txt").write_text("not code")
    assert P.source_hash(pkg) == first
    (pkg / "sub" / "a.py").write_text("a = 2\n")  # an uncommitted edit changes the hash
    assert P.source_hash(pkg)[0] != first[0]
    (pkg / "sub" / "a.py").write_text("a = 1\n")
    assert P.source_hash(pkg) == first
    (pkg / "sub" / "a.py").rename(pkg / "sub" / "b.py")  # so does a rename
    assert P.source_hash(pkg)[0] != first[0]


def test_code_version_and_sidecar_code_record(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "git_state", lambda directory=None: {"commit": "f" * 40, "dirty": True})
    code = P.code_version()
    pkg_hash, n_files = P.source_hash(Path(submerge.__file__).resolve().parent)
    assert code == {"submerge": submerge.__version__, "commit": "f" * 40, "dirty": True,
                    "package_sha256": pkg_hash, "package_files": n_files}
    assert n_files > 10
    json.dumps(code)
    monkeypatch.setattr(P, "code_version", lambda: dict(code, package_sha256="0" * 64))
    out = tmp_path / "t.csv"
    out.write_text("a\n")
    data = json.loads(P.write_sidecar(out, command=["x"]).read_text())
    assert data["code"]["package_sha256"] == "0" * 64
    assert data["git"] == {"commit": "f" * 40, "dirty": True}
