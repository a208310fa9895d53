# Stage 4 + 5: the sweep of each (group, method) over its (α, β) grid on validation, in one job
# (or in parts of eval.points_per_job points), with the test evaluation at the point chosen on
# validation; reference accuracies (each expert and the base with the expert's head); the
# aggregated results/{suite}/scores.csv. Every evaluation is
# kept in a content-addressed cache (results/{suite}/cache/points), so a rerun evaluates only
# the points whose result can have changed.


rule reference:
    input:
        base=model_file("base"),
        expert=f"{R}/models/experts/{{expert}}.safetensors",
        head=f"{R}/heads/{{expert}}.safetensors",
        downloads=expert_data_downloads,
        evaldata=expert_eval_data,
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
        code=code("reference"),
    script:
        "../../scripts/reference.py"


rule sweep_part:
    input:
        base=model_file("base"),
        merged=f"{R}/merged/{{group}}/{{method}}.h5",
        heads=head_files,
        downloads=group_data_downloads,
        evaldata=group_val_eval_data,
    output:
        f"{R}/grid/{{group}}/{{method}}.parts/{{part}}.json",
    log:
        f"logs/{SUITE}/sweep_part/{{group}}/{{method}}/{{part}}.log",
    benchmark:
        f"benchmarks/{SUITE}/sweep_part/{{group}}/{{method}}/{{part}}.tsv"
    conda:
        "../../envs/torch.yaml"
    resources:
        gpu=GPU,
    params:
        experts=group_members,
        method=method_params,
        points=part_points,
        suite=group_suite_params,
        eval=eval_params(),
        cache=POINT_CACHE,
        code=code("sweep_part"),
    script:
        "../../scripts/sweep_part.py"


rule sweep:
    input:
        unpack(sweep_inputs),
        downloads=group_data_downloads,
        evaldata=group_eval_data,
    output:
        grid=directory(f"{R}/grid/{{group}}/{{method}}"),
        test=f"{R}/test/{{group}}/{{method}}.json",
        provenance=f"{R}/test/{{group}}/{{method}}.json.json",
    log:
        f"logs/{SUITE}/sweep/{{group}}/{{method}}.log",
    benchmark:
        f"benchmarks/{SUITE}/sweep/{{group}}/{{method}}.tsv"
    conda:
        "../../envs/torch.yaml"
    resources:
        gpu=GPU,
    params:
        experts=group_members,
        method=method_params,
        points=method_points,
        suite=group_suite_params,
        eval=eval_params(choice=True),
        cache=POINT_CACHE,
        save_merged=RECIPE.save_merged,
        code=code("sweep"),
    script:
        "../../scripts/sweep.py"


rule scores:
    input:
        unpack(score_inputs),
    output:
        scores=f"{R}/scores.csv",
        provenance=f"{R}/scores.csv.json",
    log:
        f"logs/{SUITE}/scores.log",
    benchmark:
        f"benchmarks/{SUITE}/scores.tsv"
    conda:
        "../../envs/report.yaml"
    params:
        suite=SUITE,
        groups={g: list(m) for g, m in GROUPS.items()},
        points=all_point_files,
        code=code("scores"),
    script:
        "../../scripts/scores.py"
