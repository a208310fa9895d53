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
        experts=lambda wc: members(wc.group),
        suite=lambda wc: suite_view(experts=members(wc.group)),
        lambdas=config.get("consensus_lambdas", [0.2, 0.3, 0.4, 0.5, 0.6]),
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
        experts=lambda wc: members(wc.group),
        method=lambda wc: method_params(wc.method),
        suite=suite_view(),
        device=config.get("device", "auto"),
    script:
        "../../scripts/merged.py"


rule grid_point:
    input:
        base=model_file("base"),
        merged=f"{R}/merged/{{group}}/{{method}}.h5",
        heads=head_files,
    output:
        f"{R}/grid/{{group}}/{{method}}/a{{alpha}}_b{{beta}}.json",
    log:
        f"logs/{SUITE}/grid/{{group}}/{{method}}/a{{alpha}}_b{{beta}}.log",
    benchmark:
        f"benchmarks/{SUITE}/grid/{{group}}/{{method}}/a{{alpha}}_b{{beta}}.tsv"
    group:
        "grid"
    conda:
        "../../envs/torch.yaml"
    resources:
        gpu=GPU,
    params:
        experts=lambda wc: members(wc.group),
        method=lambda wc: method_params(wc.method),
        suite=lambda wc: suite_view(experts=members(wc.group)),
        eval=eval_params(),
        save_merged=config.get("save_merged", False),
    script:
        "../../scripts/grid_point.py"
