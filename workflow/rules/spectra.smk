# Stage 3a: spectra caches that do not depend on a merge method: the per-layer SVD of each
# expert's task vector, and the per-layer HO-GSVD of each group.


rule expert_spectrum:
    input:
        f"{R}/taskvectors/{{expert}}.h5",
    output:
        f"{R}/spectra/{{expert}}.h5",
    log:
        f"logs/{SUITE}/expert_spectrum/{{expert}}.log",
    benchmark:
        f"benchmarks/{SUITE}/expert_spectrum/{{expert}}.tsv"
    conda:
        "../../envs/torch.yaml"
    script:
        "../../scripts/expert_spectrum.py"


rule hogsvd:
    input:
        taskvectors=taskvector_files,
    output:
        f"{R}/hogsvd/{{group}}.h5",
    log:
        f"logs/{SUITE}/hogsvd/{{group}}.log",
    benchmark:
        f"benchmarks/{SUITE}/hogsvd/{{group}}.tsv"
    conda:
        "../../envs/torch.yaml"
    resources:
        gpu=GPU,
    params:
        experts=group_members,
        pi=RECIPE.hogsvd.pi,
        layers=RECIPE.hogsvd.layers,
        device=RECIPE.eval.device,
    script:
        "../../scripts/hogsvd.py"
