# Config validation, path helpers and input functions shared by all rule files.
import itertools

from snakemake.utils import validate

validate(config, schema="../schemas/config.schema.yaml")


def _check_config(cfg):
    """Semantic checks the JSON schema cannot express; each error names the field at fault."""
    experts = cfg["experts"]
    for name, spec in experts.items():
        if ("build" in spec) == ("source" in spec):
            raise ValueError(
                f"config field experts.{name}: give exactly one of 'build' or 'source'"
            )
        if spec.get("build") == "digits" and "task" not in spec:
            raise ValueError(
                f"config field experts.{name}: a digits expert needs 'task'"
            )
    for group, members in cfg["groups"].items():
        for i, member in enumerate(members):
            if member not in experts:
                raise ValueError(
                    f"config field groups.{group}[{i}]: unknown expert {member!r} "
                    f"(known: {', '.join(sorted(experts))})"
                )
    for name, method in cfg["methods"].items():
        for i, group in enumerate(method.get("groups", [])):
            if group not in cfg["groups"]:
                raise ValueError(
                    f"config field methods.{name}.groups[{i}]: unknown group {group!r}"
                )
    sel = cfg.get("experiments", {}).get("selection")
    if sel:
        where = "config field experiments.selection"
        if sel["universe"] not in cfg["groups"]:
            raise ValueError(f"{where}.universe: unknown group {sel['universe']!r}")
        if sel["method"] not in cfg["methods"]:
            raise ValueError(f"{where}.method: unknown method {sel['method']!r}")
        universe = cfg["groups"][sel["universe"]]
        for field in ("pool", "ext"):
            for e in sel.get(field, []):
                if e not in universe:
                    raise ValueError(
                        f"{where}.{field}: {e!r} is not in group {sel['universe']!r}"
                    )
        n_cand = len(universe) - len(sel["pool"]) - len(sel.get("ext", []))
        if sel["k"] > n_cand:
            raise ValueError(f"{where}.k: {sel['k']} > number of candidates ({n_cand})")


_check_config(config)

SUITE = config["suite"]
R = f"results/{SUITE}"
EXPERTS = list(config["experts"])
GROUPS = config["groups"]
METHODS = config["methods"]
GPU = 1 if config.get("gpu", True) else 0


wildcard_constraints:
    expert="|".join(EXPERTS),
    group="|".join(GROUPS),
    method="|".join(METHODS),
    alpha=r"[0-9]+(\.[0-9]+)?",
    beta=r"none|[0-9]+(\.[0-9]+)?",


def fmt(x):
    """Grid values in paths: 0.1 -> '0.1', 1.0 -> '1', never '1e-01'."""
    return f"{float(x):.6f}".rstrip("0").rstrip(".")


def is_boosted(method):
    return "boost" in METHODS[method]


def method_alphas(method):
    return [fmt(a) for a in METHODS[method].get("alpha", config["grid"]["alpha"])]


def method_betas(method):
    if not is_boosted(method):
        return ["none"]
    return [fmt(b) for b in METHODS[method].get("beta", config["grid"]["beta"])]


def grid_files(group, method):
    return [
        f"{R}/grid/{group}/{method}/a{a}_b{b}.json"
        for a, b in itertools.product(method_alphas(method), method_betas(method))
    ]


def method_params(method):
    """A method's hyperparameters as job params, without its grid lists, groups and label:
    adding a grid point or a group must not make the method's existing jobs stale."""
    return {
        k: v
        for k, v in METHODS[method].items()
        if k not in ("alpha", "beta", "groups", "label")
    }


def needs_lambdas(method):
    return METHODS[method]["rule"] == "consensus"


def method_groups(method):
    """The groups a method runs on: its `groups` list, else every group."""
    return METHODS[method].get("groups", list(GROUPS))


# every (group, method) pair that is merged and evaluated
PAIRS = [(g, m) for g in GROUPS for m in METHODS if g in method_groups(m)]


def members(group):
    return list(GROUPS[group])


def model_file(name):
    return f"{R}/models/{name}.safetensors"


def taskvector_files(wildcards):
    return [f"{R}/taskvectors/{e}.h5" for e in members(wildcards.group)]


def head_files(wildcards):
    return [f"{R}/heads/{e}.safetensors" for e in members(wildcards.group)]


def reference_files(wildcards):
    return [f"{R}/reference/{e}.json" for e in members(wildcards.group)]


def selection():
    return config.get("experiments", {}).get("selection")


def all_targets():
    targets = [f"{R}/scores.csv"]
    targets += [f"{R}/spectra/{e}.h5" for e in EXPERTS]
    targets += [f"{R}/hogsvd/{g}.h5" for g in GROUPS]
    if selection():
        targets.append(f"{R}/selection/selection.csv")
    targets += report_targets()
    return targets


SUITE_KEYS = (
    "suite",
    "adapter",
    "arch",
    "digits",
    "tokenizer",
    "base",
    "zeroshot_model",
    "seed",
)


def suite_view(experts=()):
    """The part of the config a job depends on: the suite-wide keys plus the named experts.
    Passing the whole config as params would make every job stale when any expert is added.
    """
    view = {k: config[k] for k in SUITE_KEYS if k in config}
    view["experts"] = {e: config["experts"][e] for e in experts}
    return view


def eval_params():
    return {"device": config.get("device", "auto"), **config.get("eval", {})}


def merged_inputs(wildcards):
    inputs = {"taskvectors": taskvector_files(wildcards)}
    if needs_lambdas(wildcards.method):
        inputs["lambdas"] = f"{R}/merged/{wildcards.group}/tall_lambdas.json"
    return inputs


def score_inputs(wildcards):
    return {
        "grid": [f for g, m in PAIRS for f in grid_files(g, m)],
        "test": test_files(wildcards),
        "references": [f"{R}/reference/{e}.json" for e in EXPERTS],
    }


def selection_universe():
    return members(selection()["universe"])


def largest_group():
    return max(GROUPS, key=lambda g: len(GROUPS[g]))


def report_targets():
    return [f"{R}/tables/{t}.csv" for t in TABLE_NAMES] + [
        f"{R}/figures/{f}.png" for f in FIGURE_NAMES
    ]


def report_config():
    """The config keys that shape the report (recorded in every sidecar)."""
    keys = (
        "suite",
        "adapter",
        "groups",
        "methods",
        "grid",
        "eval",
        "experiments",
        "hogsvd",
    )
    return {k: config[k] for k in keys if k in config}


def merged_files(wildcards):
    return [f"{R}/merged/{g}/{m}.h5" for g, m in PAIRS]


def test_files(wildcards):
    return [f"{R}/test/{g}/{m}.json" for g, m in PAIRS]


def merge_benchmarks(wildcards):
    return [f"benchmarks/{SUITE}/merged/{g}/{m}.tsv" for g, m in PAIRS]


TABLE_NAMES = [
    "main_results",
    "sota_comparison",
    "beta_ablation",
    "layer_ablation",
    "per_task_accuracy",
    "expert_selection",
    "merging_time",
]


FIGURE_NAMES = [
    "rank_collapse",
    "spectra",
    "accuracy_vs_experts",
    "alpha_beta_heatmap",
    "alignment_matrix",
    "subspace_importance",
]
