"""Snakemake script: per-layer HO-GSVD of one group (see submerge.stages.spectra.hogsvd_group)."""
from submerge.logs import setup_logging
from submerge.recipe import HOGSVDSettings
from submerge.stages.spectra import hogsvd_group

setup_logging(snakemake.log[0])
p = snakemake.params
hogsvd_group(p.experts, snakemake.input.taskvectors, snakemake.output[0],
             HOGSVDSettings(pi=p.pi, layers=p.layers), device=p.device)
