"""Downloads against a real HTTP server on 127.0.0.1: resume, retry, 404, hash pinning, offline."""

from __future__ import annotations

import hashlib
import http.server
import threading

import pytest

from submerge.errors import CheckpointError, ConfigError
from submerge.io.download import fetch

DATA = bytes(range(256)) * 300  # 76.8 kB
DATA_SHA = hashlib.sha256(DATA).hexdigest()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        state = self.server.state
        state["requests"].append((self.path, self.headers.get("Range")))
        name = self.path.lstrip("/")
        if name == "missing.pt":
            return self._error(404)
        if name == "down.pt" or (name == "busy.pt" and state.setdefault("busy", 0) < 2):
            state["busy"] = state.get("busy", 0) + 1
            return self._error(503)
        body = bytes(b ^ 0xFF for b in DATA) if name == "corrupt.pt" else DATA
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if name == "flaky.pt" and not state.get("dropped"):
            state["dropped"] = True
            self.wfile.write(body[start:start + len(body) // 3])
            self.wfile.flush()
            self.close_connection = True  # drop the connection midway, once
            return
        self.wfile.write(body[start:])

    def _error(self, code):
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.state = {"requests": []}
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(autouse=True)
def online(monkeypatch):
    monkeypatch.delenv("SUBMERGE_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def _files(root):
    return sorted(p.name for p in root.rglob("*") if p.is_file())


def test_download_with_pinned_hash_then_cache_hit(server, tmp_path):
    httpd, base = server
    source = {"url": f"{base}/model.pt", "sha256": DATA_SHA}
    path = fetch(source, tmp_path)
    assert path.read_bytes() == DATA and path.name == "model.pt"
    assert fetch(source, tmp_path) == path
    assert len(httpd.state["requests"]) == 1  # second call served from the cache
    assert _files(tmp_path) == ["model.pt"]


def test_resume_after_dropped_connection(server, tmp_path):
    httpd, base = server
    path = fetch({"url": f"{base}/flaky.pt", "sha256": DATA_SHA}, tmp_path, backoff=0.01)
    assert path.read_bytes() == DATA
    reqs = httpd.state["requests"]
    assert reqs == [("/flaky.pt", None), ("/flaky.pt", f"bytes={len(DATA) // 3}-")]  # resumed with Range
    assert _files(tmp_path) == ["flaky.pt"]


def test_retry_on_5xx_with_backoff(server, tmp_path):
    httpd, base = server
    path = fetch({"url": f"{base}/busy.pt"}, tmp_path, backoff=0.01)
    assert path.read_bytes() == DATA
    assert len(httpd.state["requests"]) == 3  # two 503 answers, then the file
    with pytest.raises(CheckpointError, match=r"down\.pt after 3 attempts.*503"):
        fetch({"url": f"{base}/down.pt"}, tmp_path, retries=2, backoff=0.0)
    assert len(httpd.state["requests"]) == 6


def test_404_fails_at_once_naming_url(server, tmp_path):
    httpd, base = server
    with pytest.raises(CheckpointError, match=rf"{base}/missing\.pt.*404"):
        fetch({"url": f"{base}/missing.pt"}, tmp_path, backoff=10.0)  # would hang if it retried
    assert len(httpd.state["requests"]) == 1
    assert _files(tmp_path) == []


def test_hash_mismatch_leaves_no_file(server, tmp_path):
    _, base = server
    with pytest.raises(CheckpointError) as err:
        fetch({"url": f"{base}/corrupt.pt", "sha256": DATA_SHA}, tmp_path)
    bad_sha = hashlib.sha256(bytes(b ^ 0xFF for b in DATA)).hexdigest()
    assert "corrupt.pt" in str(err.value) and DATA_SHA in str(err.value) and bad_sha in str(err.value)
    assert _files(tmp_path) == []


def test_offline_cache_hit_and_miss(server, tmp_path, monkeypatch):
    httpd, base = server
    path = fetch({"url": f"{base}/model.pt"}, tmp_path)
    for var in ("SUBMERGE_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
        assert fetch({"url": f"{base}/model.pt", "sha256": DATA_SHA}, tmp_path) == path
        with pytest.raises(CheckpointError, match=r"other\.pt.*not in the cache.*offline"):
            fetch({"url": f"{base}/other.pt"}, tmp_path)
        monkeypatch.delenv(var)
    assert len(httpd.state["requests"]) == 1


def test_local_path(tmp_path):
    f = tmp_path / "local.pt"
    f.write_bytes(DATA)
    assert fetch({"path": str(f), "sha256": DATA_SHA}, tmp_path / "cache") == f
    with pytest.raises(CheckpointError, match=rf"local\.pt.*{'0' * 64}.*{DATA_SHA}"):
        fetch({"path": str(f), "sha256": "0" * 64}, tmp_path / "cache")
    with pytest.raises(CheckpointError, match="nope.pt"):
        fetch({"path": str(tmp_path / "nope.pt")}, tmp_path / "cache")


def test_hub_offline_cache(tmp_path, monkeypatch):
    """A file already in the hub cache is served offline; a miss names repo, file and offline mode."""
    commit = "a" * 40
    snapshot = tmp_path / "hub" / "models--org--expert" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(DATA)
    (tmp_path / "hub" / "models--org--expert" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--expert" / "refs" / "main").write_text(commit)
    monkeypatch.setenv("SUBMERGE_OFFLINE", "1")
    for revision in ("main", commit):
        source = {"hub": {"repo": "org/expert", "file": "model.safetensors", "revision": revision}, "sha256": DATA_SHA}
        path = fetch(source, tmp_path)
        assert path.read_bytes() == DATA
    with pytest.raises(CheckpointError, match=r"org/expert/other\.bin.*not in the cache.*offline"):
        fetch({"hub": {"repo": "org/expert", "file": "other.bin", "revision": "main"}}, tmp_path)


def test_bad_sources(tmp_path):
    with pytest.raises(ConfigError, match="exactly one"):
        fetch({"url": "http://x/y", "path": "/y"}, tmp_path)
    with pytest.raises(ConfigError, match="'sha265'"):
        fetch({"path": "/y", "sha265": "0"}, tmp_path)
    with pytest.raises(ConfigError, match="ftp://"):
        fetch({"url": "ftp://host/file"}, tmp_path)
    with pytest.raises(ConfigError, match="'repo'"):
        fetch({"hub": {"file": "x"}}, tmp_path)
