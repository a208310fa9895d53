"""Snakemake script: HO-GSVD expert selection vs random draws (see submerge.pipeline.run_selection)."""
from submerge.pipeline import run_selection, setup_logging

setup_logging(snakemake.log[0])
p = snakemake.params
run_selection(p.suite, p.universe, p.selection, p.method_name, p.method, p.alphas, p.betas,
              snakemake.input.hogsvd, snakemake.input.taskvectors, snakemake.input.references,
              snakemake.input.base, snakemake.output[0], p.eval)
