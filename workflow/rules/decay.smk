# Proposition 1 (paper Sec. 3): the common and unique parts (HO-GSVD split, Eq. 6) of the mean of
# the first N task vectors of the largest group, from its HO-GSVD cache (figure decay).
from submerge.recipe import DEFAULT_DECAY_THRESHOLD

DECAY_GROUP = RECIPE.largest_group()


rule decay_summary:
    input:
        hogsvd=f"{R}/hogsvd/{DECAY_GROUP}.h5",
        taskvectors=[f"{R}/taskvectors/{e}.h5" for e in RECIPE.members(DECAY_GROUP)],
    output:
        summary=f"{R}/summaries/decay_summary.json",
        provenance=f"{R}/summaries/decay_summary.json.json",
    log:
        f"logs/{SUITE}/decay_summary.log",
    benchmark:
        f"benchmarks/{SUITE}/decay_summary.tsv"
    conda:
        "../../envs/torch.yaml"
    params:
        group=DECAY_GROUP,
        threshold=DEFAULT_DECAY_THRESHOLD,
        code=code("decay_summary"),
    script:
        "../../scripts/decay_summary.py"
