# Stage 2: one task vector per expert, Δ = θ_expert − θ_base, as HDF5 (one dataset per parameter).


rule task_vector:
    input:
        base=model_file("base"),
        expert=f"{R}/models/experts/{{expert}}.safetensors",
    output:
        f"{R}/taskvectors/{{expert}}.h5",
    log:
        f"logs/{SUITE}/task_vector/{{expert}}.log",
    benchmark:
        f"benchmarks/{SUITE}/task_vector/{{expert}}.tsv"
    conda:
        "../../envs/torch.yaml"
    params:
        suite=expert_suite_params,
    script:
        "../../scripts/task_vector.py"
