"""A content-addressed store of small JSON results (torch-free).

An entry's key is the sha256 of everything that determines the result (the inputs' hashes, the
settings that change results, the code fingerprint), so an entry is reused exactly when the
result would be the same, and never goes stale: a changed input is a different key. Entries
are written atomically; an unreadable entry counts as absent (and is overwritten), and so does
one whose ``what`` does not hash to its key or whose result does not match the sha256 recorded
with it (a changed digit still parses).
Layout: ``<root>/<key[:2]>/<key>.json``: ``{"key", "what", "result", "result_sha256"}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

from submerge.io.jsonio import write_json

log = logging.getLogger(__name__)


def _result_sha256(result: Any) -> str:
    text = json.dumps(result, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def result_key(what: Mapping[str, Any]) -> str:
    """The key of a result: sha256 of the canonical JSON of what determines it."""
    text = json.dumps(what, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class ResultsCache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        path = self.path(key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            log.warning("%s: unreadable cache entry (%s): computing it again", path, err)
            return None
        if not isinstance(entry, dict) or entry.get("key") != key:
            return None
        result = entry.get("result")
        try:  # what it records must hash to its key, the result to its sha256 (entries written
            # before the sha256 was recorded have none)
            intact = result_key(entry["what"]) == key and (
                "result_sha256" not in entry or entry["result_sha256"] == _result_sha256(result))
        except (KeyError, TypeError, ValueError):
            intact = False
        if not intact:
            log.warning("%s: cache entry does not match its key or sha256 (damaged): computing it "
                        "again", path)
            return None
        return result

    def put(self, key: str, what: Mapping[str, Any], result: Mapping[str, Any]) -> None:
        result = dict(result)
        write_json(self.path(key), {"key": key, "what": dict(what), "result": result,
                                    "result_sha256": _result_sha256(result)})
