"""Snakemake script: per-layer HO-GSVD of one group (see submerge.pipeline.hogsvd_group)."""
from submerge.pipeline import hogsvd_group, setup_logging

setup_logging(snakemake.log[0])
opts = snakemake.params.hogsvd
hogsvd_group(snakemake.params.experts, snakemake.input.taskvectors, snakemake.output[0],
             pi=opts.get("pi", 1e-2), layers=opts.get("layers", "both"),
             device=snakemake.params.device)
