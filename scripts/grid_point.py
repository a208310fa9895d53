"""Snakemake script: one (group, method, α, β) grid point on validation (see submerge.stages.evaluate.run_grid_point)."""
from submerge.logs import setup_logging
from submerge.recipe import EvalSettings, GridPoint, Method, Suite
from submerge.stages.evaluate import run_grid_point

setup_logging(snakemake.log[0])
p, wc = snakemake.params, snakemake.wildcards
run_grid_point(Suite.from_params(p.suite), p.experts, Method.from_params(p.method), wc.group,
               snakemake.input.base, snakemake.input.merged, GridPoint.parse(wc.point),
               snakemake.output[0], EvalSettings.from_params(p.eval), p.save_merged)
