"""Snakemake script: one expert's task vector to HDF5 (see submerge.stages.taskvectors.make_task_vector)."""
from submerge.logs import setup_logging
from submerge.recipe import Suite
from submerge.stages.taskvectors import make_task_vector

setup_logging(snakemake.log[0])
make_task_vector(Suite.from_params(snakemake.params.suite), snakemake.wildcards.expert,
                 snakemake.input.base, snakemake.input.expert, snakemake.output[0])
