"""Snakemake script: one expert's task vector to HDF5 (see submerge.pipeline.make_task_vector)."""
from submerge.pipeline import make_task_vector, setup_logging

setup_logging(snakemake.log[0])
make_task_vector(snakemake.params.suite, snakemake.wildcards.expert, snakemake.input.base,
                 snakemake.input.expert, snakemake.output[0])
