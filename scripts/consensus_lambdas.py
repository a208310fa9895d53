"""Snakemake script: TALL-mask λ per task chosen on validation (see submerge.stages.merge.choose_tall_lambdas)."""
from submerge.worker import delegate

delegate()  # with a warm worker up (local runs), the job runs there and this process exits
from submerge.logs import setup_logging
from submerge.recipe import EvalSettings, Suite
from submerge.stages.merge import choose_tall_lambdas

setup_logging(snakemake.log[0], snakemake.threads)
p = snakemake.params
choose_tall_lambdas(Suite.from_params(p.suite), p.experts, snakemake.input.base,
                    snakemake.input.taskvectors, p.lambdas, snakemake.output[0],
                    EvalSettings.from_params(p.eval, snakemake.config),
                    list(snakemake.input.get("evaldata", [])))
