"""Provenance sidecars for tables and figures, and the audit that checks them later.

Every output of the report stage gets a JSON sidecar ``<file>.json`` (for a table, next
to its CSV, listing every format written). It records:

* ``outputs``: the files written (names relative to the sidecar) with sha256 and size;
* ``inputs``: the exact input files with sha256 and size, each stored both as given
  (``path``) and relative to the sidecar's directory (``rel``, what the audit resolves);
* ``config``: the configuration keys and values that shaped the output (caller's dict);
* ``versions``: python, torch, numpy, pandas, matplotlib, submerge;
* ``git``: the project's commit and whether tracked files were modified (null without git);
* ``command`` and ``created_utc`` (ISO 8601).

:func:`audit` recomputes all hashes and reports what is missing or changed since then.

Example (what a report script does)::

    paths = tables.write_table(df, "results/digits/tables/main_results")
    provenance.write_sidecar(paths, inputs=["results/digits/scores.csv"], config=config)
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from submerge.io.atomic import sha256_file, write_text_atomic

log = logging.getLogger(__name__)

SCHEMA = "submerge.provenance/1"
SIDECAR_SUFFIX = ".json"
VERSION_PACKAGES = ("torch", "numpy", "pandas", "matplotlib")

PathLike = str | os.PathLike


def sidecar_path(output: PathLike) -> Path:
    """The sidecar of ``output``: the same name with ``.json`` appended (``fig.png.json``)."""
    output = Path(output)
    return output.with_name(output.name + SIDECAR_SUFFIX)


def package_versions() -> dict[str, str | None]:
    """Versions of python, torch, numpy, pandas, matplotlib and submerge (None if absent).

    Read from the installed distributions' metadata, so torch is not imported.
    """
    from submerge import __version__

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSION_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["submerge"] = __version__
    return versions


def _git(args: Sequence[str], cwd: Path) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("git %s failed in %s: %s", " ".join(args), cwd, exc)
        return None
    return done.stdout if done.returncode == 0 else None


def git_state(directory: PathLike | None = None) -> dict[str, Any]:
    """``{"commit": sha | None, "dirty": bool | None}`` of the git work tree holding ``directory``.

    ``directory`` defaults to the one holding the submerge package (the project's clone for
    an editable install), falling back to the current directory. ``dirty`` means tracked
    files differ from the commit (untracked files, e.g. results, do not count). Both are
    None when git is absent or the directory is not in a work tree.
    """
    state: dict[str, Any] = {"commit": None, "dirty": None}
    if shutil.which("git") is None:
        return state
    candidates = (
        [Path(directory)]
        if directory is not None
        else [Path(__file__).resolve().parent, Path.cwd()]
    )
    for cwd in candidates:
        commit = _git(["rev-parse", "HEAD"], cwd)
        if commit:
            status = _git(["status", "--porcelain", "--untracked-files=no"], cwd)
            state["commit"] = commit.strip()
            state["dirty"] = None if status is None else bool(status.strip())
            break
    return state


def _file_record(path: Path, base: Path, role: str) -> dict[str, Any]:
    """Outputs are recorded by name (they sit next to the sidecar), inputs by path as given
    and relative to the sidecar's directory."""
    if not path.is_file():
        raise FileNotFoundError(f"provenance: {role} {str(path)!r} does not exist")
    where = (
        {"name": path.name}
        if role == "output"
        else {"path": str(path), "rel": os.path.relpath(path.resolve(), base.resolve())}
    )
    return {**where, "sha256": sha256_file(path), "bytes": path.stat().st_size}


def _json_default(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return value.item()
    raise TypeError(f"{type(value).__name__} {value!r} is not JSON-serialisable")


def write_sidecar(
    outputs: Sequence[PathLike] | PathLike,
    inputs: Iterable[PathLike] = (),
    config: Mapping[str, Any] | None = None,
    command: str | Sequence[str] | None = None,
) -> Path:
    """Write the provenance sidecar of ``outputs`` and return its path.

    The sidecar is ``<outputs[0]>.json`` (pass a table's CSV first); every output must sit
    in the same directory. ``inputs`` are hashed as they are now, so call this right after
    writing the outputs. ``config`` must be JSON-serialisable (tuples become lists, paths strings,
    numpy scalars numbers; NaN is refused).
    ``command`` defaults to ``sys.argv``; a list is joined shell-style.
    Raises FileNotFoundError for a missing input or output, ValueError for bad arguments.
    """
    outs = (
        [Path(outputs)] if isinstance(outputs, (str, os.PathLike)) else [Path(p) for p in outputs]
    )
    if not outs:
        raise ValueError("write_sidecar: no outputs given")
    base = outs[0].parent
    for out in outs:
        if out.parent.resolve() != base.resolve():
            raise ValueError(
                f"write_sidecar: output {str(out)!r} is not in the directory of {str(outs[0])!r}"
            )
    if command is None:
        command = sys.argv
    if not isinstance(command, str):
        command = shlex.join(str(c) for c in command)
    try:
        config_json = json.loads(
            json.dumps(dict(config or {}), sort_keys=True, allow_nan=False, default=_json_default)
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"write_sidecar: config is not JSON-serialisable: {exc}") from exc

    record = {
        "schema": SCHEMA,
        "outputs": [_file_record(out, base, "output") for out in outs],
        "inputs": [_file_record(Path(p), base, "input") for p in inputs],
        "config": config_json,
        "versions": package_versions(),
        "git": git_state(),
        "command": command,
        "workdir": str(Path.cwd()),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    path = sidecar_path(outs[0])
    write_text_atomic(path, json.dumps(record, indent=2, sort_keys=False) + "\n")
    log.info(
        "wrote provenance sidecar %s (%d outputs, %d inputs)",
        path,
        len(outs),
        len(record["inputs"]),
    )
    return path


# ---------------------------------------------------------------------------------- audit


@dataclass(frozen=True)
class Finding:
    """One file checked by :func:`audit`.

    role: "input" or "output"; status: "ok", "missing" or "changed";
    recorded / actual: sha256 when the sidecar was written / now (None if missing).
    """

    role: str
    path: Path
    status: str
    recorded: str
    actual: str | None


@dataclass(frozen=True)
class AuditResult:
    """What :func:`audit` found for one sidecar."""

    sidecar: Path
    created_utc: str | None
    command: str | None
    git: Mapping[str, Any]
    findings: tuple[Finding, ...]

    @property
    def ok(self) -> bool:
        """True when every recorded input and output exists with its recorded hash."""
        return all(f.status == "ok" for f in self.findings)

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.status != "ok"]

    def report(self, verbose: bool = False) -> str:
        """A readable multi-line report (only the problems unless ``verbose``)."""
        n_out = sum(f.role == "output" for f in self.findings)
        n_in = len(self.findings) - n_out
        head = "OK     " if self.ok else "CHANGED"
        commit = (self.git or {}).get("commit")
        dirty = " (dirty)" if (self.git or {}).get("dirty") else ""
        lines = [
            f"{head} {self.sidecar}  (outputs: {n_out}, inputs: {n_in}; made "
            f"{self.created_utc or '?'} at commit {commit[:12] if commit else '?'}{dirty})"
        ]
        for f in self.findings:
            if f.status == "ok" and not verbose:
                continue
            if f.status == "missing":
                detail = "file is missing"
            elif f.status == "changed":
                detail = f"sha256 {f.recorded[:12]}… -> {f.actual[:12]}…"
            else:
                detail = "unchanged"
            lines.append(f"  {f.status:<8}{f.role:<7} {f.path}: {detail}")
        return "\n".join(lines)


def _load_sidecar(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("schema") == SCHEMA else None


def find_sidecar(path: PathLike) -> Path:
    """The sidecar for ``path``: ``path`` itself if it is a sidecar, else ``<path>.json``,
    else a sidecar in the same directory that lists ``path`` among its outputs (a table's
    .md/.tex are recorded in the sidecar of its .csv).

    Raises FileNotFoundError when there is none, ValueError when ``<path>.json`` is not one.
    """
    path = Path(path)
    if is_sidecar(path):
        return path
    candidate = sidecar_path(path)
    if candidate.is_file():
        if _load_sidecar(candidate) is None:
            raise ValueError(f"audit: {str(candidate)!r} is not a {SCHEMA} sidecar")
        return candidate
    if path.parent.is_dir():
        for other in sorted(path.parent.glob("*" + SIDECAR_SUFFIX)):
            data = _load_sidecar(other)
            names = [o.get("name") for o in (data or {}).get("outputs", []) if isinstance(o, dict)]
            if path.name in names:
                return other
    raise FileNotFoundError(
        f"audit: no provenance sidecar for {str(path)!r} "
        f"(looked for {str(candidate)!r} and sidecars listing it)"
    )


def is_sidecar(path: PathLike) -> bool:
    """True when ``path`` is a readable provenance sidecar."""
    path = Path(path)
    return path.suffix == SIDECAR_SUFFIX and path.is_file() and _load_sidecar(path) is not None


def _check(role: str, path: Path, recorded: str) -> Finding:
    if not path.is_file():
        return Finding(role, path, "missing", recorded, None)
    actual = sha256_file(path)
    return Finding(role, path, "ok" if actual == recorded else "changed", recorded, actual)


def audit(path: PathLike) -> AuditResult:
    """Recompute the hashes of everything a sidecar recorded and say what changed.

    ``path`` is a sidecar or an output that has one. Inputs are found relative to the
    sidecar's directory (so moving the whole results tree keeps the audit working).
    Raises FileNotFoundError / ValueError when there is no valid sidecar.
    """
    sidecar = find_sidecar(path)
    data = _load_sidecar(sidecar)
    base = sidecar.parent
    findings: list[Finding] = []
    try:
        for out in data["outputs"]:
            findings.append(_check("output", base / out["name"], out["sha256"]))
        for inp in data["inputs"]:
            findings.append(
                _check("input", Path(os.path.normpath(base / inp["rel"])), inp["sha256"])
            )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"audit: sidecar {str(sidecar)!r} is malformed ({exc!r})") from exc
    return AuditResult(
        sidecar=sidecar,
        created_utc=data.get("created_utc"),
        command=data.get("command"),
        git=data.get("git") or {},
        findings=tuple(findings),
    )
