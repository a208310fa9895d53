"""Snakemake script: the base model's tower, normalised (see submerge.stages.checkpoints.build_base)."""
from submerge.worker import delegate

delegate()  # with a warm worker up (local runs), the job runs there and this process exits
from submerge.logs import setup_logging
from submerge.recipe import Suite
from submerge.stages.checkpoints import build_base

setup_logging(snakemake.log[0], snakemake.threads)
build_base(Suite.from_params(snakemake.params.suite), snakemake.output.model)
