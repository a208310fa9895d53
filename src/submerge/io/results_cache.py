"""A content-addressed store of small JSON results (torch-free).

An entry's key is the sha256 of everything that determines the result (the inputs' hashes, the
settings that change results, the code fingerprint), so an entry is reused exactly when the
result would be the same, and never goes stale: a changed input is a different key. Entries
are written atomically; an unreadable entry counts as absent (and is overwritten).
Layout: ``<root>/<key[:2]>/<key>.json``.
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
        return entry.get("result") if isinstance(entry, dict) and entry.get("key") == key else None

    def put(self, key: str, what: Mapping[str, Any], result: Mapping[str, Any]) -> None:
        write_json(self.path(key), {"key": key, "what": dict(what), "result": dict(result)})
