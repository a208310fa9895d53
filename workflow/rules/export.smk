# Stage 7: the merged model of each exported (group, method) (config field `export`) at the
# (α, β) chosen on validation, in the source's own format with its heads and a model card:
# results/{suite}/export/{group}/{method}/ (submerge.stages.export).


rule export:
    input:
        unpack(export_inputs),
    output:
        directory(f"{R}/export/{{group}}/{{method}}"),
    log:
        f"logs/{SUITE}/export/{{group}}/{{method}}.log",
    benchmark:
        f"benchmarks/{SUITE}/export/{{group}}/{{method}}.tsv"
    conda:
        "../../envs/torch.yaml"
    params:
        experts=group_members,
        method=method_params,
        suite=group_suite_params,
        code=code("export"),
    script:
        "../../scripts/export.py"
