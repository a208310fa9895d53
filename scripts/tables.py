"""Snakemake script: every table of the report (see submerge.report.build.build_tables)."""
from pathlib import Path

from submerge.pipeline import setup_logging
from submerge.report.build import build_tables

setup_logging(snakemake.log[0])
benchmarks = {(Path(p).parent.name, Path(p).stem): p for p in snakemake.input.benchmarks}
build_tables(snakemake.input.scores, snakemake.params.methods, snakemake.params.groups,
             Path(snakemake.output[0]).parent,
             selection_path=snakemake.input.selection[0] if snakemake.input.selection else None,
             benchmarks=benchmarks, config=snakemake.params.config,
             selection_metric=snakemake.params.selection_metric)
