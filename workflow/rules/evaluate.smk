# Stage 5: reference accuracies (each expert and the base with the expert's head), the test
# evaluation at the grid point chosen on validation, the expert-selection experiment, and the
# aggregated results/{suite}/scores.csv.


rule reference:
    input:
        base=model_file("base"),
        expert=f"{R}/models/experts/{{expert}}.safetensors",
        head=f"{R}/heads/{{expert}}.safetensors",
    output:
        f"{R}/reference/{{expert}}.json",
    log:
        f"logs/{SUITE}/reference/{{expert}}.log",
    benchmark:
        f"benchmarks/{SUITE}/reference/{{expert}}.tsv"
    conda:
        "../../envs/torch.yaml"
    resources:
        gpu=GPU,
    params:
        suite=expert_suite_params,
        eval=eval_params(),
    script:
        "../../scripts/reference.py"


rule test_point:
    input:
        grid=method_grid_files,
        references=reference_files,
        base=model_file("base"),
        merged=f"{R}/merged/{{group}}/{{method}}.h5",
        heads=head_files,
    output:
        f"{R}/test/{{group}}/{{method}}.json",
    log:
        f"logs/{SUITE}/test/{{group}}/{{method}}.log",
    benchmark:
        f"benchmarks/{SUITE}/test/{{group}}/{{method}}.tsv"
    conda:
        "../../envs/torch.yaml"
    resources:
        gpu=GPU,
    params:
        experts=group_members,
        method=method_params,
        suite=group_suite_params,
        eval=eval_params(),
    script:
        "../../scripts/test_point.py"


rule scores:
    input:
        unpack(score_inputs),
    output:
        f"{R}/scores.csv",
    log:
        f"logs/{SUITE}/scores.log",
    benchmark:
        f"benchmarks/{SUITE}/scores.tsv"
    conda:
        "../../envs/report.yaml"
    params:
        suite=SUITE,
        groups={g: list(m) for g, m in GROUPS.items()},
    script:
        "../../scripts/scores.py"


rule selection:
    input:
        unpack(selection_inputs),
    output:
        f"{R}/selection/selection.csv",
    log:
        f"logs/{SUITE}/selection.log",
    benchmark:
        f"benchmarks/{SUITE}/selection.tsv"
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
        eval=eval_params(),
    script:
        "../../scripts/selection.py"
