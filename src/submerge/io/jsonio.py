"""JSON results: written atomically with sorted keys, read with the file named on error
(torch-free)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from submerge.errors import CheckpointError
from submerge.io.atomic import write_text_atomic


def write_json(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read JSON ({err}); delete it and rerun the rule "
                              "that writes it") from err
