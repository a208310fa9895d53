"""Snakemake script: per-layer SVD of one task vector (see submerge.pipeline.expert_spectrum)."""
from submerge.pipeline import expert_spectrum, setup_logging

setup_logging(snakemake.log[0])
expert_spectrum(snakemake.input[0], snakemake.output[0])
