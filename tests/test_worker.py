"""The warm worker (submerge.worker): a script that calls delegate() runs in a fork of the
server, with the caller's streams, directory, environment, arguments and exit status; without a
usable server it runs in its own process; a killed caller kills its job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from submerge import worker

SCRIPT = textwrap.dedent("""\
    import os, sys, time
    from submerge.worker import delegate
    delegate()
    mode = sys.argv[1]
    print("pid", os.getpid(), "ppid", os.getppid(), "cwd", os.getcwd(),
          "var", os.environ.get("WORKER_TEST_VAR"), "argv", sys.argv[1:], flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    if mode == "exit":
        sys.exit(3)
    if mode == "raise":
        raise ValueError("boom in the job")
    if mode == "sleep":
        open(sys.argv[2], "w").write(str(os.getpid()))
        time.sleep(60)
    """)


@pytest.fixture()
def server(tmp_path):
    w = worker.start(["json"], log=tmp_path / "worker.log")
    yield w
    w.stop()
    assert not os.path.exists(w.path)  # the socket and its folder are removed


def _run(tmp_path, *args, env=None, **kw):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    workdir = tmp_path / "wd"
    workdir.mkdir(exist_ok=True)
    env = {**os.environ, "WORKER_TEST_VAR": "from-client", **(env or {})}
    return subprocess.Popen([sys.executable, str(script), *args], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _fields(out: str) -> dict:
    words = out.split()
    return {"pid": int(words[1]), "ppid": int(words[3]), "cwd": words[5], "var": words[7]}


def test_a_job_runs_in_a_fork_of_the_server_with_the_callers_context(server, tmp_path):
    proc = _run(tmp_path, "ok", "x y")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    fields = _fields(out)
    assert fields["ppid"] == server.process.pid     # forked by the server
    assert fields["pid"] != proc.pid                 # not the caller's own process
    assert fields["cwd"] == str(tmp_path / "wd") and fields["var"] == "from-client"
    assert "argv ['ok', 'x y']" in out and "to stderr" in err
    assert f"job {fields['pid']}: {tmp_path / 'job.py'}" in (tmp_path / "worker.log").read_text()


@pytest.mark.parametrize("mode, code, message", [("exit", 3, None), ("raise", 1, "ValueError: boom in the job")])
def test_the_exit_status_and_errors_are_the_jobs(server, tmp_path, mode, code, message):
    proc = _run(tmp_path, mode)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code
    assert _fields(out)["ppid"] == server.process.pid
    if message:
        assert message in err


def test_without_a_usable_server_the_job_runs_in_its_own_process(server, tmp_path):
    for env in ({worker.ENV: str(tmp_path / "no-such-socket")},            # none there
                {worker.ENV: server.path, "PYTHONPATH": "/elsewhere"}):     # another environment
        proc = _run(tmp_path, "ok", env=env)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert _fields(out)["pid"] == proc.pid


def test_a_killed_caller_kills_its_job(server, tmp_path):
    marker = tmp_path / "job.pid"
    proc = _run(tmp_path, "sleep", str(marker))
    deadline = time.monotonic() + 60
    while not (marker.exists() and marker.read_text()):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    job = int(marker.read_text())
    assert job != proc.pid
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while _running(job):
        assert time.monotonic() < deadline, "the job outlived its caller"
        time.sleep(0.05)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"   # a zombie has stopped running (its parent reaps it)


def test_the_server_ends_with_the_process_that_started_it(tmp_path):
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    folder = Path(__import__("tempfile").mkdtemp(prefix="submerge-worker-test-"))
    path = folder / "socket"
    server = subprocess.Popen([sys.executable, "-m", "submerge.worker", str(path), str(owner.pid), "json"])
    deadline = time.monotonic() + 30
    while not path.exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    owner.kill()
    owner.wait()
    assert server.wait(timeout=15) == 0
    assert not folder.exists()


def test_only_the_owner_can_connect(server):
    assert (os.stat(os.path.dirname(server.path)).st_mode & 0o777) == 0o700
