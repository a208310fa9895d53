"""A warm worker for local workflow runs: jobs start without paying Python's imports.

Most of a small job's time is start-up, not work: ``import torch`` takes ~2 s here and
``import open_clip`` ~2.5 s more, while a digits grid sweep or merge computes for a second or
two. For a run on one machine the Snakefile's ``onstart`` therefore starts one server process
(:func:`start`) that imports torch, the model library of the suite's adapter and the stage
modules once and then waits on a Unix socket. Each job's script begins with
:func:`delegate`: when a server is up, the script's process hands its own script file, working
directory, environment and standard streams to the server and waits; the server forks a child
that runs the script exactly as ``python <script>`` would (``runpy``, as ``__main__``), writing
to the job's own stdout/stderr and log, and the script's process exits with the child's
status. Snakemake sees an ordinary job: same outputs, same exit status, same logs.

Nothing changes for results: the child is a fresh copy of a process that has only imported
modules (no tensor op, no thread pool, no CUDA context before the fork), the job sets its own
thread count as before (:func:`submerge.logs.setup_logging`), and without a server (cluster
executors, ``warm_worker: false``, a different interpreter such as a rule's conda env, or a
server that cannot be reached) :func:`delegate` returns and the script runs in its own process.

Safety:
* the socket lies in a fresh ``0700`` directory and the server accepts only connections from
  its own user (``SO_PEERCRED``);
* when a job's process dies (Snakemake cancels it, Ctrl-C, ``kill``), its connection closes and
  the child kills its whole process group, so a cancelled job keeps running nowhere;
* the server exits when the Snakemake process that started it is gone, and removes its socket.

Only the standard library is imported here: a delegating job imports nothing else.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

ENV = "SUBMERGE_WORKER"            # the server's socket path, set for the jobs by start()
START_ENV = "SUBMERGE_JOB_START"   # when the job's own process started (for its start-up log)
_HEADER = struct.Struct("!I")
_ACCEPTED, _REFUSED = b"A", b"R"

#: what every job of the workflow imports (the stage modules import torch, numpy, h5py)
COMMON_PRELOAD = ("snakemake.script", "snakemake.io", "snakemake.logging",
                  "submerge.stages.checkpoints", "submerge.stages.taskvectors",
                  "submerge.stages.spectra", "submerge.stages.merge", "submerge.stages.evaluate",
                  "submerge.stages.selection", "submerge.stages.report", "submerge.stages.export",
                  "submerge.stages.beta_grid", "submerge.stages.decay",
                  "submerge.suites.digits", "sklearn.datasets",
                  "submerge.report.tables", "submerge.report.figures", "submerge.report.landing")
ADAPTER = "adapter:"   # a preload entry "adapter:<name>": that adapter's module and library

_in_worker = False   # True in a server's child: delegate() is then a no-op


def _identity() -> dict:
    """What must be equal for a job to run in the server: the same interpreter, environment
    prefix and module search path setting."""
    return {"executable": os.path.realpath(sys.executable), "prefix": sys.prefix,
            "pythonpath": os.environ.get("PYTHONPATH", "")}


# ------------------------------------------------------------------------------ client side
def delegate() -> None:
    """Run this script's job in the warm worker, if one is up; then exit with its status.

    Returns (and the script runs here, as usual) when no worker is configured or reachable or
    the worker runs another interpreter. Call it first thing in a Snakemake script."""
    path = os.environ.get(ENV)
    if _in_worker or not path:
        return
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return
    request = {"script": os.path.abspath(sys.argv[0]), "argv": list(sys.argv),
               "cwd": os.getcwd(), "env": dict(os.environ), **_identity()}
    try:
        import psutil  # comes with Snakemake

        request["env"][START_ENV] = repr(psutil.Process().create_time())
    except ImportError:
        pass
    body = json.dumps(request).encode()
    try:
        socket.send_fds(sock, [_HEADER.pack(len(body))], [0, 1, 2])
        sock.sendall(body)
        answer = _recv_exact(sock, 1)
    except OSError:
        sock.close()
        return
    if answer != _ACCEPTED:   # refused (another interpreter) or the server went away
        sock.close()
        return
    status = _recv_exact(sock, _HEADER.size)
    sock.close()
    if len(status) != _HEADER.size:
        sys.stderr.write("submerge warm worker: the job's process ended without a status "
                         "(killed?)\n")
        sys.stderr.flush()
        os._exit(1)
    os._exit(_HEADER.unpack(status)[0])


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


# ------------------------------------------------------------------------------ server side
def serve(path: str, preload: Sequence[str], owner_pid: int) -> None:
    """Listen on ``path``, import ``preload``, then fork one child per job until the process
    ``owner_pid`` (the Snakemake that started the server) is gone."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(128)   # jobs that connect while the imports run wait in the backlog
    for name in _expand(preload):
        try:
            importlib.import_module(name)
        except ImportError as err:   # e.g. an adapter's library not installed: jobs say so
            print(f"submerge warm worker: not preloaded: {name} ({err})", flush=True)
    print(f"submerge warm worker: ready ({len(preload)} modules preloaded)", flush=True)
    listener.settimeout(1.0)
    try:
        while _alive(owner_pid):
            _reap()
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            conn.settimeout(None)
            if not _same_user(conn):
                conn.close()
                continue
            if os.fork() == 0:
                listener.close()
                _child(conn)   # never returns
            conn.close()
    finally:
        listener.close()
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)


def _expand(preload: Sequence[str]) -> list[str]:
    names = []
    for name in preload:
        if name.startswith(ADAPTER):
            from submerge.models import _ADAPTERS, get_adapter

            adapter = name[len(ADAPTER):]
            names += [_ADAPTERS[adapter][0], get_adapter(adapter).library]
        else:
            names.append(name)
    return names


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _same_user(conn: socket.socket) -> bool:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return uid == os.getuid()


def _child(conn: socket.socket) -> None:
    """Run one job: adopt the client's streams, directory and environment, run its script."""
    global _in_worker
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.setsid()   # the job's own process group: killed as a whole with its client
        header, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
        request = json.loads(_recv_exact(conn, _HEADER.unpack(header)[0]))
        if len(fds) != 3 or any(request.get(k) != v for k, v in _identity().items()):
            conn.sendall(_REFUSED)
            os._exit(0)
        print(f"submerge warm worker: job {os.getpid()}: {request['script']}", flush=True)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ.pop(ENV, None)   # a job never delegates again (nor do its subprocesses)
        sys.argv = list(request["argv"])
        _in_worker = True
        conn.sendall(_ACCEPTED)
        threading.Thread(target=_watch_client, args=(conn,), daemon=True).start()
        code = _run_script(request["script"])
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        try:
            conn.sendall(_HEADER.pack(code))
        except OSError:
            pass
        os._exit(code)


def _run_script(script: str) -> int:
    import logging
    import runpy

    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        if exit_.code is not None and not isinstance(exit_.code, int):
            print(exit_.code, file=sys.stderr)
    except BaseException:   # noqa: BLE001 -- reported like an uncaught error of `python script`
        sys.excepthook(*sys.exc_info())
        code = 1
    logging.shutdown()
    return code if 0 <= code <= 255 else 1


def _watch_client(conn: socket.socket) -> None:
    """Kill this job (its whole process group) when its client goes away."""
    try:
        while conn.recv(1):
            pass
    except OSError:
        pass
    os.killpg(0, signal.SIGKILL)


# ------------------------------------------------------------------------------ life cycle
class Worker:
    """A started server: its socket path (also set as ``$SUBMERGE_WORKER``) and process."""

    def __init__(self, path: str, process: subprocess.Popen):
        self.path, self.process = path, process

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        shutil.rmtree(os.path.dirname(self.path), ignore_errors=True)
        if os.environ.get(ENV) == self.path:
            del os.environ[ENV]


def start(preload: Sequence[str], log: str | os.PathLike | None = None) -> Worker:
    """Start a server for the jobs this process launches (sets ``$SUBMERGE_WORKER``)."""
    folder = tempfile.mkdtemp(prefix="submerge-worker-")   # 0700: only this user connects
    path = os.path.join(folder, "socket")
    env = dict(os.environ)
    env.pop(ENV, None)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.setdefault(var, "1")   # BLAS pools sized at import; jobs set torch's own threads
    if log:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
    out = open(log, "ab") if log else subprocess.DEVNULL   # noqa: SIM115 -- the server's log
    process = subprocess.Popen(
        [sys.executable, "-m", "submerge.worker", path, str(os.getpid()), *preload],
        env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        start_new_session=True)
    if log:
        out.close()
    deadline = time.monotonic() + 30
    while not os.path.exists(path):   # bound: jobs may connect (and wait) from now on
        if process.poll() is not None or time.monotonic() > deadline:
            shutil.rmtree(folder, ignore_errors=True)
            raise RuntimeError(f"the warm worker did not start (exit {process.poll()}); "
                               f"see {log or 'its output'}")
        time.sleep(0.02)
    os.environ[ENV] = path
    return Worker(path, process)


if __name__ == "__main__":
    # run the server from the module `submerge.worker` (not this `__main__` copy), so that the
    # scripts' delegate() sees _in_worker of the same module
    from submerge import worker

    worker.serve(sys.argv[1], sys.argv[3:], int(sys.argv[2]))
