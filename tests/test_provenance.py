"""Provenance sidecars carry correct hashes and context; audit and the CLI detect tampering."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil

import pytest

from submerge import __version__, cli
from submerge.report import provenance as P


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def made(tmp_path, monkeypatch):
    """A results tree: two inputs, a table in three formats, its sidecar (cwd = tmp_path)."""
    monkeypatch.chdir(tmp_path)
    res = tmp_path / "results"
    (res / "tables").mkdir(parents=True)
    scores = res / "scores.csv"
    scores.write_text("group,method,accuracy\nn8,ta,0.5\n")
    timing = res / "timing.csv"
    timing.write_bytes(bytes(range(256)) * 10)
    outs = []
    for ext, text in ((".csv", "a,b\n1,2\n"), (".md", "| a | b |\n"), (".tex", "\\toprule\n")):
        out = res / "tables" / f"main{ext}"
        out.write_text(text)
        outs.append(out)
    rel_inputs = ["results/scores.csv", "results/timing.csv"]
    sidecar = P.write_sidecar(
        [p.relative_to(tmp_path) for p in outs],
        rel_inputs,
        config={"methods": {"ta": {"merge": "task_arithmetic"}}, "grid": (0.1, 0.2), "where": res},
        command=["snakemake", "--cores", "1", "a b"],
    )
    return dict(root=tmp_path, res=res, outs=outs, inputs=[scores, timing], sidecar=sidecar)


def test_sidecar_contents(made):
    sidecar = made["sidecar"]
    assert sidecar == (made["outs"][0].relative_to(made["root"])).with_name("main.csv.json")
    data = json.loads(sidecar.read_text())
    assert data["schema"] == P.SCHEMA
    assert [o["name"] for o in data["outputs"]] == ["main.csv", "main.md", "main.tex"]
    for rec, out in zip(data["outputs"], made["outs"]):
        assert rec["sha256"] == _sha(out) and rec["bytes"] == out.stat().st_size
    for rec, inp in zip(data["inputs"], made["inputs"]):
        assert rec["sha256"] == _sha(inp)
        assert rec["path"] == str(inp.relative_to(made["root"]))
        assert rec["rel"] == f"../{inp.name}"
    assert data["config"] == {
        "methods": {"ta": {"merge": "task_arithmetic"}},
        "grid": [0.1, 0.2],
        "where": str(made["res"]),
    }
    assert set(data["versions"]) == {"python", "torch", "numpy", "pandas", "matplotlib", "submerge"}
    assert data["versions"]["submerge"] == __version__
    import pandas

    assert data["versions"]["pandas"] == pandas.__version__
    assert data["command"] == "snakemake --cores 1 'a b'"
    assert set(data["git"]) == {"commit", "dirty"}
    assert data["git"]["commit"] is None or len(data["git"]["commit"]) == 40
    assert [rec["sidecar"] for rec in data["inputs"]] == [None, None]  # no upstream provenance
    assert data["script"] is None  # not a Snakemake script
    assert set(data["code"]) == {"submerge", "commit", "dirty", "package_sha256", "package_files"}
    assert data["code"]["commit"] == data["git"]["commit"]
    assert len(data["code"]["package_sha256"]) == 64 and data["code"]["submerge"] == __version__
    created = dt.datetime.fromisoformat(data["created_utc"])
    assert created.utcoffset() == dt.timedelta(0)
    assert abs((dt.datetime.now(dt.timezone.utc) - created).total_seconds()) < 600


def test_git_absent_gives_null(monkeypatch, tmp_path):
    monkeypatch.setattr(P.shutil, "which", lambda name: None)
    assert P.git_state() == {"commit": None, "dirty": None}
    monkeypatch.undo()
    if shutil.which("git"):  # a directory outside any work tree
        assert P.git_state(tmp_path) == {"commit": None, "dirty": None}


def test_write_sidecar_rejects_bad_arguments(made):
    with pytest.raises(FileNotFoundError, match="input 'nope.csv'"):
        P.write_sidecar(made["outs"], ["nope.csv"])
    with pytest.raises(ValueError, match="not JSON"):
        P.write_sidecar(made["outs"], [], config={"x": object()})
    with pytest.raises(ValueError, match="not in the directory"):
        P.write_sidecar([made["outs"][0], made["inputs"][0]], [])


def test_audit_clean_then_changed_input_and_output(made):
    clean = P.audit(made["outs"][1])  # via an output (the .md)...
    assert clean.ok and clean.problems == []
    assert P.audit(made["sidecar"]).ok  # ...or via the sidecar itself
    assert len(clean.findings) == 5

    made["inputs"][0].write_text("group,method,accuracy\nn8,ta,0.6\n")
    result = P.audit(made["sidecar"])
    assert not result.ok
    assert [(f.role, f.status, f.path.name) for f in result.problems] == [
        ("input", "changed", "scores.csv")
    ]
    assert result.problems[0].actual == _sha(made["inputs"][0])
    assert "changed input" in result.report()

    made["outs"][2].write_text("\\toprule tampered\n")
    made["inputs"][1].unlink()
    result = P.audit(made["sidecar"])
    assert sorted((f.role, f.status, f.path.name) for f in result.problems) == [
        ("input", "changed", "scores.csv"),
        ("input", "missing", "timing.csv"),
        ("output", "changed", "main.tex"),
    ]
    text = result.report()
    assert "CHANGED" in text and "missing input" in text and "main.tex" in text


def test_audit_survives_moving_the_tree(made, tmp_path_factory, monkeypatch):
    moved = tmp_path_factory.mktemp("elsewhere") / "results"
    shutil.copytree(made["res"], moved)
    monkeypatch.chdir(tmp_path_factory.mktemp("other_cwd"))
    assert P.audit(moved / "tables" / "main.csv").ok


def test_audit_without_sidecar(tmp_path):
    lonely = tmp_path / "fig.png"
    lonely.write_bytes(b"png")
    with pytest.raises(FileNotFoundError, match="no provenance sidecar"):
        P.audit(lonely)
    (tmp_path / "fig.png.json").write_text('{"something": "else"}')
    with pytest.raises(ValueError, match="not a submerge.provenance"):
        P.audit(lonely)


def test_cli_audit_exit_codes(made, capsys):
    assert cli.main(["audit", str(made["sidecar"])]) == 0
    assert cli.main(["audit", str(made["res"])]) == 0  # a directory: all sidecars
    out = capsys.readouterr().out
    assert "OK" in out and "0 changed" in out
    made["outs"][0].write_text("a,b\n1,3\n")  # tamper with the CSV
    assert cli.main(["audit", str(made["outs"][0])]) == 1
    out = capsys.readouterr().out
    assert "CHANGED" in out and "changed output" in out and "main.csv" in out
    assert cli.main(["audit", str(made["root"] / "missing.png")]) == 2
    assert "no provenance sidecar" in capsys.readouterr().err


def test_cli_version_and_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"submerge {__version__}"
    assert cli.main([]) == 2
    assert "audit" in capsys.readouterr().err
    assert "audit" in cli.SUBCOMMANDS
