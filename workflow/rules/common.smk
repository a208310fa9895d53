# The config, parsed once into the typed recipe (src/submerge/recipe.py), and the path helpers
# and input functions of the rule files. Job params are the recipe objects' to_params(), i.e.
# exactly what determines a job's result.
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

sys.path.insert(
    0, str(Path(workflow.basedir) / "src")
)  # the library, without installing it

from submerge import merges
from submerge.errors import ConfigError
from submerge.recipe import NO_BETA, VALUE_PATTERN, parse_config

validate(config, schema="../schemas/config.schema.yaml", set_default=False)
try:
    RECIPE = parse_config(config)
except ConfigError as err:
    raise WorkflowError(str(err)) from None

SUITE = RECIPE.suite.name
R = f"results/{SUITE}"
EXPERTS = RECIPE.experts
GROUPS = RECIPE.groups
METHODS = RECIPE.methods
PAIRS = RECIPE.pairs()  # every (group, method) that is merged and evaluated
GPU = 1 if RECIPE.gpu else 0


wildcard_constraints:
    expert="|".join(EXPERTS),
    group="|".join(GROUPS),
    method="|".join(METHODS),
    point=f"a{VALUE_PATTERN}_b(?:{VALUE_PATTERN}|{NO_BETA})",


def members(group):
    return RECIPE.members(group)


def model_file(name):
    return f"{R}/models/{name}.safetensors"


def grid_files(group, method):
    return [f"{R}/grid/{group}/{method}/{p.name}.json" for p in METHODS[method].grid()]


def selection():
    return RECIPE.selection


# ---------------------------------------------------------------- input functions (wildcards)


def taskvector_files(wildcards):
    return [f"{R}/taskvectors/{e}.h5" for e in members(wildcards.group)]


def head_files(wildcards):
    return [f"{R}/heads/{e}.safetensors" for e in members(wildcards.group)]


def reference_files(wildcards):
    return [f"{R}/reference/{e}.json" for e in members(wildcards.group)]


def method_grid_files(wildcards):
    return grid_files(wildcards.group, wildcards.method)


def merged_inputs(wildcards):
    """The group's task vectors and the extra inputs the method's merge function needs."""
    extra = {
        merges.TALL_LAMBDAS: f"{R}/merged/{wildcards.group}/tall_lambdas.json",
        merges.HOGSVD_CACHE: f"{R}/hogsvd/{wildcards.group}.h5",
    }
    inputs = {"taskvectors": taskvector_files(wildcards)}
    inputs.update({name: extra[name] for name in METHODS[wildcards.method].needs})
    return inputs


def merged_files(wildcards):
    return [f"{R}/merged/{g}/{m}.h5" for g, m in PAIRS]


def test_files(wildcards):
    return [f"{R}/test/{g}/{m}.json" for g, m in PAIRS]


def merge_benchmarks(wildcards):
    return [f"benchmarks/{SUITE}/merged/{g}/{m}.tsv" for g, m in PAIRS]


# --------------------------------------------------------------------- params (wildcards)


def suite_params(*experts):
    """The suite's config restricted to ``experts``: adding an expert must not make the other
    experts' jobs stale."""
    return RECIPE.suite_view(experts)


def expert_suite_params(wildcards):
    return suite_params(wildcards.expert)


def group_suite_params(wildcards):
    return suite_params(*members(wildcards.group))


def group_members(wildcards):
    return members(wildcards.group)


def method_params(wildcards):
    return METHODS[wildcards.method].to_params()


def eval_params():
    return RECIPE.eval.to_params()


# ------------------------------------------------------- evaluate.smk (scores, selection)


def score_inputs(wildcards):
    return {
        "grid": [f for g, m in PAIRS for f in grid_files(g, m)],
        "test": test_files(wildcards),
        "references": [f"{R}/reference/{e}.json" for e in EXPERTS],
    }


def selection_universe():
    return members(selection().universe)


def selection_inputs(wildcards):
    universe = selection_universe()
    return {
        "hogsvd": f"{R}/hogsvd/{selection().universe}.h5",
        "taskvectors": [f"{R}/taskvectors/{e}.h5" for e in universe],
        "references": [f"{R}/reference/{e}.json" for e in universe],
        "base": model_file("base"),
        "heads": [f"{R}/heads/{e}.safetensors" for e in universe],
    }


def selection_suite_params(wildcards):
    return suite_params(*selection_universe())


def selection_universe_params(wildcards):
    return selection_universe()


def selection_experiment_params(wildcards):
    return selection().to_params()


def selection_method_params(wildcards):
    return METHODS[selection().method].to_params()


def selection_grid_params(wildcards):
    method = METHODS[selection().method]
    return {"alphas": list(method.alphas), "betas": list(method.betas)}


def all_targets():
    targets = [f"{R}/scores.csv"]
    targets += [f"{R}/spectra/{e}.h5" for e in EXPERTS]
    targets += [f"{R}/hogsvd/{g}.h5" for g in GROUPS]
    if selection():
        targets.append(f"{R}/selection/selection.csv")
    targets += report_targets()
    return targets
