"""Snakemake script: aggregate all grid/test/reference JSONs into scores.csv (see submerge.stages.evaluate.aggregate_scores)."""
from submerge.logs import setup_logging
from submerge.stages.evaluate import aggregate_scores

setup_logging(snakemake.log[0])
aggregate_scores(snakemake.params.suite, snakemake.params.groups, snakemake.input.grid,
                 snakemake.input.test, snakemake.input.references, snakemake.output[0])
