"""Snakemake script: one expert's tower and head (see submerge.stages.checkpoints.build_expert)."""
from submerge.logs import setup_logging
from submerge.recipe import Suite
from submerge.stages.checkpoints import build_expert

setup_logging(snakemake.log[0])
build_expert(Suite.from_params(snakemake.params.suite), snakemake.wildcards.expert,
             snakemake.input.base, snakemake.output.model, snakemake.output.head)
