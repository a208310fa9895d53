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
        suite=lambda wc: suite_view(experts=[wc.expert]),
        eval=eval_params(),
    script:
        "../../scripts/reference.py"


rule test_point:
    input:
        grid=lambda wc: grid_files(wc.group, wc.method),
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
        experts=lambda wc: members(wc.group),
        method=lambda wc: method_params(wc.method),
        suite=lambda wc: suite_view(experts=members(wc.group)),
        eval=eval_params(),
        selection_metric=config.get("eval", {}).get("selection_metric", "normalized"),
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
        groups=GROUPS,
        methods=METHODS,
    script:
        "../../scripts/scores.py"


rule selection:
    input:
        hogsvd=lambda wc: f"{R}/hogsvd/{selection()['universe']}.h5",
        taskvectors=lambda wc: [f"{R}/taskvectors/{e}.h5" for e in selection_universe()],
        references=lambda wc: [f"{R}/reference/{e}.json" for e in selection_universe()],
        base=model_file("base"),
        heads=lambda wc: [f"{R}/heads/{e}.safetensors" for e in selection_universe()],
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
        suite=lambda wc: suite_view(experts=selection_universe()),
        universe=lambda wc: selection_universe(),
        selection=lambda wc: selection(),
        method_name=lambda wc: selection()["method"],
        method=lambda wc: method_params(selection()["method"]),
        alphas=lambda wc: [float(a) for a in method_alphas(selection()["method"])],
        betas=lambda wc: [
            None if b == "none" else float(b)
            for b in method_betas(selection()["method"])
        ],
        eval=eval_params(),
    script:
        "../../scripts/selection.py"
