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


# Stage 4a (text): each text task with a template file (dataset.prompt) fetched raw and rendered
# with its task's promptsource templates as r-three/mats does (example i gets template i % T, the
# validation rows held out of train by dataset.val_last), the whole split as JSON lines with a
# sidecar. The evaluating jobs read it and tokenise at scoring time (the hf_t5 adapter).


rule eval_text:
    input:
        downloads=expert_data_downloads,
    output:
        data=f"{R}/evaldata/{{expert}}/{{split}}.jsonl",
    log:
        f"logs/{SUITE}/eval_text/{{expert}}/{{split}}.log",
    benchmark:
        f"benchmarks/{SUITE}/eval_text/{{expert}}/{{split}}.tsv"
    wildcard_constraints:
        split="val|test",
    conda:
        "../../envs/torch.yaml"
    params:
        suite=expert_suite_params,
        code=code("eval_text"),
    script:
        "../../scripts/eval_text.py"
