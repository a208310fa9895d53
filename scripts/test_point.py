"""Snakemake script: test accuracy at the grid point chosen on validation (see submerge.pipeline.run_test_point)."""
from submerge.pipeline import run_test_point, setup_logging

setup_logging(snakemake.log[0])
wc = snakemake.wildcards
run_test_point(snakemake.params.suite, snakemake.params.experts, snakemake.params.method,
               wc.group, wc.method, snakemake.input.grid, snakemake.input.references,
               snakemake.input.base, snakemake.input.merged, snakemake.output[0],
               snakemake.params.eval, snakemake.params.selection_metric)
