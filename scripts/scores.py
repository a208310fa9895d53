"""Snakemake script: aggregate all grid/test/reference JSONs into scores.csv (see submerge.pipeline.aggregate_scores)."""
from submerge.pipeline import aggregate_scores, setup_logging

setup_logging(snakemake.log[0])
aggregate_scores(snakemake.params.suite, snakemake.params.groups, snakemake.input.grid,
                 snakemake.input.test, snakemake.input.references, snakemake.output[0])
