"""Snakemake script: every figure of the report (see submerge.report.build.build_figures)."""
from pathlib import Path

from submerge.pipeline import setup_logging
from submerge.report.build import build_figures

setup_logging(snakemake.log[0])
build_figures(snakemake.input.scores, snakemake.input.summary, snakemake.input.sigma,
              snakemake.input.hogsvd, snakemake.input.taskvectors, snakemake.params.methods,
              snakemake.params.groups, Path(snakemake.output[0]).parent, config=snakemake.params.config)
