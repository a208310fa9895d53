"""Fetching checkpoint files into a local cache, with optional sha256 pinning.

A source is one of::

    {"hub": {"repo": "org/name", "file": "model.safetensors", "revision": "<commit>"}, "sha256": ...}
    {"url": "https://host/path/file.pt", "sha256": ...}
    {"path": "/local/file.pt", "sha256": ...}

(``trust_pickle`` may sit beside them; it is for :func:`submerge.io.checkpoints.load_checkpoint`.)

* Hub files go through ``huggingface_hub.hf_hub_download`` into ``<cache_dir>/hub``.
* URLs are downloaded with urllib into ``<cache_dir>/url/<hash of url>/<file name>``: a
  ``.part`` file is resumed with an HTTP ``Range`` request after a dropped connection,
  connection errors and 5xx answers are retried with exponential backoff, other 4xx answers
  (404) fail at once. A file that fails its pinned sha256 is deleted, never renamed to its
  final name.
* Offline mode (``SUBMERGE_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``): cached files are served,
  a cache miss is an error that says so.

A pinned hub file that fails its sha256 stays in the hub cache (huggingface_hub owns it);
``fetch`` never returns it. Two processes must not fetch the same URL into the same cache
at the same time (the workflow fetches each checkpoint in one job).
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Mapping

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


class _Retryable(Exception):
    """A transfer broke off in a way that a retry (resuming the .part file) may fix."""


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


def _fetch_url(url: str, cache_dir: Path, sha256: str | None, *, retries: int, backoff: float) -> Path:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"source url {url!r}: only http:// and https:// URLs are supported")
    name = Path(urllib.parse.unquote(parts.path)).name or "download"
    final = cache_dir / "url" / hashlib.sha256(url.encode()).hexdigest()[:16] / name
    if final.is_file():
        if not sha256:
            log.info("%s: using cached %s", url, final)
            return final
        try:
            verify_sha256(final, sha256, what=f"{url} (cached at {final})")
            return final
        except CheckpointError:
            if offline():
                raise
            log.warning("cached %s does not match the pinned sha256; downloading %s again", final, url)
            final.unlink()
    if offline():
        raise CheckpointError(
            f"{url} is not in the cache ({final}) and offline mode is on (SUBMERGE_OFFLINE / HF_HUB_OFFLINE)"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + ".part")
    _download(url, part, retries=retries, backoff=backoff)
    if sha256:
        actual = sha256_file(part)
        if actual != str(sha256).strip().lower():
            part.unlink()
            raise CheckpointError(
                f"sha256 mismatch for {url} (downloaded for {final}): expected {sha256}, got {actual}; "
                "the file was deleted"
            )
    os.replace(part, final)
    return final


def _download(url: str, part: Path, *, retries: int, backoff: float) -> None:
    """Download ``url`` into ``part``, resuming it and retrying broken transfers."""
    for attempt in range(retries + 1):
        try:
            _download_once(url, part)
            return
        except urllib.error.HTTPError as exc:
            if exc.code == 416:  # a stale .part longer than the file: start over
                part.unlink(missing_ok=True)
            elif exc.code < 500:
                raise CheckpointError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from None
            error: Exception = exc
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, _Retryable) as exc:
            error = exc
        if attempt == retries:
            raise CheckpointError(f"cannot download {url} after {retries + 1} attempts: {error}")
        delay = backoff * 2 ** attempt
        log.warning("download of %s failed (%s); retry %d/%d in %.1f s", url, error, attempt + 1, retries, delay)
        time.sleep(delay)


def _download_once(url: str, part: Path) -> None:
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "submerge"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=_TIMEOUT_S) as resp:
        if offset and resp.status == 206:
            if not resp.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
                part.unlink()
                raise _Retryable(f"unexpected Content-Range {resp.headers.get('Content-Range')!r}")
            start, mode = offset, "ab"
        else:  # the whole file (the server ignored the Range, or there was none)
            start, mode = 0, "wb"
        length = resp.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        with open(part, mode) as f, tqdm(
            total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=part.name[:-5],
            leave=False, disable=total is not None and total < _PROGRESS_MIN_BYTES,
        ) as bar:
            while chunk := resp.read(_CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size < total:
        raise _Retryable(f"connection closed after {size} of {total} bytes")
