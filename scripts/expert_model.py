"""Snakemake script: one expert's tower and head (see submerge.pipeline.build_expert)."""
from submerge.pipeline import build_expert, setup_logging

setup_logging(snakemake.log[0])
build_expert(snakemake.params.suite, snakemake.wildcards.expert, snakemake.input.base,
             snakemake.output.model, snakemake.output.head)
