# Stage 3b: per (group, method) the merged task vector Δ_merge (without α) and, for boosted
# methods, the per-layer SVD of each boosted matrix (computed once, so that every grid point
# only rescales and reconstructs); the TALL-mask λ per task that Consensus needs.


rule consensus_lambdas:
    input:
        base=model_file("base"),
        taskvectors=taskvector_files,
        heads=head_files,
        downloads=group_data_downloads,
        evaldata=group_val_eval_data,
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
        code=code("consensus_lambdas"),
    script:
        "../../scripts/consensus_lambdas.py"


rule merged:
    input:
        unpack(merged_inputs),
    output:
        merged=f"{R}/merged/{{group}}/{{method}}.h5",
        provenance=f"{R}/merged/{{group}}/{{method}}.h5.json",
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
        code=code("merged", merges=True),
    script:
        "../../scripts/merged.py"
