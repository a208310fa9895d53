"""Snakemake script: the base model's tower, normalised (see submerge.pipeline.build_base)."""
from submerge.pipeline import build_base, setup_logging

setup_logging(snakemake.log[0])
build_base(snakemake.params.suite, snakemake.output.model)
