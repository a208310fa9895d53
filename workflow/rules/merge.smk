# Stage 3b + 4: per (group, method) the merged task vector Δ_merge (without α) and, for boosted
# methods, the per-layer SVD of each boosted matrix (computed once); then one job per
# (group, method, α, β) grid point that reconstructs from the cache and evaluates on validation.


rule consensus_lambdas:
    input:
        base=model_file("base"),
        taskvectors=taskvector_files,
        heads=head_files,
    output:
        f"{R}/merged/{{group}}/tall_lambdas.json",
    log:
        f"logs/{SUITE}/consensus_lambdas/{{group}}.log",
    benchmark:
        f"benchmarks/{SUITE}/consensus_lambdas/{{group}}.tsv"
    conda:
        "../../envs/torch.yaml"
    resources:
        gpu=GPU,
    params:
        experts=group_members,
        suite=group_suite_params,
        lambdas=list(RECIPE.consensus_lambdas),
        eval=eval_params(),
    script:
        "../../scripts/consensus_lambdas.py"


rule merged:
    input:
        unpack(merged_inputs),
    output:
        f"{R}/merged/{{group}}/{{method}}.h5",
    log:
        f"logs/{SUITE}/merged/{{group}}/{{method}}.log",
    benchmark:
        f"benchmarks/{SUITE}/merged/{{group}}/{{method}}.tsv"
    conda:
        "../../envs/torch.yaml"
    resources:
        gpu=GPU,
    params:
        experts=group_members,
        method=method_params,
        device=RECIPE.eval.device,
    script:
        "../../scripts/merged.py"


rule grid_point:
    input:
        base=model_file("base"),
        merged=f"{R}/merged/{{group}}/{{method}}.h5",
        heads=head_files,
    output:
        f"{R}/grid/{{group}}/{{method}}/{{point}}.json",
    log:
        f"logs/{SUITE}/grid/{{group}}/{{method}}/{{point}}.log",
    benchmark:
        f"benchmarks/{SUITE}/grid/{{group}}/{{method}}/{{point}}.tsv"
    group:
        "grid"
    conda:
        "../../envs/torch.yaml"
    resources:
        gpu=GPU,
    params:
        experts=group_members,
        method=method_params,
        suite=group_suite_params,
        eval=eval_params(),
        save_merged=RECIPE.save_merged,
    script:
        "../../scripts/grid_point.py"
