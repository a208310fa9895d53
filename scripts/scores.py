"""Snakemake script: aggregate all grid/test/reference JSONs into scores.csv (see submerge.stages.evaluate.aggregate_scores)."""
from submerge.worker import delegate

delegate()  # with a warm worker up (local runs), the job runs there and this process exits
from submerge.logs import setup_logging
from submerge.stages.evaluate import aggregate_scores

setup_logging(snakemake.log[0], snakemake.threads)
aggregate_scores(snakemake.params.suite, snakemake.params.groups, snakemake.params.points,
                 snakemake.input.test, snakemake.input.references, snakemake.output.scores)
