"""Atomic file output: write to a temporary name in the same directory, then rename.

A killed job therefore never leaves a readable half-written file under the final name.

Temporary names follow one pattern, ``.<name>.tmp-<host>-<pid>-<token><suffix>.tmp``
(``<host>``: 6 hex digits of a hash of the host name, ``<pid>``: the writing process,
``<token>``: 8 random hex digits), so that the leftovers of a ``kill -9`` can be recognised
and removed once their writer is gone (:func:`clean_stale_temporaries`).

Results are created with the mode the umask gives (0644 under umask 022), also when the
writer replaces the temporary file by one of its own (safetensors' ``save_file`` does).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
import socket
import stat
import time
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

_TEMP_RE = re.compile(
    r"^\.(?P<name>.+)\.tmp-(?P<host>[0-9a-f]{6})-(?P<pid>[1-9][0-9]*)-(?P<token>[0-9a-f]{8})"
    r"(?P<suffix>.*)\.tmp$", re.DOTALL)
# names of the former tempfile.mkstemp temporaries: .<name>.<8 random chars><name's suffix>.tmp
_LEGACY_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}(?P<suffix>.*)\.tmp$", re.DOTALL)


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8", "surrogateescape")).hexdigest()[:6]


def temporary_name(name: str, suffix: str = ".tmp") -> str:
    """A fresh temporary file name for final file ``name`` written by this process
    (``suffix`` ends it; :func:`atomic_path` passes the final suffix + ``.tmp``)."""
    if not suffix.endswith(".tmp"):
        raise ValueError(f"temporary name suffix must end in '.tmp', got {suffix!r}")
    return f".{name}.tmp-{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def parse_temporary_name(name: str) -> dict | None:
    """``{"name", "host", "pid", "suffix"}`` of a name made by :func:`temporary_name`, else None."""
    m = _TEMP_RE.match(name)
    if m is None:
        return None
    return {"name": m["name"], "host": m["host"], "pid": int(m["pid"]), "suffix": m["suffix"] + ".tmp"}


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched.
    The temporary name ends in ``suffix`` + ``.tmp``; ``suffix`` defaults to the final
    file's suffix. The renamed file gets the mode the umask gives for a new file
    (as ``open()`` does), even if the writer replaced the temporary file.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tail = (final.suffix if suffix is None else suffix) + ".tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp_path = final.parent / temporary_name(final.name, tail)
        try:
            fd = os.open(tmp_path, flags, 0o666)  # the kernel applies the umask (or default ACL)
        except FileExistsError:
            continue
        break
    else:  # pragma: no cover - 100 collisions of 32 random bits
        raise FileExistsError(f"cannot create a temporary file next to {final}")
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
    try:
        yield tmp_path
        # a writer that wrote its own file and renamed it over ours (safetensors' save_file
        # makes it 0600) loses the mode: results are shared, so restore the umask's mode
        if stat.S_IMODE(os.stat(tmp_path).st_mode) != mode:
            os.chmod(tmp_path, mode)
        os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``path``; on success it replaces ``path``
    (a directory) by a rename, on any exception it is removed and ``path`` is left untouched.
    Leftovers of killed writers (same name pattern as :func:`temporary_name`, ``.dir.tmp``)
    are removed first when their process is gone."""
    import shutil

    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    for old in final.parent.glob(f".{glob_escape(final.name)}.tmp-*.dir.tmp"):
        parsed = parse_temporary_name(old.name)
        if parsed is not None and parsed["host"] == _host_tag() and not _pid_alive(parsed["pid"]):
            shutil.rmtree(old, ignore_errors=True)
    tmp = final.parent / temporary_name(final.name, ".dir.tmp")
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            stale = final.parent / temporary_name(final.name, ".old.dir.tmp")
            os.replace(final, stale)
            os.replace(tmp, final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def glob_escape(name: str) -> str:
    """``name`` with glob metacharacters escaped."""
    import glob

    return glob.escape(name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by someone else
        return True
    return True


def clean_stale_temporaries(directory: str | os.PathLike, older_than_s: float = 60.0, *,
                            unknown_writer_older_than_s: float = 86400.0,
                            recursive: bool = True) -> list[Path]:
    """Remove the temporary files :func:`atomic_path` left behind under ``directory``
    (a writer killed with ``kill -9`` cannot remove its own); return the removed paths.

    Only regular files named by :func:`temporary_name` are candidates. One written on this
    host is removed when its writing process is gone (``os.kill(pid, 0)``) and it was last
    modified at least ``older_than_s`` seconds ago. Where the writer cannot be checked (a
    temporary of another host sharing the file system, or one named by earlier versions,
    ``.<name>.<8 chars><suffix>.tmp``), it is removed only when unmodified for
    ``unknown_writer_older_than_s`` seconds. Anything else is left alone.
    """
    root = Path(directory)
    if not root.is_dir():
        return []
    host, now, removed = _host_tag(), time.time(), []
    walk = os.walk(root) if recursive else [(str(root), [], os.listdir(root))]
    for dirpath, _dirs, files in walk:
        for fname in files:
            parsed = parse_temporary_name(fname)
            if parsed is None:
                legacy = _LEGACY_TEMP_RE.match(fname)
                if legacy is None or Path(legacy["name"]).suffix != legacy["suffix"]:
                    continue
            path = Path(dirpath) / fname
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            age = now - st.st_mtime
            if parsed is not None and parsed["host"] == host:
                stale = age >= older_than_s and not _pid_alive(parsed["pid"])
            else:
                stale = age >= unknown_writer_older_than_s
            if stale:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
                    log.info("removed stale temporary file %s (%d bytes)", path, st.st_size)
    return removed


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (memory stays flat for large files).
    Lives here, free of torch, so that `submerge audit` starts fast."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
