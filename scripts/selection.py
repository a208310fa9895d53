"""Snakemake script: the runs of the expert-selection experiment in one CSV (see submerge.stages.selection.aggregate_selection)."""
from submerge.worker import delegate

delegate()  # with a warm worker up (local runs), the job runs there and this process exits
from submerge.logs import setup_logging
from submerge.stages.selection import aggregate_selection

setup_logging(snakemake.log[0], snakemake.threads)
aggregate_selection(snakemake.input, snakemake.output.selection)
