"""Snakemake script: one expert's tower and head, its task vector and the task vector's per-layer SVD (see submerge.stages.checkpoints.build_expert, stages.taskvectors.make_task_vector, stages.spectra.expert_spectrum)."""
from submerge.worker import delegate

delegate()  # with a warm worker up (local runs), the job runs there and this process exits
from submerge.logs import setup_logging
from submerge.recipe import Suite
from submerge.stages.checkpoints import build_expert
from submerge.stages.spectra import expert_spectrum
from submerge.stages.taskvectors import make_task_vector

setup_logging(snakemake.log[0], snakemake.threads)
suite, out = Suite.from_params(snakemake.params.suite), snakemake.output
build_expert(suite, snakemake.wildcards.expert, snakemake.input.base, out.model, out.head)
make_task_vector(suite, snakemake.wildcards.expert, snakemake.input.base, out.model, out.taskvector)
expert_spectrum(out.taskvector, out.spectrum)
