"""Snakemake script: one image task's evaluation split, decoded and resized/cropped once (see submerge.stages.evaldata.prepare_eval_data)."""
from submerge.worker import delegate

delegate()  # with a warm worker up (local runs), the job runs there and this process exits
from submerge.logs import setup_logging
from submerge.stages.evaldata import prepare_eval_data

setup_logging(snakemake.log[0], snakemake.threads)
prepare_eval_data(snakemake.params.suite, snakemake.wildcards.expert, snakemake.wildcards.split,
                  snakemake.params.max_examples, snakemake.output.data)
