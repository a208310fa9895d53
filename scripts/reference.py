"""Snakemake script: accuracy of one expert and of the base with its head (see submerge.pipeline.run_reference)."""
from submerge.pipeline import run_reference, setup_logging

setup_logging(snakemake.log[0])
run_reference(snakemake.params.suite, snakemake.wildcards.expert, snakemake.input.base,
              snakemake.input.expert, snakemake.output[0], snakemake.params.eval)
