"""Snakemake script: one run of the expert-selection experiment (see submerge.stages.selection.run_selection_draw)."""
from submerge.worker import delegate

delegate()  # with a warm worker up (local runs), the job runs there and this process exits
from submerge.logs import setup_logging
from submerge.recipe import EvalSettings, Method, SelectionExperiment, Suite
from submerge.stages.selection import run_selection_draw

setup_logging(snakemake.log[0], snakemake.threads)
p, i = snakemake.params, snakemake.input
run_selection_draw(Suite.from_params(p.suite), p.universe,
                   SelectionExperiment.from_params(p.experiment), Method.from_params(p.method),
                   p.grid["alphas"], p.grid["betas"], snakemake.wildcards.run, i.hogsvd,
                   i.taskvectors, i.references, i.base, snakemake.output[0],
                   EvalSettings.from_params(p.eval, snakemake.config),
                   list(i.get("evaldata", [])))
