"""Provenance sidecars for tables and figures, and the audit that checks them later.

Every output of the report stage gets a JSON sidecar ``<file>.json`` (for a table, next
to its CSV, listing every format written; for a figure, next to its PDF, listing the PNG
too). It records:

* ``outputs``: the files written (names relative to the sidecar) with sha256 and size;
* ``inputs``: the exact input files with sha256 and size, each stored both as given
  (``path``) and relative to the sidecar's directory (``rel``, what the audit resolves),
  and ``sidecar``: where that input's own provenance is (its provenance sidecar, or the
  JSON sidecar of a normalised checkpoint, which also gives ``source_sha256``), relative
  to this sidecar's directory, or null when it has none;
* ``config``: the configuration keys and values that shaped the output (caller's dict);
* ``versions``: python, torch, numpy, pandas, matplotlib, submerge;
* ``git``: the project's commit and whether tracked files were modified (null without git);
* ``code``: :func:`code_version` (git commit and dirty flag plus a sha256 of the installed
  submerge package's source, which identifies the code of an uncommitted tree too);
* ``command``: the command line; when it is a Snakemake temporary script
  (``.snakemake/scripts/tmpXXXX.name.py``, deleted after the job) the stable script path
  is recorded instead, and ``script`` holds that path, its sha256 and the rule name;
* ``workdir`` and ``created_utc`` (ISO 8601).

:func:`audit` recomputes all hashes and reports what is missing or changed since then,
following the chain upstream: every input that has a provenance sidecar is audited in
turn, and a normalised checkpoint is checked against the sha256 in its JSON sidecar.
:func:`provenance_chain` returns that chain as a tree (:func:`render_chain` prints it, down
to the checkpoints' sha256); an input without any sidecar ends its branch ("no provenance
recorded"). :func:`scan_directory` finds the sidecars under a results directory and names
the tables and figures whose sidecar is missing or unreadable.

Example (what a report script does)::

    paths = tables.write_table(df, "results/digits/tables/main_results")
    provenance.write_sidecar(paths, inputs=["results/digits/scores.csv"], config=config)
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
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
# A ``<name><suffix>.json`` with one of these suffixes is meant to be a provenance sidecar
# (``main.csv.json``); a checkpoint's ``base.json`` or a grid point's ``a0.3.json`` is not.
OUTPUT_SUFFIXES = (".csv", ".md", ".tex", ".pdf", ".png", ".svg", ".h5", ".json", ".txt")
# In a results directory these outputs must have a sidecar (a figure's PNG is listed in the
# sidecar of its PDF); other files need not.
REQUIRED_SIDECARS = {"tables": (".csv",), "figures": (".pdf", ".png")}
CHECKPOINT_SUFFIX = ".safetensors"  # io.checkpoints.save_normalized: sidecar path.with_suffix(".json")

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


def _git_toplevel(directory: Path) -> Path | None:
    if shutil.which("git") is None or not directory.is_dir():
        return None
    top = _git(["rev-parse", "--show-toplevel"], directory)
    return Path(top.strip()) if top and top.strip() else None


# ----------------------------------------------------------------------------------- code


def source_hash(package_dir: PathLike) -> tuple[str, int]:
    """``(sha256, n_files)`` of the ``.py`` files under ``package_dir`` (``__pycache__``
    excluded): sha256 over, for each file in sorted order of its POSIX path relative to
    ``package_dir``, that path, a NUL byte and the sha256 of the file's bytes."""
    root = Path(package_dir)
    files = sorted(
        (p.relative_to(root).as_posix(), p)
        for p in root.rglob("*.py")
        if p.is_file() and "__pycache__" not in p.relative_to(root).parts
    )
    digest = hashlib.sha256()
    for rel, path in files:
        digest.update(rel.encode("utf-8") + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest(), len(files)


def code_version() -> dict[str, Any]:
    """Which code made a result: ``{"submerge": version, "commit": sha | None,
    "dirty": bool | None, "package_sha256": hex, "package_files": n}``.

    ``commit``/``dirty`` are :func:`git_state`; ``package_sha256`` is :func:`source_hash`
    of the imported submerge package, so results made from an uncommitted (dirty) tree or
    an installed copy without git still identify their code. JSON-serialisable; cheap
    enough to call once per result file (two git calls and one read of the sources).
    """
    import submerge

    package_sha256, n_files = source_hash(Path(submerge.__file__).resolve().parent)
    return {
        "submerge": submerge.__version__,
        **git_state(),
        "package_sha256": package_sha256,
        "package_files": n_files,
    }


# -------------------------------------------------------------------------------- command

_SNAKEMAKE_SCRIPT = re.compile(r"(?:^|/)\.snakemake/scripts/tmp[^/.]*\.(?P<name>[^/]+\.py)$")


def script_record(
    argv: Sequence[str] | None = None, main: Any = None
) -> tuple[str, dict[str, Any] | None]:
    """``(command, script)`` to record for the command line ``argv`` (default ``sys.argv``).

    Snakemake runs a ``script:`` as ``python .snakemake/scripts/tmp<random>.<name>.py`` and
    deletes that file afterwards. Such an argument is replaced by the stable script path:
    the original file Snakemake names in the script's ``__file__`` (the ``__main__`` module,
    or ``main``), else ``scripts/<name>`` beside ``.snakemake``; relative to the git
    toplevel (else to the directory holding ``.snakemake``) when inside it. ``script`` is
    then ``{"path", "sha256" (None if unreadable), "rule" (from the ``snakemake`` object of
    the script, else None), "temp" (the temporary path)}``, otherwise None.
    """
    args = [str(a) for a in (sys.argv if argv is None else argv)]
    script = None
    for i, arg in enumerate(args):
        match = _SNAKEMAKE_SCRIPT.search(arg)
        if match is None:
            continue
        name = match.group("name")
        root = Path(arg[: match.start()] or ".")
        if main is None:
            main = sys.modules.get("__main__")
        main_file = getattr(main, "__file__", None)
        original = (
            Path(main_file)
            if main_file
            and Path(main_file).name == name
            and ".snakemake" not in Path(main_file).parts
            else root / "scripts" / name
        )
        top = _git_toplevel(root) or root
        try:
            stable = original.resolve().relative_to(top.resolve()).as_posix()
        except ValueError:
            stable = str(original)
        rule = getattr(getattr(main, "snakemake", None), "rule", None)
        script = {
            "path": stable,
            "sha256": sha256_file(original) if original.is_file() else None,
            "rule": rule if isinstance(rule, str) else None,
            "temp": arg,
        }
        args[i] = stable
        break
    return shlex.join(args), script


def _command(command: str | Sequence[str]) -> tuple[str, dict[str, Any] | None]:
    """:func:`script_record` of a command given as a list or a string (a string without a
    Snakemake temporary script is kept as it is)."""
    if not isinstance(command, str):
        return script_record(command)
    try:
        tokens = shlex.split(command)
    except ValueError:
        return command, None
    if any(_SNAKEMAKE_SCRIPT.search(t) for t in tokens):
        return script_record(tokens)
    return command, None


# -------------------------------------------------------------------------------- sidecar


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
    writing the outputs; each input's own sidecar (provenance or checkpoint) is pointed to.
    ``config`` must be JSON-serialisable (tuples become lists, paths strings, numpy scalars
    numbers; NaN is refused). ``command`` defaults to ``sys.argv``; a list is joined
    shell-style; a Snakemake temporary script in it is replaced by its stable path
    (:func:`script_record`).
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
    command, script = _command(sys.argv if command is None else command)
    try:
        config_json = json.loads(
            json.dumps(dict(config or {}), sort_keys=True, allow_nan=False, default=_json_default)
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"write_sidecar: config is not JSON-serialisable: {exc}") from exc

    walker = _Walker()
    input_records = []
    for p in inputs:
        path = Path(p)
        record = _file_record(path, base, "input")
        kind, upstream, meta = walker.locate(path)
        if kind == "invalid":
            log.warning("provenance: the sidecar %s of input %s is unreadable (%s); not "
                        "recording it", upstream, path, meta)
        record["sidecar"] = (
            os.path.relpath(upstream.resolve(), base.resolve())
            if upstream is not None and kind in ("provenance", "checkpoint")
            else None
        )
        if kind == "checkpoint" and isinstance(meta.get("source_sha256"), str):
            record["source_sha256"] = meta["source_sha256"]
        input_records.append(record)
    code = code_version()
    record = {
        "schema": SCHEMA,
        "outputs": [_file_record(out, base, "output") for out in outs],
        "inputs": input_records,
        "config": config_json,
        "versions": package_versions(),
        "git": {"commit": code["commit"], "dirty": code["dirty"]},
        "code": code,
        "command": command,
        "script": script,
        "workdir": str(Path.cwd()),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    path = sidecar_path(outs[0])
    record["sidecar_sha256"] = _record_digest(record)  # a changed digit in it is reported
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

    role: "input" or "output" (against a provenance sidecar), "checkpoint" (a normalised
    checkpoint against the sha256 in its JSON sidecar) or "sidecar" (an upstream sidecar
    that is recorded but missing, or unreadable); status: "ok", "missing", "changed" or
    "invalid"; recorded / actual: sha256 when the sidecar was written / now (None if
    missing); via: the sidecar that recorded it when it is upstream of the audited sidecar
    (None for the audited sidecar's own outputs and inputs); detail: why it is invalid.
    """

    role: str
    path: Path
    status: str
    recorded: str
    actual: str | None
    via: Path | None = None
    detail: str = ""

    def describe(self) -> str:
        if self.status == "missing":
            text = "file is missing"
        elif self.status == "changed":
            text = f"sha256 {self.recorded[:12]}… -> {(self.actual or '?')[:12]}…"
        elif self.status == "invalid":
            text = self.detail or "invalid"
        else:
            text = "unchanged"
        return text + (f" (recorded in {self.via})" if self.via is not None else "")


@dataclass(frozen=True)
class AuditResult:
    """What :func:`audit` found for one sidecar: ``findings`` for its own outputs and
    inputs, ``upstream`` for the sidecars its inputs lead to (their outputs, inputs and
    checkpoints, recursively)."""

    sidecar: Path
    created_utc: str | None
    command: str | None
    git: Mapping[str, Any]
    findings: tuple[Finding, ...]
    upstream: tuple[Finding, ...] = ()

    @property
    def ok(self) -> bool:
        """True when every recorded file, here and upstream, exists with its recorded hash."""
        return all(f.status == "ok" for f in (*self.findings, *self.upstream))

    @property
    def problems(self) -> list[Finding]:
        return [f for f in (*self.findings, *self.upstream) if f.status != "ok"]

    def report(self, verbose: bool = False) -> str:
        """A readable multi-line report (only the problems unless ``verbose``)."""
        n_out = sum(f.role == "output" for f in self.findings)
        n_in = len(self.findings) - n_out
        head = "OK     " if self.ok else "CHANGED"
        commit = (self.git or {}).get("commit")
        dirty = " (dirty)" if (self.git or {}).get("dirty") else ""
        upstream = f", upstream: {len(self.upstream)}" if self.upstream else ""
        lines = [
            f"{head} {self.sidecar}  (outputs: {n_out}, inputs: {n_in}{upstream}; made "
            f"{self.created_utc or '?'} at commit {commit[:12] if commit else '?'}{dirty})"
        ]
        for f in (*self.findings, *self.upstream):
            if f.status == "ok" and not verbose:
                continue
            lines.append(f"  {f.status:<8}{f.role:<7} {f.path}: {f.describe()}")
        return "\n".join(lines)


@dataclass(frozen=True)
class ChainNode:
    """One file of a provenance chain (:func:`provenance_chain`).

    ``finding``: the file checked against the hash recorded by the sidecar one step down
    the chain (for the root, against its own sidecar). ``kind``: "provenance" (it has a
    provenance sidecar: ``children`` are its inputs), "checkpoint" (a normalised checkpoint:
    ``info`` holds its JSON sidecar's sha256 / source_sha256 / source), "none" (no sidecar:
    no provenance recorded), "invalid" (its sidecar is unreadable or recorded but missing)
    or "repeat" (already shown above in the tree). ``findings``: the checks made at its
    sidecar (its outputs and inputs, or the checkpoint's hash), with ``via`` = that sidecar.
    """

    path: Path
    finding: Finding | None
    kind: str
    sidecar: Path | None = None
    info: Mapping[str, Any] | None = None
    findings: tuple[Finding, ...] = ()
    children: tuple["ChainNode", ...] = ()

    def walk(self):
        """This node and all below it, depth first."""
        yield self
        for child in self.children:
            yield from child.walk()

    @property
    def ok(self) -> bool:
        return all(
            (n.finding is None or n.finding.status == "ok")
            and all(f.status == "ok" for f in n.findings)
            for n in self.walk()
        )


def _read_json(path: Path) -> tuple[Any, str]:
    """``(data, "")``, or ``(None, why not)`` when ``path`` is not readable JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8")), ""
    except FileNotFoundError:
        return None, "file is missing"
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"unreadable ({exc})"
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON ({exc})"


def _record_digest(record: Mapping[str, Any]) -> str:
    """sha256 of a sidecar's fields other than ``sidecar_sha256`` (canonical JSON)."""
    body = {k: v for k, v in record.items() if k != "sidecar_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _sidecar_problem(path: Path) -> str:
    """"" when ``path`` is a readable provenance sidecar, else why not."""
    data, why = _read_json(path)
    if why:
        return why
    if not isinstance(data, dict):
        return f"not a JSON object ({type(data).__name__})"
    if data.get("schema") != SCHEMA:
        return f"schema {data.get('schema')!r} is not {SCHEMA!r}"
    if not isinstance(data.get("outputs"), list) or not isinstance(data.get("inputs"), list):
        return "no 'outputs' / 'inputs' lists"
    if "sidecar_sha256" in data and data["sidecar_sha256"] != _record_digest(data):
        return "changed after it was written (its sidecar_sha256 does not match)"
    return ""


def _load_sidecar(path: Path) -> dict | None:
    return None if _sidecar_problem(path) else _read_json(path)[0]


def is_sidecar(path: PathLike) -> bool:
    """True when ``path`` is a readable provenance sidecar."""
    path = Path(path)
    return path.suffix == SIDECAR_SUFFIX and path.is_file() and _load_sidecar(path) is not None


def looks_like_sidecar(path: PathLike) -> bool:
    """True when ``path`` is named like a provenance sidecar (``<name><output suffix>.json``,
    e.g. ``main.csv.json``) or, being JSON, claims a ``submerge.provenance`` schema."""
    path = Path(path)
    if path.suffix != SIDECAR_SUFFIX:
        return False
    if Path(path.stem).suffix.lower() in OUTPUT_SUFFIXES:
        return True
    data, why = _read_json(path)
    return (
        not why
        and isinstance(data, dict)
        and str(data.get("schema", "")).startswith("submerge.provenance")
    )


def _listing_sidecar(path: Path) -> Path | None:
    """A sidecar in the directory of ``path`` listing it among its outputs (a table's
    .md/.tex are recorded in the sidecar of its .csv, a figure's PNG in that of its PDF)."""
    if not path.parent.is_dir():
        return None
    for other in sorted(path.parent.glob("*" + SIDECAR_SUFFIX)):
        if other == path or Path(other.stem).suffix.lower() not in OUTPUT_SUFFIXES:
            continue
        data = _load_sidecar(other)
        names = [o.get("name") for o in (data or {}).get("outputs", []) if isinstance(o, dict)]
        if path.name in names:
            return other
    return None


def find_sidecar(path: PathLike) -> Path:
    """The sidecar for ``path``: ``path`` itself if it is a sidecar, else ``<path>.json``,
    else a sidecar in the same directory that lists ``path`` among its outputs (a table's
    .md/.tex are recorded in the sidecar of its .csv).

    Raises FileNotFoundError when there is none, ValueError when ``<path>.json`` (or
    ``path``, named like a sidecar) is not a readable sidecar, naming the file and why.
    """
    path = Path(path)
    if is_sidecar(path):
        return path
    candidate = sidecar_path(path)
    if candidate.is_file():
        why = _sidecar_problem(candidate)
        if why:
            raise ValueError(f"audit: {str(candidate)!r} is not a {SCHEMA} sidecar: {why}")
        return candidate
    listing = _listing_sidecar(path)
    if listing is not None:
        return listing
    if path.is_file() and looks_like_sidecar(path):
        raise ValueError(f"audit: {str(path)!r} is not a {SCHEMA} sidecar: {_sidecar_problem(path)}")
    raise FileNotFoundError(
        f"audit: no provenance sidecar for {str(path)!r} "
        f"(looked for {str(candidate)!r} and sidecars listing it)"
    )


def _input_path(base: Path, record: Mapping[str, Any]) -> Path:
    return Path(os.path.normpath(base / record["rel"]))


class _Walker:
    """Follows sidecars upstream, hashing each file once."""

    def __init__(self, hashes: dict[Path, str | None] | None = None):
        self.hashes = {} if hashes is None else hashes
        self.expanded: set[Path] = set()

    def sha(self, path: Path) -> str | None:
        key = Path(os.path.abspath(path))
        if key not in self.hashes:
            self.hashes[key] = sha256_file(path) if path.is_file() else None
        return self.hashes[key]

    def check(self, role: str, path: Path, recorded: str, via: Path | None) -> Finding:
        actual = self.sha(path)
        status = "missing" if actual is None else ("ok" if actual == recorded else "changed")
        return Finding(role, path, status, recorded, actual, via)

    def findings(self, sidecar: Path, data: Mapping, via: Path | None) -> list[Finding]:
        base = sidecar.parent
        try:
            found = [
                self.check("output", base / out["name"], out["sha256"], via)
                for out in data["outputs"]
            ]
            found += [
                self.check("input", _input_path(base, inp), inp["sha256"], via)
                for inp in data["inputs"]
            ]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"audit: sidecar {str(sidecar)!r} is malformed ({exc!r})") from exc
        return found

    @staticmethod
    def locate(path: Path, pointer: Path | None = None) -> tuple[str, Path | None, Any]:
        """Where the provenance of ``path`` is: ``(kind, sidecar, data or why)``, kind being
        "provenance", "checkpoint", "none" or "invalid" (then data says why). ``pointer``:
        the sidecar recorded for it (it must then exist)."""
        candidates = []
        if pointer is not None:
            candidates.append(pointer)
        else:
            candidates.append(sidecar_path(path))
            if path.suffix == CHECKPOINT_SUFFIX:
                candidates.append(path.with_suffix(SIDECAR_SUFFIX))
        for sidecar in candidates:
            if not sidecar.is_file():
                if pointer is not None:
                    return "invalid", sidecar, "recorded sidecar is missing"
                continue
            data, why = _read_json(sidecar)
            if sidecar.name == path.name + SIDECAR_SUFFIX or (
                isinstance(data, dict)
                and str(data.get("schema", "")).startswith("submerge.provenance")
            ):  # a provenance sidecar
                why = _sidecar_problem(sidecar)
                return ("invalid", sidecar, why) if why else (
                    "provenance", sidecar, _load_sidecar(sidecar))
            if why or not isinstance(data, dict):  # else a checkpoint's sidecar
                return "invalid", sidecar, why or "checkpoint sidecar is not a JSON object"
            return "checkpoint", sidecar, data
        listing = _listing_sidecar(path) if path.suffix in OUTPUT_SUFFIXES else None
        if listing is not None:
            return "provenance", listing, _load_sidecar(listing)
        return "none", None, None

    def provenance_node(
        self, path: Path, finding: Finding | None, sidecar: Path, data: Mapping, root: bool
    ) -> ChainNode:
        info = {
            "created_utc": data.get("created_utc"),
            "git": data.get("git"),
            "code": data.get("code"),
            "command": data.get("command"),
            "script": data.get("script"),
        }
        key = Path(os.path.abspath(sidecar))
        if key in self.expanded:
            return ChainNode(path, finding, "repeat", sidecar, info)
        self.expanded.add(key)
        via = None if root else sidecar
        findings = self.findings(sidecar, data, via)
        if root and finding is None:  # the root: itself against its own sidecar
            finding = next(
                (f for f in findings if f.role == "output" and f.path.name == path.name), None
            )
        children = []
        for inp in data["inputs"]:
            in_path = _input_path(sidecar.parent, inp)
            pointer = inp.get("sidecar")
            pointer = pointer if isinstance(pointer, str) and pointer else None
            children.append(
                self.node(
                    in_path,
                    self.check("input", in_path, inp["sha256"], sidecar),
                    Path(os.path.normpath(sidecar.parent / pointer)) if pointer else None,
                )
            )
        return ChainNode(path, finding, "provenance", sidecar, info, tuple(findings), tuple(children))

    def node(self, path: Path, finding: Finding, pointer: Path | None = None) -> ChainNode:
        kind, sidecar, data = self.locate(path, pointer)
        if kind == "provenance":
            try:
                return self.provenance_node(path, finding, sidecar, data, root=False)
            except ValueError as exc:
                kind, data = "invalid", str(exc)
        if kind == "invalid":
            key = Path(os.path.abspath(sidecar))
            bad = () if key in self.expanded else (
                Finding("sidecar", sidecar, "invalid", "", None, finding.via, data),)
            self.expanded.add(key)
            return ChainNode(path, finding, "invalid", sidecar, {"why": data}, bad)
        if kind == "checkpoint":
            info = {k: data.get(k) for k in ("sha256", "source_sha256", "source") if k in data}
            findings = ()
            key = Path(os.path.abspath(sidecar))
            if isinstance(data.get("sha256"), str) and key not in self.expanded:  # check once
                self.expanded.add(key)
                findings = (self.check("checkpoint", path, data["sha256"], sidecar),)
            return ChainNode(path, finding, "checkpoint", sidecar, info, findings)
        return ChainNode(path, finding, "none")


def provenance_chain(
    path: PathLike, hashes: dict[Path, str | None] | None = None
) -> ChainNode:
    """The provenance tree of ``path`` (an output with a sidecar, or the sidecar itself):
    its inputs, their inputs (through their provenance sidecars), and so on down to the
    normalised checkpoints (their JSON sidecar's sha256) or to files without provenance.

    Every file is hashed and checked against what the sidecar one step down recorded (a file
    reached twice is expanded once). ``hashes``: a dict shared between calls caches file
    hashes (keyed by absolute path). Raises FileNotFoundError / ValueError when ``path`` has
    no valid sidecar (an unreadable sidecar upstream is reported in the tree instead).
    """
    path = Path(path)
    sidecar = find_sidecar(path)
    data = _load_sidecar(sidecar)
    if path == sidecar:
        outputs = data.get("outputs") or [{}]
        name = outputs[0].get("name") if isinstance(outputs[0], Mapping) else None
        path = sidecar.parent / name if name else sidecar
    return _Walker(hashes).provenance_node(path, None, sidecar, data, root=True)


def audit(
    path: PathLike, follow: bool = True, hashes: dict[Path, str | None] | None = None
) -> AuditResult:
    """Recompute the hashes of everything a sidecar recorded and say what changed.

    ``path`` is a sidecar or an output that has one. Inputs are found relative to the
    sidecar's directory (so moving the whole results tree keeps the audit working). With
    ``follow``, the chain upstream is audited too (:func:`provenance_chain`): the outputs and
    inputs of every input's own provenance sidecar, recursively, and every normalised
    checkpoint against the sha256 of its JSON sidecar (in :attr:`AuditResult.upstream`).
    Raises FileNotFoundError / ValueError when there is no valid sidecar.
    """
    sidecar = find_sidecar(path)
    data = _load_sidecar(sidecar)
    walker = _Walker(hashes)
    upstream: list[Finding] = []
    if follow:
        root = walker.provenance_node(sidecar, None, sidecar, data, root=True)
        findings = root.findings
        for node in root.walk():
            if node is root:
                continue
            upstream += node.findings
    else:
        findings = tuple(walker.findings(sidecar, data, None))
    return AuditResult(
        sidecar=sidecar,
        created_utc=data.get("created_utc"),
        command=data.get("command"),
        git=data.get("git") or {},
        findings=tuple(findings),
        upstream=tuple(upstream),
    )


def render_chain(node: ChainNode, full: bool = True) -> str:
    """The tree of :func:`provenance_chain` as text, one file a line with its status and
    sha256 (``full``: all 64 hex digits), then what its provenance says."""
    lines: list[str] = []

    def digest(value: Any) -> str:
        if not isinstance(value, str):
            return "?"
        return value if full else value[:12] + "…"

    def emit(n: ChainNode, prefix: str, last: bool, top: bool) -> None:
        branch = "" if top else ("└── " if last else "├── ")
        status = n.finding.status if n.finding is not None else "ok"
        actual = n.finding.actual if n.finding is not None else None
        sha = f"sha256 {digest(actual)}" if actual else "file is missing"
        if n.finding is not None and n.finding.status == "changed":
            sha += f" (recorded {digest(n.finding.recorded)})"
        lines.append(f"{prefix}{branch}{n.path}  [{status}]  {sha}")
        inner = prefix + ("" if top else ("    " if last else "│   "))
        info = n.info or {}
        pad = inner + ("│   " if n.children else "    ")
        if n.kind in ("provenance", "repeat"):
            git = info.get("git") or {}
            commit = git.get("commit")
            script = info.get("script") or {}
            made = (
                f"made {info.get('created_utc') or '?'} at commit "
                f"{commit[:12] if commit else '?'}{' (dirty)' if git.get('dirty') else ''}"
            )
            code = info.get("code") or {}
            if code.get("package_sha256"):
                made += f", package {code['package_sha256'][:12]}…"
            by = script.get("path") or info.get("command")
            if by:
                made += f", by {by}" + (f" (rule {script['rule']})" if script.get("rule") else "")
            lines.append(f"{pad}provenance {n.sidecar}: {made}")
            if n.kind == "repeat":
                lines.append(f"{pad}(inputs shown above)")
        elif n.kind == "checkpoint":
            parts = [f"sha256 {digest(info.get('sha256'))}"]
            if "source_sha256" in info:
                parts.append(f"source_sha256 {digest(info.get('source_sha256'))}")
            lines.append(f"{pad}checkpoint {n.sidecar}: " + ", ".join(parts))
        elif n.kind == "invalid":
            lines.append(f"{pad}INVALID sidecar {n.sidecar}: {info.get('why')}")
        else:
            lines.append(f"{pad}no provenance recorded")
        for f in n.findings:
            if f.status != "ok" and f.role != "input":  # inputs show as the children
                lines.append(f"{pad}{f.status.upper()} {f.role} {f.path}: {f.describe()}")
        for i, child in enumerate(n.children):
            emit(child, inner, i == len(n.children) - 1, False)

    emit(node, "", True, True)
    return "\n".join(lines)


def scan_directory(directory: PathLike) -> tuple[list[Path], list[str]]:
    """``(sidecars, errors)`` under ``directory``: every readable provenance sidecar, and an
    error naming each file that is named like a sidecar but is not a readable one (garbage,
    truncated, wrong schema) and each table (``tables/*.csv``) or figure
    (``figures/*.pdf``, ``figures/*.png``) that has no sidecar. Other files need none."""
    directory = Path(directory)
    sidecars, errors, bad = [], [], set()
    for path in sorted(directory.rglob("*" + SIDECAR_SUFFIX)):
        if not path.is_file():
            continue
        if is_sidecar(path):
            sidecars.append(path)
        elif looks_like_sidecar(path):
            bad.add(path)
            errors.append(f"{path}: not a valid provenance sidecar: {_sidecar_problem(path)}")
    for path in sorted(directory.rglob("*")):
        suffixes = REQUIRED_SIDECARS.get(path.parent.name, ())
        if path.suffix.lower() not in suffixes or not path.is_file():
            continue
        if sidecar_path(path).is_file() or _listing_sidecar(path) is not None:
            continue  # (an unreadable one is reported above)
        if any(b.parent == path.parent and b.name.startswith(path.stem + ".") for b in bad):
            continue  # e.g. the PNG of a figure whose PDF's sidecar is garbage
        errors.append(
            f"{path}: no provenance sidecar (expected {sidecar_path(path)} or a sidecar listing it)"
        )
    return sidecars, errors
