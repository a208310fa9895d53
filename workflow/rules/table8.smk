# Paper Table 8: a β_attn × β_mlp grid of one boosted method on one group (experiments.table8),
# from the method's merged cache (its SVD factors: no new SVD), each pair's α and the pair
# chosen on validation, every pair scored on test at its α. Only when configured.
T8 = RECIPE.table8
T8_FILE = f"{R}/experiments/table8.csv"

if T8:

    rule table8:
        input:
            base=model_file("base"),
            merged=f"{R}/merged/{T8.group}/{T8.method}.h5",
            heads=[f"{R}/heads/{e}.safetensors" for e in members(T8.group)],
            references=[f"{R}/reference/{e}.json" for e in members(T8.group)],
            downloads=ancient(
                FETCH.eval_records(RECIPE.suite.view, R, members(T8.group))
            ),
            evaldata=eval_data_files(members(T8.group)),
        output:
            table8=T8_FILE,
            provenance=f"{T8_FILE}.json",
        log:
            f"logs/{SUITE}/table8.log",
        benchmark:
            f"benchmarks/{SUITE}/table8.tsv"
        conda:
            "../../envs/torch.yaml"
        resources:
            gpu=GPU,
        params:
            experts=members(T8.group),
            method=METHODS[T8.method].to_params(),
            experiment=T8.to_params(),
            suite=suite_params(*members(T8.group)),
            eval=eval_params(choice=True),
            cache=POINT_CACHE,
            code=code("table8"),
        script:
            "../../scripts/table8.py"
