# Stage 0: downloads, on the submit host. Compute nodes of many clusters have no internet, so
# every checkpoint (base, experts, shipped heads, zeroshot_model), hub dataset and hub
# tokenizer is fetched here by `localrules` (they run in the Snakemake process itself, on the
# login node) into the caches the compute jobs read ($SUBMERGE_CACHE, the Hugging Face
# caches: put them on a shared file system). Run `snakemake prefetch` on the login node
# first; the jobs that need a download also wait for its record. Each job writes a JSON
# record (results/{suite}/downloads/). The digits suite downloads nothing: no jobs here.
# Every table is computed when the workflow is parsed (submerge.stages.fetch): plain data.
from submerge.stages import fetch as FETCH

# model (base, expert, zeroshot_model) -> {label: {"source": ...}}; expert -> its hub
# dataset block; the hub tokenizer block (None: none)
FETCH_SOURCES = FETCH.checkpoint_sources(RECIPE.suite.view)
FETCH_DATASETS = FETCH.hub_datasets(RECIPE.suite.view)
FETCH_TOKENIZER = FETCH.hub_tokenizer(RECIPE.suite.view)
FETCH_NONE = "(?!)"  # a wildcard constraint that no name matches (nothing to fetch)


localrules:
    prefetch,
    fetch_checkpoints,
    fetch_dataset,
    fetch_tokenizer,


rule prefetch:
    input:
        FETCH.all_records(RECIPE.suite.view, R),


rule fetch_checkpoints:
    output:
        FETCH.checkpoint_record(R, "{name}"),
    log:
        f"logs/{SUITE}/fetch/{{name}}.log",
    wildcard_constraints:
        name="|".join(FETCH_SOURCES) or FETCH_NONE,
    conda:
        "../../envs/torch.yaml"
    params:
        sources=FETCH.by_wildcard(FETCH_SOURCES, "name"),
        code=code("fetch"),
    script:
        "../../scripts/fetch.py"


rule fetch_dataset:
    output:
        FETCH.dataset_record(R, "{expert}"),
    log:
        f"logs/{SUITE}/fetch/datasets/{{expert}}.log",
    wildcard_constraints:
        expert="|".join(FETCH_DATASETS) or FETCH_NONE,
    conda:
        "../../envs/torch.yaml"
    params:
        dataset=FETCH.by_wildcard(FETCH_DATASETS, "expert"),
        code=code("fetch"),
    script:
        "../../scripts/fetch.py"


rule fetch_tokenizer:
    output:
        FETCH.tokenizer_record(R),
    log:
        f"logs/{SUITE}/fetch/tokenizer.log",
    conda:
        "../../envs/torch.yaml"
    params:
        tokenizer=FETCH_TOKENIZER,
        code=code("fetch"),
    script:
        "../../scripts/fetch.py"
