"""Snakemake script: the (α, β) grid of one (group, method) on validation and the chosen point on test (see submerge.stages.evaluate.run_sweep)."""
from submerge.worker import delegate

delegate()  # with a warm worker up (local runs), the job runs there and this process exits
from submerge.logs import setup_logging
from submerge.recipe import EvalSettings, GridPoint, Method, Suite
from submerge.stages.evaluate import run_sweep

setup_logging(snakemake.log[0], snakemake.threads)
p, i = snakemake.params, snakemake.input
run_sweep(Suite.from_params(p.suite), p.experts, Method.from_params(p.method),
          snakemake.wildcards.group, [GridPoint.parse(n) for n in p.points], i.base, i.merged,
          i.heads, i.references, snakemake.output.grid, snakemake.output.test,
          EvalSettings.from_params(p.eval, snakemake.config), p.cache, p.save_merged,
          list(i.get("evaldata", [])))
