# Stage 6: summaries of the spectra caches, every table (CSV + Markdown + LaTeX) and figure
# (PDF + PNG) of the report, each with a JSON provenance sidecar; `snakemake --report` collects
# them into one HTML file with the captions of workflow/report/.


rule spectra_summary:
    input:
        merged=merged_files,
        test=test_files,
    output:
        summary=f"{R}/summaries/spectra_summary.csv",
        sigma=f"{R}/summaries/singular_values.csv",
    log:
        f"logs/{SUITE}/spectra_summary.log",
    benchmark:
        f"benchmarks/{SUITE}/spectra_summary.tsv"
    conda:
        "../../envs/report.yaml"
    params:
        groups=GROUPS,
        methods=METHODS,
    script:
        "../../scripts/spectra_summary.py"


rule tables:
    input:
        scores=f"{R}/scores.csv",
        selection=lambda wc: ([f"{R}/selection/selection.csv"] if selection() else []),
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
    log:
        f"logs/{SUITE}/tables.log",
    benchmark:
        f"benchmarks/{SUITE}/tables.tsv"
    conda:
        "../../envs/report.yaml"
    params:
        groups=GROUPS,
        methods=METHODS,
        config=report_config(),
        selection_metric=config.get("eval", {}).get("selection_metric", "normalized"),
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
    log:
        f"logs/{SUITE}/figures.log",
    benchmark:
        f"benchmarks/{SUITE}/figures.tsv"
    conda:
        "../../envs/report.yaml"
    params:
        groups=GROUPS,
        methods=METHODS,
        config=report_config(),
    script:
        "../../scripts/figures.py"
