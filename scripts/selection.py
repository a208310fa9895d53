"""Snakemake script: HO-GSVD expert selection vs random draws (see submerge.stages.evaluate.run_selection)."""
from submerge.logs import setup_logging
from submerge.recipe import EvalSettings, Method, SelectionExperiment, Suite
from submerge.stages.evaluate import run_selection

setup_logging(snakemake.log[0])
p = snakemake.params
run_selection(Suite.from_params(p.suite), p.universe, SelectionExperiment.from_params(p.experiment),
              Method.from_params(p.method), p.grid["alphas"], p.grid["betas"],
              snakemake.input.hogsvd, snakemake.input.taskvectors, snakemake.input.references,
              snakemake.input.base, snakemake.output[0], EvalSettings.from_params(p.eval))
