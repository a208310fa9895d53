"""Snakemake script: one text task's evaluation split, rendered with its prompt templates (see submerge.stages.evaldata.render_eval_text)."""
from submerge.worker import delegate

delegate()  # with a warm worker up (local runs), the job runs there and this process exits
from submerge.logs import setup_logging
from submerge.stages.evaldata import render_eval_text

setup_logging(snakemake.log[0], snakemake.threads)
render_eval_text(snakemake.params.suite, snakemake.wildcards.expert, snakemake.wildcards.split,
                 snakemake.output.data)
