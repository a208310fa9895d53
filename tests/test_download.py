"""Downloads against a real HTTP server on 127.0.0.1: resume, retry, 404, hash pinning, offline."""

from __future__ import annotations

import hashlib
import http.server
import re
import threading
import time

import pytest

from http_utils import local_http_server

from submerge.errors import CheckpointError, ConfigError
from submerge.io.download import fetch

DATA = bytes(range(256)) * 300  # 76.8 kB
DATA_SHA = hashlib.sha256(DATA).hexdigest()


NEW_DATA = DATA[::-1]  # what changing.pt becomes


def _etag(body):
    return '"' + hashlib.sha256(body).hexdigest()[:16] + '"'


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves DATA with an ETag, honouring Range and If-Range like a static file server."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        state = self.server.state
        state["requests"].append((self.path, self.headers.get("Range")))
        state["if_range"].append(self.headers.get("If-Range"))
        name = self.path.lstrip("/")
        if name == "missing.pt":
            return self._error(404)
        if name == "down.pt" or (name == "busy.pt" and state.setdefault("busy", 0) < 2):
            state["busy"] = state.get("busy", 0) + 1
            return self._error(503)
        if name in REDIRECTS:
            self.send_response(302)
            self.send_header("Location", REDIRECTS[name])
            self.send_header("Content-Length", "0")
            return self.end_headers()
        if name.startswith("noclen"):
            return self._close_delimited(cut=name == "noclen-cut.pt")
        if name == "chunked.pt":
            return self._chunked()
        body = bytes(b ^ 0xFF for b in DATA) if name == "corrupt.pt" else DATA
        if name == "changing.pt" and state.get("changed"):
            body = NEW_DATA
        start = 0
        if_range = self.headers.get("If-Range")
        if self.headers.get("Range") and (if_range is None or if_range == _etag(body)):
            start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("ETag", _etag(body))
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if name in ("flaky.pt", "changing.pt") and not state.get("dropped"):
            state["dropped"] = True
            self.wfile.write(body[start:start + len(body) // 3])
            self.wfile.flush()
            self.close_connection = True  # drop the connection midway, once
            return
        if name == "slow.pt":  # long enough for two concurrent fetches to overlap
            for i in range(0, len(body) - start, len(body) // 16):
                self.wfile.write(body[start + i:start + i + len(body) // 16])
                self.wfile.flush()
                time.sleep(0.005)
            return
        self.wfile.write(body[start:])

    def _close_delimited(self, cut):
        """No Content-Length, no chunked encoding: the body ends when the connection closes."""
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(DATA[:len(DATA) // 3] if cut else DATA)
        self.close_connection = True

    def _chunked(self):
        """Chunked body; the first answer is cut after a third of the file (no final chunk)."""
        state = self.server.state
        start = 0
        if self.headers.get("Range") and self.headers.get("If-Range") == _etag(DATA):
            start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(DATA) - 1}/{len(DATA)}")
        else:
            self.send_response(200)
        self.send_header("ETag", _etag(DATA))
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        cut = not state.get("chunk_cut")
        state["chunk_cut"] = True
        end = len(DATA) // 3 if cut else len(DATA)
        step = 4096
        for i in range(start, end, step):
            piece = DATA[i:min(i + step, end)]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        if cut:
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(b"0\r\n\r\n")

    def _error(self, code):
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()


REDIRECTS = {
    "to-ftp.pt": "ftp://127.0.0.1:9/model.pt",
    "to-file.pt": "file:///etc/hostname",
    "to-http.pt": "/model.pt",
}


@pytest.fixture
def server():
    with local_http_server(Handler, state={"requests": [], "if_range": []}) as served:
        yield served


@pytest.fixture(autouse=True)
def online(monkeypatch):
    monkeypatch.delenv("SUBMERGE_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def _files(root):
    """Files under ``root``, less the lock files (filelock leaves them in place by design)."""
    return sorted(p.name for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock"))


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


def test_unpinned_download_without_length_is_refused(server, tmp_path):
    """No Content-Length and no chunked encoding: a cut looks like the end, so an unpinned file is not cached."""
    httpd, base = server
    for _ in range(2):  # refused every time, never cached
        with pytest.raises(CheckpointError, match=r"noclen-cut\.pt into .*noclen-cut\.pt: .*Content-Length.*sha256"):
            fetch({"url": f"{base}/noclen-cut.pt"}, tmp_path, backoff=10.0)  # would hang if it retried
    assert len(httpd.state["requests"]) == 2
    assert _files(tmp_path) == []
    # pinned, the hash tells a complete file from a cut one
    assert fetch({"url": f"{base}/noclen.pt", "sha256": DATA_SHA}, tmp_path).read_bytes() == DATA
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        fetch({"url": f"{base}/noclen-cut.pt", "sha256": DATA_SHA}, tmp_path)
    assert _files(tmp_path) == ["noclen.pt"]


def test_cut_chunked_transfer_is_resumed(server, tmp_path):
    """A chunked body cut before its final chunk is an error (IncompleteRead), resumed like a dropped connection."""
    httpd, base = server
    path = fetch({"url": f"{base}/chunked.pt"}, tmp_path, backoff=0.01)
    assert path.read_bytes() == DATA
    assert httpd.state["requests"] == [("/chunked.pt", None), ("/chunked.pt", f"bytes={len(DATA) // 3}-")]
    assert _files(tmp_path) == ["chunked.pt"]


def test_leftover_part_of_a_changed_file_is_not_resumed(server, tmp_path):
    """A .part left by an earlier run is resumed with If-Range; the server file changed, so it starts over."""
    httpd, base = server
    url = f"{base}/changing.pt"
    with pytest.raises(CheckpointError, match="after 1 attempts"):
        fetch({"url": url}, tmp_path, retries=0)
    assert _files(tmp_path) == ["changing.pt.part", "changing.pt.part.json"]
    httpd.state["changed"] = True
    path = fetch({"url": url}, tmp_path)
    assert path.read_bytes() == NEW_DATA  # not a third of DATA followed by the rest of NEW_DATA
    assert httpd.state["requests"][1] == ("/changing.pt", f"bytes={len(DATA) // 3}-")
    assert httpd.state["if_range"][1] == _etag(DATA)
    assert _files(tmp_path) == ["changing.pt"]


def test_leftover_part_without_validator_starts_over(server, tmp_path):
    """A .part with no recorded ETag/Last-Modified cannot be checked against the server file: not resumed."""
    httpd, base = server
    url = f"{base}/model.pt"
    final = fetch({"url": url}, tmp_path)
    final.unlink()
    final.with_name("model.pt.part").write_bytes(b"\0" * 1000)  # e.g. from an older version of submerge
    assert fetch({"url": url}, tmp_path).read_bytes() == DATA
    assert httpd.state["requests"][1] == ("/model.pt", None)
    assert _files(tmp_path) == ["model.pt"]


def test_concurrent_fetches_of_one_url(server, tmp_path):
    """Two jobs fetching one URL into one cache: the second waits for the first, both get the same file."""
    httpd, base = server
    for trial in range(4):
        cache = tmp_path / str(trial)
        barrier = threading.Barrier(2)
        results, errors = [None, None], []

        def job(i, source):
            barrier.wait()
            try:
                results[i] = fetch(source, cache, backoff=0.01)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        sources = [{"url": f"{base}/slow.pt"}, {"url": f"{base}/slow.pt", "sha256": DATA_SHA}]
        threads = [threading.Thread(target=job, args=(i, s)) for i, s in enumerate(sources)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert errors == []
        assert results[0] == results[1] and results[0].read_bytes() == DATA
        assert _files(cache) == ["slow.pt"]
    assert len(httpd.state["requests"]) == 4  # one download per cache


@pytest.mark.parametrize("path", ["dir/..", "dir/%2E%2E", "dir/.", ".."])
def test_url_without_usable_file_name(server, tmp_path, path):
    httpd, base = server
    url = f"{base}/{path}"
    with pytest.raises(ConfigError, match=re.escape(repr(url))):
        fetch({"url": url}, tmp_path)
    assert httpd.state["requests"] == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["to-ftp.pt", "to-file.pt"])
def test_redirect_to_other_scheme_is_refused(server, tmp_path, name):
    httpd, base = server
    url = f"{base}/{name}"
    with pytest.raises(CheckpointError) as err:
        fetch({"url": url}, tmp_path, retries=1, backoff=0.01)
    message = str(err.value)
    assert url in message and REDIRECTS[name] in message and f"{name}" in message.replace(url, "")
    assert len(httpd.state["requests"]) == 1  # not retried
    assert _files(tmp_path) == []
    # a redirect to http is followed
    assert fetch({"url": f"{base}/to-http.pt"}, tmp_path).read_bytes() == DATA
