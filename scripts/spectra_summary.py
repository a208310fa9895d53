"""Snakemake script: rank and spectrum summaries of all merged caches (see submerge.report.build.spectra_summary)."""
from pathlib import Path

from submerge.pipeline import setup_logging
from submerge.report.build import spectra_summary

setup_logging(snakemake.log[0])


def key(path):
    return Path(path).parent.name, Path(path).stem  # (group, method)


spectra_summary({key(p): p for p in snakemake.input.merged}, {key(p): p for p in snakemake.input.test},
                snakemake.params.groups, snakemake.params.methods,
                snakemake.output.summary, snakemake.output.sigma)
