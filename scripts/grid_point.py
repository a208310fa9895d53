"""Snakemake script: one (group, method, α, β) grid point on validation (see submerge.pipeline.run_grid_point)."""
from submerge.pipeline import run_grid_point, setup_logging

setup_logging(snakemake.log[0])
wc = snakemake.wildcards
run_grid_point(snakemake.params.suite, snakemake.params.experts, snakemake.params.method,
               wc.group, wc.method, snakemake.input.base, snakemake.input.merged,
               float(wc.alpha), None if wc.beta == "none" else float(wc.beta),
               snakemake.output[0], snakemake.params.eval, snakemake.params.save_merged)
