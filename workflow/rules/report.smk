# Stage 6: summaries of the spectra and HO-GSVD caches (torch), then every table (CSV + Markdown
# + LaTeX + HTML) and figure (PDF + PNG) of the report with a JSON provenance sidecar each (no
# torch), and the report's landing page; `snakemake --report` collects them into one HTML file
# with the captions of workflow/report/ (tables shown as HTML, figures as PNG).
# The tables and figures, their inputs and files are those of submerge.report.registry (the
# one list; the rules, the jobs and the captions all read it). Every input here is known when
# the DAG is built: plain lists, no input functions.
import functools

from submerge.report import landing as LANDING
from submerge.report import registry as REPORT

SUMMARIES = f"{R}/summaries"
HOGSVD_GROUP = RECIPE.largest_group()
# the files of each report input (submerge.report.registry.INPUTS); [] where the config has none
REPORT_INPUTS = {
    "scores": [f"{R}/scores.csv"],
    "selection": [f"{R}/selection/selection.csv"] if selection() else [],
    "benchmarks": merge_benchmarks(None),
    "spectra_summary": [f"{SUMMARIES}/spectra_summary.csv"],
    "singular_values": [f"{SUMMARIES}/singular_values.csv"],
    "hogsvd_summary": [f"{SUMMARIES}/hogsvd_summary.json"],
    "table8": [T8_FILE] if RECIPE.table8 else [],
    "decay_summary": [f"{SUMMARIES}/decay_summary.json"],
}
OVERVIEW, OVERVIEW_CONFIG, OVERVIEW_SIDECAR = LANDING.overview_files(R)
# every table and figure file, the landing page and the attached config (all_targets() in
# common.smk)
report_targets = functools.partial(LANDING.target_files, R)


rule spectra_summary:
    input:
        merged=merged_files,
        test=test_files,
    output:
        summary=f"{SUMMARIES}/spectra_summary.csv",
        sigma=f"{SUMMARIES}/singular_values.csv",
    log:
        f"logs/{SUITE}/spectra_summary.log",
    benchmark:
        f"benchmarks/{SUITE}/spectra_summary.tsv"
    conda:
        "../../envs/torch.yaml"
    params:
        n_experts={g: len(members) for g, members in RECIPE.groups.items()},
        methods={name: m.to_params() for name, m in RECIPE.methods.items()},
        code=code("spectra_summary"),
    script:
        "../../scripts/spectra_summary.py"


rule hogsvd_summary:
    input:
        hogsvd=f"{R}/hogsvd/{HOGSVD_GROUP}.h5",
        taskvectors=[f"{R}/taskvectors/{e}.h5" for e in RECIPE.members(HOGSVD_GROUP)],
    output:
        f"{SUMMARIES}/hogsvd_summary.json",
    log:
        f"logs/{SUITE}/hogsvd_summary.log",
    benchmark:
        f"benchmarks/{SUITE}/hogsvd_summary.tsv"
    conda:
        "../../envs/torch.yaml"
    params:
        group=HOGSVD_GROUP,
        code=code("hogsvd_summary"),
    script:
        "../../scripts/hogsvd_summary.py"


# tables and figures get the config as params (less the settings that change no result): the
# jobs parse it with parse_config, any change of it (a label included) reruns them, and every
# sidecar records it
rule tables:
    input:
        **REPORT.rule_inputs(REPORT.TABLES, REPORT_INPUTS),
    output:
        REPORT.rule_outputs(REPORT.TABLES, f"{R}/{REPORT.TABLES_DIR}", report),
    log:
        f"logs/{SUITE}/tables.log",
    benchmark:
        f"benchmarks/{SUITE}/tables.tsv"
    conda:
        "../../envs/report.yaml"
    params:
        config=LANDING.ConfigParam(result_config()),
        code=code("tables"),
    script:
        "../../scripts/tables.py"


rule figures:
    input:
        **REPORT.rule_inputs(REPORT.FIGURES, REPORT_INPUTS),
    output:
        REPORT.rule_outputs(REPORT.FIGURES, f"{R}/{REPORT.FIGURES_DIR}", report),
    log:
        f"logs/{SUITE}/figures.log",
    benchmark:
        f"benchmarks/{SUITE}/figures.tsv"
    conda:
        "../../envs/report.yaml"
    params:
        config=LANDING.ConfigParam(result_config()),
        code=code("figures"),
    script:
        "../../scripts/figures.py"


# the landing page of `snakemake --report` (workflow/report/workflow.rst includes it): the
# suite, what was merged, the main table and a line per table and figure; and the config,
# attached as a file (the report's "Job parameters" name it instead of printing it)
rule report_overview:
    input:
        main=f"{R}/{REPORT.TABLES_DIR}/{LANDING.MAIN_TABLE}.html",
    output:
        overview=report(
            OVERVIEW,
            caption="../report/overview.rst",
            category=LANDING.CATEGORY,
            labels={"file": "overview"},
        ),
        config=report(
            OVERVIEW_CONFIG,
            caption="../report/config.rst",
            category=LANDING.CATEGORY,
            labels={"file": "configuration"},
        ),
        sidecar=OVERVIEW_SIDECAR,
    log:
        f"logs/{SUITE}/report_overview.log",
    benchmark:
        f"benchmarks/{SUITE}/report_overview.tsv"
    conda:
        "../../envs/report.yaml"
    params:
        config=LANDING.ConfigParam(result_config()),
        # the captions' texts, not their paths (a clone elsewhere reruns nothing)
        captions=LANDING.caption_texts(
            f"{workflow.basedir}/workflow/report/{e.rst}"
            for e in [*REPORT.TABLES.values(), *REPORT.FIGURES.values()]
        ),
        code=code("report_overview"),
    script:
        "../../scripts/report_overview.py"
