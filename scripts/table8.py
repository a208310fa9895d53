"""Snakemake script: paper Table 8, the β_attn × β_mlp grid (see submerge.stages.beta_grid.run_table8)."""
from submerge.worker import delegate

delegate()  # with a warm worker up (local runs), the job runs there and this process exits
from submerge.logs import setup_logging
from submerge.recipe import EvalSettings, Method, Suite, Table8Experiment
from submerge.stages.beta_grid import run_table8

setup_logging(snakemake.log[0], snakemake.threads)
p, i = snakemake.params, snakemake.input
run_table8(Suite.from_params(p.suite), p.experts, Method.from_params(p.method),
           Table8Experiment.from_params(p.experiment), i.base, i.merged, i.heads, i.references,
           snakemake.output.table8, EvalSettings.from_params(p.eval, snakemake.config), p.cache,
           list(i.get("evaldata", [])))
