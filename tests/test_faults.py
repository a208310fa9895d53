"""Faults around result files: modes under the umask, temporaries left by `kill -9`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import submerge
from submerge.data.heads import save_head
from submerge.io import hdf5
from submerge.io.atomic import (
    atomic_path,
    clean_stale_temporaries,
    parse_temporary_name,
    temporary_name,
    write_text_atomic,
)
from submerge.io.checkpoints import save_normalized
from submerge.layers import LayerInfo

OLD = time.time() - 3600  # an mtime old enough for the default older_than_s


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path) -> int:
    return os.stat(path).st_mode & 0o777


def test_every_result_gets_the_umask_mode(tmp_path, umask):
    want = 0o666 & ~umask  # 0644 under 022, 0600 under 077
    sd = {"a": torch.randn(3, 4), "b": torch.randn(4)}
    info = {"a": LayerInfo(0, "mlp"), "b": LayerInfo(None, "other")}
    save_normalized(sd, tmp_path / "models" / "base.safetensors", {"suite": "s"})
    save_head(tmp_path / "heads" / "x.safetensors", torch.randn(2, 4), None,
              {"normalize": True, "logit_scale": 1.0})
    hdf5.write_state_dict(tmp_path / "tv.h5", sd, info, {})
    hdf5.write_factored(tmp_path / "merged.h5", {"b": sd["b"]}, {"a": [torch.linalg.svd(sd["a"])]}, info, {})
    write_text_atomic(tmp_path / "x.json", "{}\n")
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) == 7  # 2 safetensors + 2 sidecars + 2 HDF5 + 1 JSON, no temporaries
    for path in files:
        assert _mode(path) == want, (path, oct(_mode(path)))


def test_atomic_path_restores_the_mode_of_a_writer_that_replaced_the_file(tmp_path, umask):
    with atomic_path(tmp_path / "out.bin") as tmp:
        own = tmp.with_name(".own")  # like safetensors' save_file: own 0600 file renamed over ours
        fd = os.open(own, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"data")
        os.close(fd)
        os.chmod(own, 0o600)
        os.replace(own, tmp)
    assert _mode(tmp_path / "out.bin") == 0o666 & ~umask
    assert (tmp_path / "out.bin").read_bytes() == b"data"


def test_temporary_names_are_recognisable(tmp_path):
    with atomic_path(tmp_path / "tv.h5") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".tv.h5.tmp-") and tmp.name.endswith(".h5.tmp")
        parsed = parse_temporary_name(tmp.name)
        assert parsed is not None and parsed["name"] == "tv.h5" and parsed["pid"] == os.getpid()
        tmp.write_bytes(b"x")
    assert [p.name for p in tmp_path.iterdir()] == ["tv.h5"]
    for name in ("tv.h5", ".tv.h5", ".tv.h5.tmp", ".tv.h5.tmp-abc", "x.tmp-000000-1-0123abcd.tmp"):
        assert parse_temporary_name(name) is None, name


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(proc.stdout)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    return pid


def _fake_temporary(directory: Path, final: str, pid: int, *, host: str | None = None,
                    mtime: float = OLD) -> Path:
    name = temporary_name(final, Path(final).suffix + ".tmp")
    parsed = parse_temporary_name(name)
    name = name.replace(f"-{os.getpid()}-", f"-{pid}-", 1)
    if host is not None:
        name = name.replace(f".tmp-{parsed['host']}-", f".tmp-{host}-", 1)
    path = directory / name
    path.write_bytes(b"\0" * 1000)
    os.utime(path, (mtime, mtime))
    return path


def test_clean_stale_temporaries(tmp_path):
    sub = tmp_path / "merged" / "n8"
    sub.mkdir(parents=True)
    dead = _fake_temporary(sub, "ta.h5", _dead_pid())
    dead_fresh = _fake_temporary(tmp_path, "tv.h5", _dead_pid(), mtime=time.time())
    live = _fake_temporary(tmp_path, "base.safetensors", os.getpid())
    foreign = _fake_temporary(tmp_path, "x.h5", _dead_pid(), host="abcdef")  # another host's pid
    foreign_old = _fake_temporary(tmp_path, "y.h5", 12345, host="abcdef", mtime=time.time() - 2 * 86400)
    legacy_old = tmp_path / ".old.h5.k2j4_x9a.h5.tmp"  # tempfile.mkstemp name of earlier versions
    unrelated = [tmp_path / n for n in ("tv.h5", ".hidden", "a.tmp", ".x.tmp", ".tv.h5.tmp-zz.tmp",
                                        ".notes.tmp-abcdef-1-zzzzzzzz.tmp")]
    for path in (legacy_old, *unrelated):
        path.write_bytes(b"keep")
        os.utime(path, (OLD - 2 * 86400, OLD - 2 * 86400))
    link = tmp_path / f".link.h5.tmp-{parse_temporary_name(live.name)['host']}-{_dead_pid()}-0123abcd.h5.tmp"
    link.symlink_to(tmp_path / "tv.h5")

    removed = clean_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([dead, foreign_old, legacy_old])
    for path in (dead_fresh, live, foreign, *unrelated):
        assert path.exists(), path
    assert link.is_symlink()
    assert clean_stale_temporaries(tmp_path, older_than_s=0) == [dead_fresh]
    assert clean_stale_temporaries(tmp_path / "missing") == []
    # not recursive: only the top directory
    again = _fake_temporary(sub, "ta.h5", _dead_pid())
    assert clean_stale_temporaries(tmp_path, recursive=False) == []
    assert clean_stale_temporaries(tmp_path) == [again]


def test_kill_9_leftover_is_removed(tmp_path):
    """A writer killed mid-write leaves its full-size temporary; the cleaner removes it."""
    script = (
        "import os, signal, sys\n"
        "from submerge.io.atomic import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    tmp.write_bytes(b'x' * 100000)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(submerge.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "tv.h5")], env=env)
    assert proc.returncode == -signal.SIGKILL
    leftovers = list(tmp_path.iterdir())
    assert len(leftovers) == 1 and parse_temporary_name(leftovers[0].name) is not None
    assert leftovers[0].stat().st_size == 100000
    assert clean_stale_temporaries(tmp_path) == []  # too fresh for the default age
    assert clean_stale_temporaries(tmp_path, older_than_s=0) == leftovers
    assert list(tmp_path.iterdir()) == []
