"""Snakemake script: Δ_merge of one (group, method) and its SVD cache (see submerge.stages.merge.merge_group)."""
from submerge.worker import delegate

delegate()  # with a warm worker up (local runs), the job runs there and this process exits
from submerge.logs import setup_logging
from submerge.merges import EXTRA_INPUTS
from submerge.recipe import Method, runtime_settings
from submerge.stages.merge import merge_group

setup_logging(snakemake.log[0], snakemake.threads)
p = snakemake.params
merge_group(p.experts, snakemake.input.taskvectors, Method.from_params(p.method), snakemake.output.merged,
            extra_paths={n: snakemake.input[n] for n in EXTRA_INPUTS if n in snakemake.input.keys()},
            device=runtime_settings(snakemake.config)["device"])
