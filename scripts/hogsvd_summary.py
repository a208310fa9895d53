"""Snakemake script: alignment matrices and subspace importance of one group's HO-GSVD cache (see submerge.stages.report.hogsvd_summary)."""
from submerge.worker import delegate

delegate()  # with a warm worker up (local runs), the job runs there and this process exits
from submerge.logs import setup_logging
from submerge.stages.report import hogsvd_summary

setup_logging(snakemake.log[0], snakemake.threads)
hogsvd_summary(snakemake.input.hogsvd, snakemake.input.taskvectors, snakemake.params.group,
               snakemake.output[0])
