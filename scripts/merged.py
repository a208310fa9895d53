"""Snakemake script: Δ_merge of one (group, method) and its SVD cache (see submerge.pipeline.merge_group)."""
from submerge.pipeline import merge_group, setup_logging

setup_logging(snakemake.log[0])
merge_group(snakemake.params.experts, snakemake.input.taskvectors, snakemake.params.method,
            snakemake.output[0], lambdas_path=snakemake.input.get("lambdas"),
            device=snakemake.params.device)
