"""Snakemake script: rank and spectrum summaries of all merged caches (see submerge.stages.report.spectra_summary)."""
from submerge.worker import delegate

delegate()  # with a warm worker up (local runs), the job runs there and this process exits
from submerge.logs import setup_logging
from submerge.recipe import Method
from submerge.stages.report import keyed, spectra_summary

setup_logging(snakemake.log[0], snakemake.threads)
spectra_summary(keyed(snakemake.input.merged), keyed(snakemake.input.test),
                snakemake.params.n_experts,
                {name: Method.from_params(p) for name, p in snakemake.params.methods.items()},
                snakemake.output.summary, snakemake.output.sigma)
