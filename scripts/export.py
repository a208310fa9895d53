"""Snakemake script: the merged model of one (group, method) at the point chosen on validation, in its source's format (see submerge.stages.export.export_model)."""
from submerge.worker import delegate

delegate()  # with a warm worker up (local runs), the job runs there and this process exits
from submerge.logs import setup_logging
from submerge.recipe import Method, Suite, runtime_settings
from submerge.stages.export import export_model

setup_logging(snakemake.log[0], snakemake.threads)
p, i = snakemake.params, snakemake.input
export_model(Suite.from_params(p.suite), p.experts, Method.from_params(p.method),
             snakemake.wildcards.group, i.base, i.merged, i.test, i.grid, i.heads, i.experts,
             snakemake.output[0], device=runtime_settings(snakemake.config)["device"])
