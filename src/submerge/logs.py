"""Logging set-up of a pipeline job (torch-free)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


def setup_logging(log_path: str | os.PathLike | None) -> None:
    """Log INFO and above to ``log_path`` (Snakemake's ``log:``) and to stderr; an uncaught
    error goes to the log file too."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def excepthook(kind, value, tb):
        logging.getLogger("submerge").critical("job failed", exc_info=(kind, value, tb))

    sys.excepthook = excepthook
