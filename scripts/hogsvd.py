"""Snakemake script: per-layer HO-GSVD of one group (see submerge.stages.spectra.hogsvd_group)."""
from submerge.worker import delegate

delegate()  # with a warm worker up (local runs), the job runs there and this process exits
from submerge.logs import setup_logging
from submerge.recipe import HOGSVDSettings, runtime_settings
from submerge.stages.spectra import hogsvd_group

setup_logging(snakemake.log[0], snakemake.threads)
p = snakemake.params
hogsvd_group(p.experts, snakemake.input.taskvectors, snakemake.output[0],
             HOGSVDSettings(pi=p.pi, layers=p.layers),
             device=runtime_settings(snakemake.config)["device"])
