# Stage 3a: spectra caches that do not depend on a merge method: the per-layer HO-GSVD of each
# group (each expert's own per-layer SVD is made with its task vector, checkpoints.smk).


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
        code=code("hogsvd"),
    script:
        "../../scripts/hogsvd.py"
