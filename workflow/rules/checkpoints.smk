# Stage 1: obtain the base and each expert (download with sha256 pin, or build for `digits`),
# normalised to a safetensors state dict of the merged tower + JSON sidecar. One job per model.


rule base_model:
    output:
        model=f"{R}/models/base.safetensors",
    log:
        f"logs/{SUITE}/base_model.log",
    benchmark:
        f"benchmarks/{SUITE}/base_model.tsv"
    conda:
        "../../envs/torch.yaml"
    params:
        suite=suite_params(),
    script:
        "../../scripts/base_model.py"


rule expert_model:
    input:
        base=model_file("base"),
    output:
        model=f"{R}/models/experts/{{expert}}.safetensors",
        head=f"{R}/heads/{{expert}}.safetensors",
    log:
        f"logs/{SUITE}/expert_model/{{expert}}.log",
    benchmark:
        f"benchmarks/{SUITE}/expert_model/{{expert}}.tsv"
    conda:
        "../../envs/torch.yaml"
    params:
        suite=expert_suite_params,
    script:
        "../../scripts/expert_model.py"
