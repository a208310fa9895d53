"""Snakemake script: the downloads of one fetch job on the submit host (see submerge.stages.fetch)."""
from submerge.worker import delegate

delegate()  # with a warm worker up (local runs), the job runs there and this process exits
from submerge.logs import setup_logging
from submerge.stages.fetch import prefetch_dataset, prefetch_sources, prefetch_tokenizer

setup_logging(snakemake.log[0], snakemake.threads)
params, out = snakemake.params, snakemake.output[0]
if snakemake.rule == "fetch_checkpoints":
    prefetch_sources(params.sources, out)
elif snakemake.rule == "fetch_dataset":
    prefetch_dataset(params.dataset, out, expert=snakemake.wildcards.expert)
else:  # fetch_tokenizer
    prefetch_tokenizer(params.tokenizer, out)
