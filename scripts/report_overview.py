"""Snakemake script: the report's landing page and attached config (see
submerge.report.landing.write_overview; no torch)."""
from submerge.worker import delegate

delegate()  # with a warm worker up (local runs), the job runs there and this process exits
from pathlib import Path

from submerge.logs import setup_logging
from submerge.recipe import parse_config
from submerge.report import provenance
from submerge.report.build import check_outputs
from submerge.report.landing import write_overview

setup_logging(snakemake.log[0], snakemake.threads)
config = snakemake.params.config
root = Path(snakemake.output.overview).parent.parent
paths = write_overview(parse_config(config), config, root, snakemake.input.main,
                       snakemake.params.captions)
inputs = [snakemake.input.main]
sidecar = provenance.write_sidecar(paths, inputs, config=config)
check_outputs([*paths, sidecar], snakemake.output)
