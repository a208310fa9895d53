# Stage 5b: the expert-selection experiment (paper Tables 5 and 10): candidates chosen next to a
# pool by the HO-GSVD Alignment Matrix vs random draws. One job per run (the HO-GSVD choice, each
# random draw): merged, its α/β chosen on validation, scored on test; then the runs collected.


rule selection_run:
    input:
        unpack(selection_inputs),
        downloads=selection_data_downloads,
        evaldata=selection_eval_data,
    output:
        f"{R}/selection/runs/{{run}}.csv",
    log:
        f"logs/{SUITE}/selection/{{run}}.log",
    benchmark:
        f"benchmarks/{SUITE}/selection/{{run}}.tsv"
    conda:
        "../../envs/torch.yaml"
    resources:
        gpu=GPU,
    params:
        suite=selection_suite_params,
        universe=selection_universe_params,
        experiment=selection_experiment_params,
        method=selection_method_params,
        grid=selection_grid_params,
        eval=eval_params(choice=True),
        code=code("selection_run", merges=True),
    script:
        "../../scripts/selection_run.py"


rule selection:
    input:
        selection_run_files,
    output:
        selection=f"{R}/selection/selection.csv",
        provenance=f"{R}/selection/selection.csv.json",
    log:
        f"logs/{SUITE}/selection.log",
    benchmark:
        f"benchmarks/{SUITE}/selection.tsv"
    conda:
        "../../envs/report.yaml"
    params:
        code=code("selection"),
    script:
        "../../scripts/selection.py"
