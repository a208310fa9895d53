# Stage 6: summaries of the spectra caches, every table (CSV + Markdown + LaTeX) and figure
# (PDF + PNG) of the report, each with a JSON provenance sidecar; `snakemake --report` collects
# them into one HTML file with the captions of workflow/report/.

TABLE_NAMES = [
    "main_results",
    "sota_comparison",
    "beta_ablation",
    "layer_ablation",
    "per_task_accuracy",
    "expert_selection",
    "merging_time",
]
FIGURE_NAMES = [
    "rank_collapse",
    "spectra",
    "accuracy_vs_experts",
    "alpha_beta_heatmap",
    "alignment_matrix",
    "subspace_importance",
]


def largest_group():
    return max(GROUPS, key=lambda g: len(GROUPS[g]))


def report_targets():
    return [f"{R}/tables/{t}.csv" for t in TABLE_NAMES] + [
        f"{R}/figures/{f}.png" for f in FIGURE_NAMES
    ]


def report_config():
    """The config keys that shape the report (recorded in every sidecar)."""
    keys = ("suite", "adapter", "groups", "methods", "grid", "eval", "experiments", "hogsvd")
    return {k: config[k] for k in keys if k in config}


def merged_files(wildcards):
    return [f"{R}/merged/{g}/{m}.h5" for g, m in PAIRS]


def test_files(wildcards):
    return [f"{R}/test/{g}/{m}.json" for g, m in PAIRS]


def merge_benchmarks(wildcards):
    return [f"benchmarks/{SUITE}/merged/{g}/{m}.tsv" for g, m in PAIRS]


rule spectra_summary:
    input:
        merged=merged_files,
        test=test_files,
    output:
        summary=f"{R}/summaries/spectra_summary.csv",
        sigma=f"{R}/summaries/singular_values.csv",
    params:
        groups=GROUPS,
        methods=METHODS,
    log:
        f"logs/{SUITE}/spectra_summary.log",
    benchmark:
        f"benchmarks/{SUITE}/spectra_summary.tsv"
    conda:
        "../../envs/report.yaml"
    script:
        "../../scripts/spectra_summary.py"


rule tables:
    input:
        scores=f"{R}/scores.csv",
        selection=lambda wc: (
            [f"{R}/selection/selection.csv"] if selection() else []
        ),
        benchmarks=merge_benchmarks,
    output:
        [
            report(
                f"{R}/tables/{t}.csv",
                caption=f"../report/{t}.rst",
                category="Tables",
                labels={"table": t},
            )
            for t in TABLE_NAMES
        ],
    params:
        groups=GROUPS,
        methods=METHODS,
        config=report_config(),
        selection_metric=config.get("eval", {}).get("selection_metric", "normalized"),
    log:
        f"logs/{SUITE}/tables.log",
    conda:
        "../../envs/report.yaml"
    script:
        "../../scripts/tables.py"


rule figures:
    input:
        scores=f"{R}/scores.csv",
        summary=f"{R}/summaries/spectra_summary.csv",
        sigma=f"{R}/summaries/singular_values.csv",
        hogsvd=lambda wc: f"{R}/hogsvd/{largest_group()}.h5",
        taskvectors=lambda wc: [
            f"{R}/taskvectors/{e}.h5" for e in members(largest_group())
        ],
    output:
        [
            report(
                f"{R}/figures/{f}.png",
                caption=f"../report/{f}.rst",
                category="Figures",
                labels={"figure": f},
            )
            for f in FIGURE_NAMES
        ],
    params:
        groups=GROUPS,
        methods=METHODS,
        config=report_config(),
    log:
        f"logs/{SUITE}/figures.log",
    conda:
        "../../envs/report.yaml"
    script:
        "../../scripts/figures.py"
