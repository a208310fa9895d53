"""Snakemake script: TALL-mask λ per task chosen on validation (see submerge.pipeline.choose_tall_lambdas)."""
from submerge.pipeline import choose_tall_lambdas, setup_logging

setup_logging(snakemake.log[0])
choose_tall_lambdas(snakemake.params.suite, snakemake.params.experts, snakemake.input.base,
                    snakemake.input.taskvectors, snakemake.params.lambdas, snakemake.output[0],
                    snakemake.params.eval)
