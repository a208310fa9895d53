"""Fault injection on a finished tiny run, and ``kill -9`` in the middle of one.

1. Every kind of file the pipeline writes is damaged, on a copy: truncated to half, a byte
   flipped (XOR 0xFF), emptied, replaced by garbage, a key or dataset deleted, a digit changed
   (one bit: the JSON still parses). The reader the pipeline uses for that kind must refuse it
   with ONE line naming the file (and the key, for a deleted HDF5 dataset) and saying what to
   do ("delete ... rerun"); the results cache must count the entry as absent. Where no reader
   can tell (a JSON/CSV result that still parses, a table, a figure, a provenance sidecar),
   ``submerge audit results/<suite>`` must report the file. A case where a reader returns
   data that differ from the undamaged file's without an error is a failure ("silent"); so is
   any other exception ("crash": no file named, nothing to do). Heads carry their sha256 and
   their sidecar's; provenance sidecars carry their own hash (``sidecar_sha256``).
2. ``kill -9`` of the whole Snakemake session when a given file appears (the first expert's
   model, the first merged cache, the first sweep's test point), one after another in the same
   working directory; after each kill every file under a final name is complete, then the
   run goes on; its scores.csv must equal, byte for byte, that of an uninterrupted run (made at
   the same time in another directory), and no temporary file may be left.

   What a user does after a killed run (the test does the same)::

       snakemake --unlock ...              # Snakemake's lock of the killed run is stale
       snakemake --rerun-incomplete ...    # redo the jobs the kill interrupted

   Temporaries (``.<name>.tmp-<host>-<pid>-<token><suffix>.tmp``) of killed writers are removed
   by the next run once they are a minute old (``clean_stale_temporaries``, Snakefile onstart);
   the test ages them instead of waiting.

The counts (cases tried / detected per kind, kill points) are printed (``pytest -s``) and put
in the assertion messages.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import h5py
import pytest
import torch

from submerge import cli
from submerge.data.heads import load_head
from submerge.errors import SubmergeError
from submerge.io import hdf5
from submerge.io.checkpoints import load_normalized
from submerge.io.hogsvd_cache import read_hogsvd_cache
from submerge.io.jsonio import read_json
from submerge.io.results_cache import ResultsCache
from workflow_utils import ROOT, load_tiny, write_config

pytestmark = pytest.mark.slow

SUITE = "tiny"
R = f"results/{SUITE}"
RUN_TIMEOUT = 900  # seconds, one Snakemake invocation


def _config() -> dict:
    """tiny.yaml cut down: 2 experts, one group, ta and ta_sb, one grid point."""
    cfg = copy.deepcopy(load_tiny())
    cfg["experts"] = {e: cfg["experts"][e] for e in ("rot90", "parity")}
    cfg["groups"] = {"g2": ["rot90", "parity"]}
    cfg["methods"] = {"ta": {"merge": "task_arithmetic"},
                      "ta_sb": {"merge": "task_arithmetic", "boost": {}}}
    cfg["grid"] = {"alpha": [0.5], "beta": [0.0]}
    return cfg


def _command(workdir: Path, configfile: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(workdir),
            "--configfile", str(configfile), "--cores", "2", *args]


def _run(workdir: Path, configfile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(_command(workdir, configfile, *args), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT)


def _tail(text: str, n: int = 3000) -> str:
    return text[-n:]


# ------------------------------------------------------------------ kill -9 helpers


def _session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp session ...
        if fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(entry.name))
    return pids


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL to every process of the session ``proc`` leads (Snakemake and its jobs)."""
    sid = proc.pid  # start_new_session: the session and process group id
    with contextlib.suppress(ProcessLookupError):
        os.killpg(sid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while (pids := _session_pids(sid)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    proc.wait(timeout=30)
    assert not _session_pids(sid), f"processes of the killed session survive: {_session_pids(sid)}"


def _wait_for(workdir: Path, pattern: str, proc: subprocess.Popen, timeout: float) -> Path | None:
    """The first file matching ``pattern`` (a glob under ``workdir``), or None when the run
    ends (or ``timeout`` passes) before one appears."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hits = sorted(p for p in workdir.glob(pattern) if not p.name.startswith("."))
        if hits:
            return hits[0]
        if proc.poll() is not None:
            return None
        time.sleep(0.02)
    return None


def _temporaries(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob(".*.tmp") if p.is_file())


def _unreadable_final_files(root: Path) -> list[str]:
    """Files under a final name that are not complete (a partial write would show here)."""
    from safetensors import safe_open

    bad = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        try:
            if path.suffix == ".h5":
                with h5py.File(path, "r", locking=False) as f:
                    if hdf5.MANIFEST not in f and "hogsvd" not in path.parts:
                        raise ValueError("no manifest")
                    f.visit(lambda name: None)
            elif path.suffix == ".safetensors":
                with safe_open(str(path), "pt") as f:
                    for key in f.keys():
                        f.get_tensor(key)
            elif path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            elif path.suffix == ".csv":
                import pandas as pd

                pd.read_csv(path)
        except Exception as exc:  # noqa: BLE001 - any failure is a partial file
            bad.append(f"{path.relative_to(root)}: {type(exc).__name__}: {exc}")
    return bad


KILL_POINTS = [
    ("first expert model", f"{R}/models/experts/*.safetensors"),
    ("first merged cache", f"{R}/merged/g2/*.h5"),
    ("first sweep's test point", f"{R}/test/g2/*.json"),
]


def _kill_chain(workdir: Path, configfile: Path) -> SimpleNamespace:
    """Run the tiny config to scores.csv, killed (-9) at each kill point in turn, then to the end."""
    target = f"{R}/scores.csv"
    outcomes, plain_rerun = [], None
    for i, (label, pattern) in enumerate(KILL_POINTS):
        with open(workdir / f"run{i}.log", "w") as log:
            proc = subprocess.Popen(_command(workdir, configfile, target, "--rerun-incomplete"),
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                hit = _wait_for(workdir, pattern, proc, RUN_TIMEOUT)
            finally:
                if proc.poll() is None:
                    _kill_session(proc)
        if hit is None:
            outcomes.append({"point": label, "killed": False, "rc": proc.returncode,
                             "log": _tail((workdir / f"run{i}.log").read_text())})
            continue
        root = workdir / R
        temporaries = _temporaries(root)
        outcome = {"point": label, "killed": True, "file": str(hit.relative_to(workdir)),
                   "temporaries": [p.name for p in temporaries],
                   "incomplete_final_files": _unreadable_final_files(root)}
        if plain_rerun is None:
            # what a user who just reruns sees: Snakemake's stale lock, and what to do
            plain_rerun = _run(workdir, configfile, target)
        unlock = _run(workdir, configfile, "--unlock")
        outcome["unlock_rc"] = unlock.returncode
        # the next run removes a killed writer's temporary once it is a minute old
        old = time.time() - 120
        for path in temporaries:
            os.utime(path, (old, old))
        outcomes.append(outcome)
    final = _run(workdir, configfile, target, "--rerun-incomplete")
    return SimpleNamespace(outcomes=outcomes, plain_rerun=plain_rerun, final=final)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run (all targets) and, at the same time, the killed-and-rerun one."""
    cfg = _config()
    full = tmp_path_factory.mktemp("full")
    chain = tmp_path_factory.mktemp("killed")
    full_cfg, chain_cfg = write_config(full, cfg), write_config(chain, cfg)
    start = time.monotonic()
    with open(full / "run.log", "w") as log:
        proc = subprocess.Popen(_command(full, full_cfg), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            try:
                killed = _kill_chain(chain, chain_cfg)
            except Exception as exc:  # noqa: BLE001 - reported by test_kill_9_and_rerun
                killed = exc
            rc = proc.wait(timeout=RUN_TIMEOUT)
        finally:
            if proc.poll() is None:
                _kill_session(proc)
    seconds = time.monotonic() - start
    assert rc == 0, f"uninterrupted run failed ({rc}):\n{_tail((full / 'run.log').read_text())}"
    print(f"\n[fault injection] runs: {seconds:.0f} s (uninterrupted run and killed chain, in parallel)")
    return SimpleNamespace(full=full, chain=chain, killed=killed, seconds=seconds)


# ------------------------------------------------------------------ damage


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _flip_at(fraction: float) -> Callable[[bytes], bytes]:
    def flip(data: bytes) -> bytes:
        i = min(len(data) - 1, int(len(data) * fraction))
        return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
    return flip


def _empty(data: bytes) -> bytes:
    return b""


def _garbage(data: bytes) -> bytes:
    return random.Random(len(data)).randbytes(max(64, len(data)))


def _garbage_json(data: bytes) -> bytes:
    return b'{"sha256": "not json\n'


def _digit_after(data: bytes, start: int) -> bytes:
    """One bit of the first digit at or after ``start`` flipped ('6' <-> '7'), wrapping round."""
    for i in [*range(start, len(data)), *range(start)]:
        if 48 <= data[i] <= 57:
            return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]
    raise AssertionError("no digit to change")


def _digit(data: bytes) -> bytes:
    """A digit from the middle on changed by one bit: the JSON/CSV still parses."""
    return _digit_after(data, len(data) // 2)


def _result_digit(data: bytes) -> bytes:
    """A digit of a results-cache entry's result (an accuracy) changed by one bit."""
    return _digit_after(data, data.index(b'"result"'))


def _json_without(key: str | None = None) -> Callable[[bytes], bytes]:
    """The JSON object without ``key`` (default: its first key)."""
    def delete(data: bytes) -> bytes:
        obj = json.loads(data)
        del obj[key if key is not None else next(iter(obj))]
        return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    return delete


def _csv_without_row(data: bytes) -> bytes:
    return b"".join(data.splitlines(keepends=True)[:-1])


BYTES = {"truncate": _truncate, "flip 1/2": _flip_at(0.5), "flip 1/4": _flip_at(0.25),
         "flip 3/4": _flip_at(0.75), "empty": _empty, "garbage": _garbage}
JSON = {"truncate": _truncate, "flip 1/2": _flip_at(0.5), "empty": _empty,
        "garbage": _garbage_json, "delete a key": _json_without(), "change a digit": _digit}


def _own(obj):
    """``obj`` with every tensor copied: safetensors memory-maps the file, so tensors read
    from a file that is then overwritten in place would change with it."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _own(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(map(_own, obj))
    return copy.deepcopy(obj)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype
                and torch.equal(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    if hasattr(a, "__dataclass_fields__"):
        return type(a) is type(b) and all(_same(getattr(a, f), getattr(b, f))
                                          for f in a.__dataclass_fields__)
    return a == b


class Tally:
    """Cases tried per kind of file and how each ended."""

    OK = ("refused", "absent", "audit", "harmless")

    def __init__(self):
        self.cases: list[tuple[str, str, str, str]] = []  # kind, case, outcome, detail

    def add(self, kind: str, case: str, outcome: str, detail: str = "") -> None:
        self.cases.append((kind, case, outcome, detail))

    def failures(self) -> list[str]:
        return [f"{k} / {c}: {o}: {d}" for k, c, o, d in self.cases if o not in self.OK]

    def summary(self) -> str:
        kinds: dict[str, dict[str, int]] = {}
        for kind, _, outcome, _ in self.cases:
            counts = kinds.setdefault(kind, {})
            counts[outcome] = counts.get(outcome, 0) + 1
        survived = sum(o in self.OK for _, _, o, _ in self.cases)
        lines = [f"{len(self.cases)} cases tried, {survived} survived (refused by the reader with "
                 "the file named and what to do / absent from the results cache / reported by "
                 "the audit / no change to what the reader returns)"]
        for kind, counts in kinds.items():
            lines.append(f"  {kind}: {sum(counts.values())} tried: "
                         + ", ".join(f"{n} {o}" for o, n in sorted(counts.items())))
        return "\n".join(lines)


def _reader_case(tally: Tally, kind: str, case: str, damaged: Path, read: Callable[[], object],
                 reference: object, *, names: tuple[str, ...] = ()) -> None:
    """Run the reader on the damaged file; classify the outcome."""
    try:
        got = _own(read())
    except SubmergeError as exc:
        msg = str(exc)
        missing = [w for w in (str(damaged), "delete", "rerun", *names) if w not in msg]
        if missing or "\n" in msg:
            tally.add(kind, case, "unclear error", f"{msg!r} (lacks {missing} or is not one line)")
        else:
            tally.add(kind, case, "refused")
        return
    except Exception as exc:  # noqa: BLE001 - not a named error
        tally.add(kind, case, "crash", f"{type(exc).__name__}: {exc}"[:300])
        return
    if _same(got, reference):
        tally.add(kind, case, "harmless")
    else:
        tally.add(kind, case, "silent", "the reader returned different data, no error")


def _audit(results: Path) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = cli.main(["audit", str(results)])
    return rc, out.getvalue()


def _audit_case(tally: Tally, kind: str, case: str, results: Path, damaged: Path,
                baseline: str) -> None:
    """``submerge audit results/<suite>`` must fail and name the damaged file."""
    rc, text = _audit(results)
    rel = str(damaged.relative_to(results))
    if rc != 0 and any(rel in ln and ln not in baseline for ln in text.splitlines()):
        tally.add(kind, case, "audit")
    else:
        tally.add(kind, case, "silent", f"audit rc {rc}, no line names {rel}")


@contextlib.contextmanager
def _damaged(path: Path, fault: Callable[[bytes], bytes]):
    """``path`` damaged by ``fault`` for the duration, then restored."""
    original = path.read_bytes()
    path.write_bytes(fault(original))
    try:
        yield path
    finally:
        path.write_bytes(original)


@contextlib.contextmanager
def _h5_without(path: Path, name: str):
    """``path`` without the HDF5 object ``name`` for the duration, then restored."""
    original = path.read_bytes()
    with h5py.File(path, "a", locking=False) as f:
        del f[name]
    try:
        yield path
    finally:
        path.write_bytes(original)


def _first_dataset(path: Path) -> tuple[str, str]:
    """(HDF5 path, the key errors must name) of the first data set of a store."""
    names: list[str] = []
    with h5py.File(path, "r", locking=False) as f:
        f.visititems(lambda n, obj: names.append(n) if isinstance(obj, h5py.Dataset)
                     and n != hdf5.MANIFEST else None)
    parts = names[0].split("/")
    if parts[0] in ("dense", "factors"):  # factored store: dense/<key>, factors/<key>/<i>/<U|S|Vh>
        return names[0], parts[1]
    if len(parts) >= 3:  # HO-GSVD cache: <key>/<row block>/<V|sigma|eigvals>
        return names[0], "/".join(parts[:-2])
    return names[0], parts[0]


def _json_cases(tally: Tally, kind: str, path: Path, faults: dict, read: Callable[[], object],
                results: Path, baseline: str) -> None:
    """JSON damage: what the reader refuses must be named; what still parses, the audit must see."""
    reference = _own(read())
    for case, fault in faults.items():
        with _damaged(path, fault):
            try:
                got = _own(read())
            except SubmergeError:
                _reader_case(tally, kind, case, path, read, reference)
                continue
            if _same(got, reference):
                tally.add(kind, case, "harmless")
            else:
                _audit_case(tally, kind, case, results, path, baseline)


@pytest.fixture(scope="module")
def results(runs, tmp_path_factory) -> Path:
    """A copy of the uninterrupted run's results/<suite> (and benchmarks/, inputs of the timing
    table), restored after each case."""
    dest = tmp_path_factory.mktemp("copy")
    shutil.copytree(runs.full / R, dest / R, ignore=shutil.ignore_patterns(".run.lock"))
    shutil.copytree(runs.full / "benchmarks", dest / "benchmarks")
    return dest / R


@pytest.fixture(scope="module")
def baseline(results) -> str:
    rc, text = _audit(results)
    assert rc == 0, f"the undamaged run does not audit clean:\n{text}"
    return text


def _report(tally: Tally, what: str) -> None:
    summary = tally.summary()
    print(f"\n[fault injection] {what}: {summary}")
    failures = tally.failures()
    assert not failures, summary + "\nnot survived:\n" + "\n".join(failures)


def test_damaged_results_are_refused_or_reported(results, baseline):
    tally = Tally()

    # --- normalised checkpoints: load_normalized (sha256 in the sidecar, sidecar_sha256) -----
    for rel in ("models/base.safetensors", "models/experts/rot90.safetensors"):
        path = results / rel
        kind = "checkpoint " + ("base" if "base" in rel else "expert")
        reference = _own(load_normalized(path))
        for case, fault in BYTES.items():
            with _damaged(path, fault):
                _reader_case(tally, kind, case, path, lambda: load_normalized(path), reference)
        from safetensors.torch import save as safetensors_bytes

        smaller = dict(list(reference[0].items())[1:])
        with _damaged(path, lambda _: safetensors_bytes(smaller, metadata={"format": "pt"})):
            _reader_case(tally, kind, "delete a key", path, lambda: load_normalized(path), reference)
        sidecar = path.with_suffix(".json")
        for case, fault in {**JSON, "delete a key": _json_without("sha256")}.items():
            with _damaged(sidecar, fault):
                _reader_case(tally, kind + " sidecar", case, sidecar, lambda: load_normalized(path),
                             reference)

    # --- HDF5 stores (manifest with data sha256) and the HO-GSVD cache -----------------------
    def hogsvd(p):
        return (*read_hogsvd_cache(p, with_basis=True), read_hogsvd_cache(p).attrs)

    stores = {
        "task vector": ("taskvectors/rot90.h5", hdf5.read_state_dict),
        "expert spectrum": ("spectra/rot90.h5", hdf5.read_factored),
        "merged (ta)": ("merged/g2/ta.h5", hdf5.read_factored),
        "merged (ta_sb)": ("merged/g2/ta_sb.h5", hdf5.read_factored),
        "HO-GSVD cache": ("hogsvd/g2.h5", hogsvd),
    }
    for kind, (rel, reader) in stores.items():
        path = results / rel
        reference = _own(reader(path))
        for case, fault in BYTES.items():
            with _damaged(path, fault):
                _reader_case(tally, kind, case, path, lambda: reader(path), reference)
        name, key = _first_dataset(path)
        with _h5_without(path, name):
            _reader_case(tally, kind, "delete a dataset", path, lambda: reader(path), reference,
                         names=(key,))
        if kind != "HO-GSVD cache":
            with _h5_without(path, hdf5.MANIFEST):
                _reader_case(tally, kind, "delete the manifest", path, lambda: reader(path), reference)

    # --- JSON results: read_json; a change that still parses: the audit ----------------------
    grid_point = next(p for p in sorted((results / "grid").rglob("a*.json"))
                      if not p.name.endswith(".json.json"))
    for kind, path in {"reference accuracy": results / "reference" / "rot90.json",
                       "grid point": grid_point,
                       "test point": results / "test" / "g2" / "ta_sb.json",
                       "summary (JSON)": results / "summaries" / "hogsvd_summary.json"}.items():
        _json_cases(tally, kind, path, JSON, lambda: read_json(path), results, baseline)

    # --- results cache entries: damaged = absent (computed again) ----------------------------
    cache = ResultsCache(results / "cache" / "points")
    entries = sorted((results / "cache" / "points").rglob("*.json"))
    assert len(entries) == 4  # (ta, ta_sb) x (val, test)
    for path in entries[:2]:
        key = path.stem
        reference = _own(cache.get(key))
        assert reference is not None
        faults = {**JSON, "delete a key": _json_without("result"), "change a digit of the result":
                  _result_digit}
        for case, fault in faults.items():
            with _damaged(path, fault):
                got = cache.get(key)
            if got is None:
                tally.add("results cache entry", case, "absent")
            else:
                tally.add("results cache entry", case, "harmless" if _same(got, reference) else "silent",
                          f"get() returned {got}")

    # --- CSV results, summaries, tables, figures: the audit ----------------------------------
    for kind, rel in {"scores.csv": "scores.csv",
                      "summary (CSV)": "summaries/spectra_summary.csv",
                      "summary (singular values)": "summaries/singular_values.csv",
                      "table (CSV)": "tables/main_results.csv",
                      "table (markdown)": "tables/main_results.md",
                      "figure (PDF)": "figures/spectra.pdf",
                      "figure (PNG)": "figures/spectra.png"}.items():
        path = results / rel
        faults = dict(BYTES)
        if path.suffix == ".csv":
            faults.update({"delete a row": _csv_without_row, "change a digit": _digit})
        for case, fault in faults.items():
            with _damaged(path, fault):
                _audit_case(tally, kind, case, results, path, baseline)

    # --- provenance sidecars: unreadable or incomplete ones are named by the audit -----------
    faults = {**JSON, "delete a key": _json_without("outputs")}
    del faults["change a digit"]  # see test_changed_provenance_sidecars_are_reported
    for kind, rel in PROVENANCE_SIDECARS.items():
        path = results / rel
        for case, fault in faults.items():
            with _damaged(path, fault):
                _audit_case(tally, kind, case, results, path, baseline)

    assert _audit(results)[0] == 0, "the copy was not restored after the cases"
    _report(tally, "results")


PROVENANCE_SIDECARS = {
    "provenance sidecar (task vector)": "taskvectors/rot90.h5.json",
    "provenance sidecar (merged)": "merged/g2/ta_sb.h5.json",
    "provenance sidecar (test point)": "test/g2/ta.json.json",
    "provenance sidecar (scores)": "scores.csv.json",
    "provenance sidecar (table)": "tables/main_results.csv.json",
}


def test_damaged_heads_are_refused(results, baseline):
    tally = Tally()
    head = results / "heads" / "rot90.safetensors"
    reference = _own(load_head(results, "rot90"))
    for case, fault in BYTES.items():
        with _damaged(head, fault):
            _reader_case(tally, "head", case, head, lambda: load_head(results, "rot90"), reference)
    sidecar = head.with_suffix(".json")
    for case, fault in {**JSON, "delete a key": _json_without("logit_scale"),
                        "change a digit": lambda d: _digit_after(d, d.index(b"logit_scale"))}.items():
        with _damaged(sidecar, fault):
            _reader_case(tally, "head sidecar", case, sidecar, lambda: load_head(results, "rot90"),
                         reference)
    _report(tally, "heads")


def test_changed_provenance_sidecars_are_reported(results, baseline):
    tally = Tally()
    for kind, rel in PROVENANCE_SIDECARS.items():
        path = results / rel
        with _damaged(path, _digit):
            _audit_case(tally, kind, "change a digit", results, path, baseline)
    _report(tally, "provenance sidecars, a digit changed")


def test_kill_9_and_rerun(runs):
    killed = runs.killed
    if isinstance(killed, BaseException):
        raise killed
    report = [f"{o['point']}: " + (f"killed at {o['file']}, temporaries left: {len(o['temporaries'])}, "
                                   f"incomplete files under a final name: {o['incomplete_final_files']}"
                                   if o["killed"] else f"NOT reached (run ended, rc {o['rc']})")
              for o in killed.outcomes]
    plain = killed.plain_rerun
    assert plain is not None, f"no kill point was reached: {killed.outcomes}"
    said = plain.stdout + plain.stderr
    hint = next((ln.strip() for ln in said.splitlines() if "--unlock" in ln or "--rerun-incomplete" in ln),
                "(no hint)")
    text = ("kill points:\n  " + "\n  ".join(report)
            + f"\n  a plain rerun after the first kill: rc {plain.returncode}: {hint}")
    print(f"\n[fault injection] {text}")
    assert killed.final.returncode == 0, (text + "\nrerun failed:\n" + _tail(killed.final.stdout)
                                          + _tail(killed.final.stderr))
    for o in killed.outcomes:
        assert o["killed"], f"{text}\n{o.get('log', '')}"
        assert not o["incomplete_final_files"], text
        assert o["unlock_rc"] == 0, text
    # a plain rerun after the kill stops and says what to do
    assert plain.returncode != 0 and ("--unlock" in said or "--rerun-incomplete" in said), _tail(said)
    # the rerun gives the uninterrupted run's scores, byte for byte, and leaves no temporary
    full, chain = runs.full / R / "scores.csv", runs.chain / R / "scores.csv"
    assert chain.read_bytes() == full.read_bytes(), f"{text}\n{chain.read_text()}\n!=\n{full.read_text()}"
    for rel in ("reference/rot90.json", "reference/parity.json"):
        assert (runs.chain / R / rel).read_bytes() == (runs.full / R / rel).read_bytes(), rel
    assert not _temporaries(runs.chain / R), _temporaries(runs.chain / R)
    assert not _unreadable_final_files(runs.chain / R)
    # the rerun is complete: nothing left to do
    dry = _run(runs.chain, runs.chain / "config.yaml", f"{R}/scores.csv", "-n")
    assert "Nothing to be done" in dry.stdout + dry.stderr, _tail(dry.stdout + dry.stderr)
