# Stage 1-2: obtain the base and each expert (download with sha256 pin, or build for `digits`),
# normalised to a safetensors state dict of the merged tower + JSON sidecar. One job per model;
# an expert's job also extracts its task vector (Δ = θ_expert − θ_base, HDF5, one dataset per
# parameter) and that task vector's per-layer SVD: the three always run together, so they share
# one process start-up.


rule base_model:
    input:
        downloads=base_downloads,
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
        code=code("base_model"),
    script:
        "../../scripts/base_model.py"


rule expert_model:
    input:
        base=model_file("base"),
        downloads=expert_downloads,
    output:
        model=f"{R}/models/experts/{{expert}}.safetensors",
        head=f"{R}/heads/{{expert}}.safetensors",
        taskvector=f"{R}/taskvectors/{{expert}}.h5",
        provenance=f"{R}/taskvectors/{{expert}}.h5.json",
        spectrum=f"{R}/spectra/{{expert}}.h5",
    log:
        f"logs/{SUITE}/expert_model/{{expert}}.log",
    benchmark:
        f"benchmarks/{SUITE}/expert_model/{{expert}}.tsv"
    conda:
        "../../envs/torch.yaml"
    params:
        suite=expert_suite_params,
        code=code("expert_model"),
    script:
        "../../scripts/expert_model.py"
