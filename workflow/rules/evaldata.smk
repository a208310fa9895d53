# Stage 4a: each image task's evaluation split (val, test), decoded and put through the geometric
# part of the model's preprocessing (resize, center crop) once, with the eval.max_{split}_examples
# subset applied: uint8 images + int64 labels (safetensors, JSON sidecar). Every job that
# evaluates on that split (sweep, sweep_part, reference, consensus_lambdas, selection_run) reads
# it instead of decoding the dataset again; accuracies are the same bit for bit. Only experts with
# an image `dataset` block (digits build their data in memory; text tasks are not prepared).


rule eval_data:
    input:
        downloads=expert_data_downloads,
    output:
        data=f"{R}/evaldata/{{expert}}/{{split}}.safetensors",
    log:
        f"logs/{SUITE}/eval_data/{{expert}}/{{split}}.log",
    benchmark:
        f"benchmarks/{SUITE}/eval_data/{{expert}}/{{split}}.tsv"
    wildcard_constraints:
        split="val|test",
    conda:
        "../../envs/torch.yaml"
    params:
        suite=expert_suite_params,
        max_examples=eval_data_max_examples,
        code=code("eval_data"),
    script:
        "../../scripts/eval_data.py"
