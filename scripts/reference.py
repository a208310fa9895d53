"""Snakemake script: accuracy of one expert and of the base with its head (see submerge.stages.evaluate.run_reference)."""
from submerge.worker import delegate

delegate()  # with a warm worker up (local runs), the job runs there and this process exits
from submerge.logs import setup_logging
from submerge.recipe import EvalSettings, Suite
from submerge.stages.evaluate import run_reference

setup_logging(snakemake.log[0], snakemake.threads)
run_reference(Suite.from_params(snakemake.params.suite), snakemake.wildcards.expert,
              snakemake.input.base, snakemake.input.expert, snakemake.output[0],
              EvalSettings.from_params(snakemake.params.eval, snakemake.config),
              list(snakemake.input.get("evaldata", [])))
