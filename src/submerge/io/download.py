"""Fetching checkpoint files into a local cache, with optional sha256 pinning.

A source is one of::

    {"hub": {"repo": "org/name", "file": "model.safetensors", "revision": "<commit>"}, "sha256": ...}
    {"url": "https://host/path/file.pt", "sha256": ...}
    {"path": "/local/file.pt", "sha256": ...}

(``trust_pickle`` may sit beside them; it is for :func:`submerge.io.checkpoints.load_checkpoint`.)

* Hub files go through ``huggingface_hub.hf_hub_download`` into ``<cache_dir>/hub``.
* URLs are downloaded with urllib into ``<cache_dir>/url/<hash of url>/<file name>``, the
  file name being the last segment of the URL path (``download`` when it is empty; a URL
  ending in ``.`` or ``..`` is a ConfigError). Redirects are followed to http:// and
  https:// only; any other target is refused with an error naming both URLs.
* Completeness: a transfer is complete when it delivered ``Content-Length`` bytes (for a
  resume: up to the end of its ``Content-Range``), or when a chunked body ended with its
  final chunk (a cut chunked body raises ``http.client.IncompleteRead``, retried like a
  dropped connection). A body with neither ends when the connection closes, so a cut cannot
  be told from the end: such a file is accepted only when its sha256 is pinned, otherwise it
  is refused at once (nothing is cached) with an error saying to pin the hash.
* Resume: a ``.part`` file is resumed with ``Range`` and ``If-Range`` after a dropped
  connection (also by a later run). The validator for ``If-Range`` (a strong ETag, else
  Last-Modified) is recorded in ``<file name>.part.json`` when the ``.part`` is started; a
  ``.part`` without one is started over, and a 200 answer to a resume (the file changed on
  the server, or the server ignores ranges) restarts the download from zero.
* Connection errors and 5xx answers are retried with exponential backoff; other 4xx
  answers (404) fail at once. A file that fails its pinned sha256 is deleted, never renamed
  to its final name.
* Concurrency: each cached file has a lock (``<file name>.lock``, ``filelock``; the lock
  file stays, the lock dies with its process). A second process fetching the same URL into
  the same cache waits, then finds the finished file.
* Offline mode (``SUBMERGE_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``): cached files are served
  (without taking the lock, so a read-only cache works), a cache miss is an error that
  says so.

A pinned hub file that fails its sha256 stays in the hub cache (huggingface_hub owns it);
``fetch`` never returns it.

The transfer is hand-written on urllib because pooch (hash-checked, retried downloads)
neither resumes with ``Range``/``If-Range`` nor has an offline mode; locking uses filelock.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Mapping

from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from submerge.errors import CheckpointError, ConfigError
from submerge.io.checkpoints import sha256_file, verify_sha256

log = logging.getLogger(__name__)

_SOURCE_KINDS = ("hub", "url", "path")
_SOURCE_FIELDS = _SOURCE_KINDS + ("sha256", "trust_pickle")
_HUB_FIELDS = ("repo", "file", "revision", "repo_type")
_PROGRESS_MIN_BYTES = 8 << 20
_CHUNK = 1 << 20
_TIMEOUT_S = 60
_MAX_NAME_BYTES = 200  # leaves room for the ".part.json" and ".lock" suffixes in a 255-byte name


class _Retryable(Exception):
    """A transfer broke off in a way that a retry (resuming the .part file) may fix."""


class _Unverifiable(Exception):
    """The answer gives no way to tell a complete transfer from a cut one."""


def offline() -> bool:
    """True when ``SUBMERGE_OFFLINE`` or ``HF_HUB_OFFLINE`` is set to a true value."""
    return any(os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
               for var in ("SUBMERGE_OFFLINE", "HF_HUB_OFFLINE"))


def fetch(source: Mapping, cache_dir: str | os.PathLike, *, retries: int = 5, backoff: float = 1.0) -> Path:
    """Local path of the file ``source`` names, downloading it into ``cache_dir`` if needed.

    ``retries`` and ``backoff`` (seconds, doubled per retry) apply to URL downloads.
    """
    if not isinstance(source, Mapping):
        raise ConfigError(f"a checkpoint source must be a mapping, got {source!r}")
    kinds = [k for k in _SOURCE_KINDS if k in source]
    if len(kinds) != 1:
        raise ConfigError(
            f"a checkpoint source needs exactly one of {list(_SOURCE_KINDS)}, got fields {sorted(source)}"
        )
    for field in source:
        if field not in _SOURCE_FIELDS:
            raise ConfigError(f"unknown checkpoint source field {field!r}; known: {list(_SOURCE_FIELDS)}")
    sha256 = source.get("sha256")
    cache_dir = Path(cache_dir)
    if kinds[0] == "url":
        return _fetch_url(str(source["url"]), cache_dir, sha256, retries=retries, backoff=backoff)
    path = _fetch_hub(source["hub"], cache_dir) if kinds[0] == "hub" else _fetch_path(source["path"])
    if sha256:
        verify_sha256(path, sha256)
    return path


def _fetch_path(path) -> Path:
    local = Path(path).expanduser()
    if not local.is_file():
        raise CheckpointError(f"source path {local} does not exist")
    return local


def _fetch_hub(spec, cache_dir: Path) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    if not isinstance(spec, Mapping) or "repo" not in spec or "file" not in spec:
        raise ConfigError(f"source field 'hub' needs 'repo' and 'file', got {spec!r}")
    for field in spec:
        if field not in _HUB_FIELDS:
            raise ConfigError(f"unknown hub source field {field!r}; known: {list(_HUB_FIELDS)}")
    repo, file, revision = spec["repo"], spec["file"], spec.get("revision")
    if revision is None:
        log.warning("hub source %s/%s has no pinned revision; using the default branch", repo, file)
    what = f"{repo}/{file}@{revision or 'default branch'}"
    hub_cache = cache_dir / "hub"
    is_offline = offline()
    try:
        return Path(hf_hub_download(repo_id=repo, filename=file, revision=revision, repo_type=spec.get("repo_type"),
                                    cache_dir=hub_cache, local_files_only=is_offline))
    except LocalEntryNotFoundError as exc:
        if is_offline:
            raise CheckpointError(
                f"hub file {what} is not in the cache {hub_cache} and offline mode is on "
                "(SUBMERGE_OFFLINE / HF_HUB_OFFLINE): fetch it once online or copy the cache there"
            ) from exc
        raise CheckpointError(f"cannot download hub file {what} (and it is not cached in {hub_cache}): {exc}") from exc
    except (EntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise CheckpointError(f"cannot download hub file {what}: {exc}") from exc


def _url_file_name(url: str, path: str) -> str:
    """The cached file's name: the last segment of the URL's (unquoted) path."""
    name = urllib.parse.unquote(path).rsplit("/", 1)[-1]
    if not name:  # http://host/dir/
        return "download"
    if name in (".", "..") or "\x00" in name or len(name.encode()) > _MAX_NAME_BYTES:
        raise ConfigError(
            f"source url {url!r}: its path ends in {name[:40]!r}, which is not a usable file name; "
            "point the URL at a file"
        )
    return name


def _fetch_url(url: str, cache_dir: Path, sha256: str | None, *, retries: int, backoff: float) -> Path:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"source url {url!r}: only http:// and https:// URLs are supported")
    name = _url_file_name(url, parts.path)
    final = cache_dir / "url" / hashlib.sha256(url.encode()).hexdigest()[:16] / name
    if offline():  # read only: no lock file, no download
        if not final.is_file():
            raise CheckpointError(
                f"{url} is not in the cache ({final}) and offline mode is on (SUBMERGE_OFFLINE / HF_HUB_OFFLINE)"
            )
        if sha256:
            verify_sha256(final, sha256, what=f"{url} (cached at {final})")
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(final) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("%s: waiting for another process that is downloading it into %s", url, final)
        lock.acquire()
    try:
        return _fetch_url_locked(url, final, sha256, retries=retries, backoff=backoff)
    finally:
        lock.release()


def _fetch_url_locked(url: str, final: Path, sha256: str | None, *, retries: int, backoff: float) -> Path:
    if final.is_file():
        if not sha256:
            log.info("%s: using cached %s", url, final)
            return final
        try:
            verify_sha256(final, sha256, what=f"{url} (cached at {final})")
            return final
        except CheckpointError:
            log.warning("cached %s does not match the pinned sha256; downloading %s again", final, url)
            final.unlink()
    part = final.with_name(final.name + ".part")
    meta = final.with_name(final.name + ".part.json")
    _download(url, final, part, meta, pinned=bool(sha256), retries=retries, backoff=backoff)
    if sha256:
        actual = sha256_file(part)
        if actual != str(sha256).strip().lower():
            _discard(part, meta)
            raise CheckpointError(
                f"sha256 mismatch for {url} (downloaded for {final}): expected {sha256}, got {actual}; "
                "the file was deleted"
            )
    os.replace(part, final)
    meta.unlink(missing_ok=True)
    return final


def _download(url: str, final: Path, part: Path, meta: Path, *, pinned: bool, retries: int, backoff: float) -> None:
    """Download ``url`` into ``part``, resuming it and retrying broken transfers."""
    for attempt in range(retries + 1):
        try:
            _download_once(url, part, meta, pinned=pinned)
            return
        except _RedirectRefused as exc:
            raise CheckpointError(
                f"refusing the redirect from {url} to {exc.target}: only http:// and https:// redirects are "
                f"followed; nothing was saved to {final}"
            ) from None
        except _Unverifiable as exc:
            raise CheckpointError(
                f"cannot download {url} into {final}: {exc}; pin the file's sha256 in the source to accept it"
            ) from None
        except urllib.error.HTTPError as exc:
            if exc.code == 416:  # a stale .part longer than the file: start over
                _discard(part, meta)
            elif exc.code < 500:
                raise CheckpointError(f"cannot download {url} into {final}: HTTP {exc.code} {exc.reason}") from None
            error: Exception = exc
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, _Retryable) as exc:
            error = exc
        if attempt == retries:
            raise CheckpointError(f"cannot download {url} into {final} after {retries + 1} attempts: {error}")
        delay = backoff * 2 ** attempt
        log.warning("download of %s failed (%s); retry %d/%d in %.1f s", url, error, attempt + 1, retries, delay)
        time.sleep(delay)


def _download_once(url: str, part: Path, meta: Path, *, pinned: bool) -> None:
    offset = part.stat().st_size if part.exists() else 0
    validator = _read_validator(meta, url) if offset else None
    if offset and validator is None:
        log.info("%s: discarding %s (no ETag/Last-Modified recorded for it, so a resume could mix two "
                 "versions of the file)", url, part)
        _discard(part, meta)
        offset = 0
    headers = {"User-Agent": "submerge", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        headers["If-Range"] = validator
    with _OPENER.open(urllib.request.Request(url, headers=headers), timeout=_TIMEOUT_S) as resp:
        if offset and resp.status == 206:
            first, last = _content_range(resp.headers.get("Content-Range", ""))
            now = _validator(resp.headers)
            if first != offset or (now is not None and now != validator):
                _discard(part, meta)
                raise _Retryable(f"unexpected answer to a resume: Content-Range "
                                 f"{resp.headers.get('Content-Range')!r}, validator {now!r} (had {validator!r})")
            start, mode, total = offset, "ab", last + 1 if last is not None else None
        else:  # the whole file: no Range sent, the file changed (If-Range), or the server ignores Range
            if offset:
                log.info("%s changed on the server since %s was started (or the server ignores Range); "
                         "downloading it from the start", url, part)
            _discard(part, meta)
            meta.write_text(json.dumps({"url": url, "if_range": _validator(resp.headers)}))
            start, mode, total = 0, "wb", None
        length = resp.headers.get("Content-Length")
        if length is not None:
            total = start + int(length)
        chunked = "chunked" in resp.headers.get("Transfer-Encoding", "").lower()
        if total is None and not chunked and not pinned:
            # the body ends when the connection closes: a cut cannot be told from the end
            _discard(part, meta)
            raise _Unverifiable("the server sent it without Content-Length or chunked encoding, so a cut "
                                "transfer cannot be told from a complete one")
        with open(part, mode) as f, tqdm(
            total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=part.name[:-5],
            leave=False, disable=total is not None and total < _PROGRESS_MIN_BYTES,
        ) as bar:
            try:
                while chunk := resp.read(_CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
            except http.client.IncompleteRead as exc:  # a cut chunked body: keep what came, for a resume
                if isinstance(exc.partial, bytes):
                    f.write(exc.partial)
                raise
    size = part.stat().st_size
    if total is not None and size < total:
        raise _Retryable(f"connection closed after {size} of {total} bytes")


def _validator(headers) -> str | None:
    """What to send as ``If-Range``: a strong ETag, else Last-Modified (None when there is neither)."""
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):  # weak ETags are not allowed in If-Range
        return etag
    return headers.get("Last-Modified") or None


def _read_validator(meta: Path, url: str) -> str | None:
    try:
        record = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("url") != url or not isinstance(record.get("if_range"), str):
        return None
    return record["if_range"]


def _content_range(value: str) -> tuple[int | None, int | None]:
    """First and last byte of ``Content-Range: bytes FIRST-LAST/TOTAL`` (Nones when it does not parse)."""
    try:
        unit, _, rest = value.strip().partition(" ")
        first, _, last = rest.split("/", 1)[0].partition("-")
        if unit.lower() == "bytes":
            return int(first), int(last)
    except ValueError:
        pass
    return None, None


def _discard(part: Path, meta: Path) -> None:
    part.unlink(missing_ok=True)
    meta.unlink(missing_ok=True)


class _RedirectRefused(Exception):
    def __init__(self, target: str):
        super().__init__(target)
        self.target = target


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http:// and https:// only (urllib itself follows ftp:// too)."""

    def http_error_302(self, req, fp, code, msg, headers):
        target = headers.get("Location") or headers.get("URI")
        if target:
            target = urllib.parse.urljoin(req.full_url, target)
            if urllib.parse.urlsplit(target).scheme.lower() not in ("http", "https"):
                fp.close()
                raise _RedirectRefused(target)
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


_OPENER = urllib.request.build_opener(_HttpOnlyRedirects)
