# submerge: subspace-boosted model merging (Skorobogat et al., arXiv 2506.16506).
#   snakemake --cores all --configfile config/config.yaml           (embedded digits suite, CPU)
#   snakemake --profile profiles/slurm --configfile config/suites/vit-b-32.yaml
import os

from snakemake.utils import min_version

min_version("9.0")


# The default config is loaded unless a --configfile is given (a real suite's config must not
# be merged key by key into the digits suite's experts and groups); --config overrides apply
# on top of either.
if not workflow.overwrite_configfiles:

    configfile: os.path.join(workflow.basedir, "config", "config.yaml")


# the landing page of `snakemake --report` (the overview written by the rule report_overview)
report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/fetch.smk"
include: "workflow/rules/checkpoints.smk"
include: "workflow/rules/evaldata.smk"
include: "workflow/rules/spectra.smk"
include: "workflow/rules/merge.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/selection.smk"
include: "workflow/rules/table8.smk"
include: "workflow/rules/decay.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/export.smk"


onstart:
    lock_suite()  # one run per suite at a time
    # temporary files that a killed job left behind (never those of a running writer)
    clean_stale_temporaries(R)
    start_warm_worker()  # local runs: jobs start in a preloaded process


onsuccess:
    stop_warm_worker()


onerror:
    stop_warm_worker()


rule all:
    default_target: True
    input:
        all_targets(),
        export_targets(),
