"""Snakemake script: test accuracy at the grid point chosen on validation (see submerge.stages.evaluate.run_test_point)."""
from submerge.logs import setup_logging
from submerge.recipe import EvalSettings, Method, Suite
from submerge.stages.evaluate import run_test_point

setup_logging(snakemake.log[0])
p = snakemake.params
run_test_point(Suite.from_params(p.suite), p.experts, Method.from_params(p.method),
               snakemake.wildcards.group, snakemake.input.grid, snakemake.input.references,
               snakemake.input.base, snakemake.input.merged, snakemake.output[0],
               EvalSettings.from_params(p.eval))
