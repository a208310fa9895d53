"""Helpers to run the project's Snakefile on a config in a temporary working directory."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"


def load_tiny() -> dict:
    return yaml.safe_load(TINY.read_text())


def write_config(workdir: Path, cfg: dict, name: str = "config.yaml") -> Path:
    path = workdir / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def snakemake(workdir: Path, configfile: Path, *args: str, check: bool = True,
              timeout: int = 1200, snakefile: Path = ROOT / "Snakefile") -> subprocess.CompletedProcess:
    """Run the project's Snakefile (or ``snakefile``) with ``workdir`` as working directory."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(snakefile), "-d", str(workdir),
           "--configfile", str(configfile), "--cores", "2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-8000:]}")
    return proc


def planned_jobs(workdir: Path, configfile: Path, snakefile: Path = ROOT / "Snakefile"
                 ) -> set[tuple[str, str]]:
    """(rule, first output) of every job a dry run would execute; ``all`` is left out."""
    proc = snakemake(workdir, configfile, "-n", snakefile=snakefile)
    text = proc.stdout + proc.stderr
    if "Nothing to be done" in text:
        return set()
    jobs = set()
    # grouped jobs (rules with a `group:`) are printed indented
    for block in re.split(r"\n(?=\s*(?:local)?rule \w+:)", text):
        m = re.match(r"(?:local)?rule (\w+):", block.strip())
        if not m or m.group(1) == "all":
            continue
        out = re.search(r"^\s+output: ([^\n]*)", block, re.MULTILINE)
        jobs.add((m.group(1), out.group(1).split(",")[0].strip() if out else ""))
    return jobs
