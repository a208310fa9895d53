"""Snakemake script: the Proposition 1 summary of the largest group (see submerge.stages.decay.decay_summary)."""
from submerge.worker import delegate

delegate()  # with a warm worker up (local runs), the job runs there and this process exits
from submerge.logs import setup_logging
from submerge.stages.decay import decay_summary

setup_logging(snakemake.log[0], snakemake.threads)
p = snakemake.params
decay_summary(snakemake.input.hogsvd, snakemake.input.taskvectors, p.group,
              snakemake.output.summary, p.threshold)
