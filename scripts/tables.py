"""Snakemake script: every table of the report (see submerge.report.build.build_tables; no torch)."""
from submerge.worker import delegate

delegate()  # with a warm worker up (local runs), the job runs there and this process exits
from pathlib import Path

from submerge.logs import setup_logging
from submerge.recipe import parse_config
from submerge.report.build import build_tables, check_outputs, named_inputs

setup_logging(snakemake.log[0], snakemake.threads)
config = snakemake.params.config
written = build_tables(named_inputs(snakemake.input), parse_config(config),
                       Path(snakemake.output[0]).parent, config=config)
check_outputs(written, snakemake.output)
