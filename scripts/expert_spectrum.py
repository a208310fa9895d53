"""Snakemake script: per-layer SVD of one task vector (see submerge.stages.spectra.expert_spectrum)."""
from submerge.logs import setup_logging
from submerge.stages.spectra import expert_spectrum

setup_logging(snakemake.log[0])
expert_spectrum(snakemake.input[0], snakemake.output[0])
