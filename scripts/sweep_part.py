"""Snakemake script: one part of a (group, method)'s grid on validation, into the results cache (see submerge.stages.evaluate.run_sweep_part)."""
from submerge.worker import delegate

delegate()  # with a warm worker up (local runs), the job runs there and this process exits
from submerge.logs import setup_logging
from submerge.recipe import EvalSettings, GridPoint, Method, Suite
from submerge.stages.evaluate import run_sweep_part

setup_logging(snakemake.log[0], snakemake.threads)
p, i = snakemake.params, snakemake.input
run_sweep_part(Suite.from_params(p.suite), p.experts, Method.from_params(p.method),
               snakemake.wildcards.group, [GridPoint.parse(n) for n in p.points], i.base,
               i.merged, i.heads, snakemake.output[0], EvalSettings.from_params(p.eval, snakemake.config),
               p.cache, list(i.get("evaldata", [])))
