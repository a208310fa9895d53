"""Logging set-up of a pipeline job (torch-free)."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path


def setup_logging(log_path: str | os.PathLike | None, threads: int | None = None) -> None:
    """Log INFO and above to ``log_path`` (Snakemake's ``log:``) and to stderr; an uncaught
    error goes to the log file too. ``threads`` (Snakemake's ``threads`` of the job) caps the
    math libraries' threads, so that parallel jobs do not oversubscribe the cores (two
    spinning OpenMP threads per core made one SVD 30x slower). Torch's intra-op threads (OpenMP,
    MKL) and its inter-op pool both get ``threads`` when torch is already imported (the scripts
    import the stage modules first); otherwise the environment variables cap the intra-op
    threads when torch is imported. Without ``threads`` (a library caller) torch's settings are
    the caller's."""
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(threads)
        if "torch" in sys.modules:
            torch = sys.modules["torch"]
            torch.set_num_threads(int(threads))
            try:
                torch.set_num_interop_threads(int(threads))
            except RuntimeError:  # settable once, before any inter-op work; a job has done none
                logging.getLogger("submerge").debug("inter-op threads already set")
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:  # how long the job took to get here: interpreter, imports, Snakemake's script preamble
        import psutil

        # in the warm worker (submerge.worker) the job's own process started before this one
        started = os.environ.get("SUBMERGE_JOB_START") or psutil.Process().create_time()
        logging.getLogger("submerge").info("start-up: %.2f s", time.time() - float(started))
    except ImportError:  # psutil comes with Snakemake; outside it the start-up is not logged
        pass

    def excepthook(kind, value, tb):
        logging.getLogger("submerge").critical("job failed", exc_info=(kind, value, tb))

    sys.excepthook = excepthook
