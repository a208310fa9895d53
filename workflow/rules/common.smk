# The config, parsed once into the typed recipe (src/submerge/recipe.py), and the path helpers
# and input functions of the rule files. Job params are the recipe objects' to_params(), i.e.
# exactly what determines a job's result.
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

# the library, also without installing it
sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from submerge import merges
from submerge.errors import ConfigError
from submerge.fingerprint import script_fingerprint
from submerge.io.atomic import clean_stale_temporaries
from submerge.recipe import check_schema, parse_config
from submerge.stages import fetch as FETCH
from submerge.stages.evaldata import eval_data_file

try:  # one line naming the config field at fault, before any job
    check_schema(
        config, Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml"
    )
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
# content-addressed results of every evaluated grid point
POINT_CACHE = f"{R}/cache/points"


wildcard_constraints:
    expert="|".join(EXPERTS),
    group="|".join(GROUPS),
    method="|".join(METHODS),
    part=r"[0-9]+",
    run=r"(hogsvd|random)-[0-9]+",


def members(group):
    return RECIPE.members(group)


def model_file(name):
    return f"{R}/models/{name}.safetensors"


def grid_files(group, method):
    """The per-point validation files of a (group, method), inside its sweep's directory."""
    return [f"{R}/grid/{group}/{method}/{p.name}.json" for p in METHODS[method].grid()]


def grid_parts(method):
    """The method's grid in parts of eval.points_per_job points (one part: no split)."""
    points, size = METHODS[method].grid(), RECIPE.eval.points_per_job
    if size is None:
        return [points]
    return [points[i : i + size] for i in range(0, len(points), size)]


def code(script, merges=False):
    """The fingerprint of the code a rule's script runs (docstrings and comments left out;
    ``merges``: it runs merge functions): a job param, so that a real code change reruns the
    jobs that run it (profiles/default: rerun-triggers)."""
    path = Path(workflow.basedir) / "scripts" / f"{script}.py"
    return script_fingerprint(path, merges=merges)


def selection():
    return RECIPE.selection


# ---------------------------------------------------------------- input functions (wildcards)


def taskvector_files(wildcards):
    return [f"{R}/taskvectors/{e}.h5" for e in members(wildcards.group)]


def head_files(wildcards):
    return [f"{R}/heads/{e}.safetensors" for e in members(wildcards.group)]


def reference_files(wildcards):
    return [f"{R}/reference/{e}.json" for e in members(wildcards.group)]


def method_points(wildcards):
    return [p.name for p in METHODS[wildcards.method].grid()]


def part_points(wildcards):
    return [p.name for p in grid_parts(wildcards.method)[int(wildcards.part)]]


def sweep_inputs(wildcards):
    g, m = wildcards.group, wildcards.method
    inputs = {
        "base": model_file("base"),
        "merged": f"{R}/merged/{g}/{m}.h5",
        "heads": head_files(wildcards),
        "references": reference_files(wildcards),
    }
    if RECIPE.eval.points_per_job is not None:  # the parts fill the cache first
        inputs["parts"] = [
            f"{R}/grid/{g}/{m}.parts/{i}.json" for i in range(len(grid_parts(m)))
        ]
    return inputs


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


def result_config():
    """The config less the settings that change no result (recipe.runtime_settings, gpu, warm_worker)."""
    out = {k: v for k, v in config.items() if k not in ("device", "gpu", "warm_worker")}
    out["groups"] = {g: list(m) for g, m in RECIPE.groups.items()}  # a group is a set
    if "eval" in out:
        out["eval"] = {k: v for k, v in out["eval"].items() if k != "batch_size"}
    return out


def eval_params(choice=False):
    return RECIPE.eval.to_params(choice=choice)


# ------------------------------------------------------- evaluate.smk (scores, selection)


def score_inputs(wildcards):
    return {
        "grid": [f"{R}/grid/{g}/{m}" for g, m in PAIRS],
        "test": test_files(wildcards),
        "references": [f"{R}/reference/{e}.json" for e in EXPERTS],
    }


def all_point_files(wildcards):
    return [f for g, m in PAIRS for f in grid_files(g, m)]


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


def selection_run_files(wildcards):
    return [f"{R}/selection/runs/{run}.csv" for run in selection().runs()]


def selection_grid_params(wildcards):
    method = METHODS[selection().method]
    return {"alphas": list(method.alphas), "betas": list(method.betas)}


# ------------------------------------------ evaluation data (evaldata.smk, decoded once)


def eval_data_files(experts, splits=("val", "test")):
    """rule eval_data's files of the image-dataset experts among ``experts``, and rule
    eval_text's of the text experts with a template file."""
    files = [
        eval_data_file(R, e, RECIPE.suite.experts[e], s)
        for e in experts
        for s in splits
    ]
    return [f for f in files if f is not None]


def eval_data_max_examples(wildcards):
    return RECIPE.eval.max_examples(wildcards.split)


def expert_eval_data(wildcards):
    return eval_data_files([wildcards.expert])


def group_val_eval_data(wildcards):
    return eval_data_files(members(wildcards.group), ("val",))


def group_eval_data(wildcards):
    return eval_data_files(members(wildcards.group))


def selection_eval_data(wildcards):
    return eval_data_files(selection_universe())


# ---------------------------------------------------- downloads (fetch.smk, on the submit host)
# ancient(): a fetch job that runs again (e.g. after a change to the download code) makes no
# model stale; a changed source still reruns its model (the suite view is in its params)


def base_downloads(wildcards):
    return ancient(FETCH.build_records(RECIPE.suite.view, R, "base"))


def expert_downloads(wildcards):
    return ancient(FETCH.build_records(RECIPE.suite.view, R, wildcards.expert))


def expert_data_downloads(wildcards):
    return ancient(FETCH.eval_records(RECIPE.suite.view, R, [wildcards.expert]))


def group_data_downloads(wildcards):
    return ancient(FETCH.eval_records(RECIPE.suite.view, R, members(wildcards.group)))


def selection_data_downloads(wildcards):
    return ancient(FETCH.eval_records(RECIPE.suite.view, R, selection_universe()))


def lock_suite():
    """Hold results/{suite}/.run.lock for the whole run: a second run on the same suite in this
    directory is refused, runs on other suites go on. (Snakemake's own locks cannot do this:
    9.27 removes the whole .snakemake/locks/ when any run ends.)"""
    from filelock import FileLock, Timeout

    global SUITE_LOCK
    Path(R).mkdir(parents=True, exist_ok=True)
    SUITE_LOCK = FileLock(f"{R}/.run.lock")
    try:
        SUITE_LOCK.acquire(timeout=0)
    except Timeout:
        raise WorkflowError(
            f"another run on suite {SUITE!r} is running in this directory (it holds "
            f"{R}/.run.lock): wait for it to end, or stop it"
        ) from None


WARM_WORKER = None


def start_warm_worker():
    """Local runs: one process that has imported torch, the adapter's library and the stage
    modules runs every job in a fork of itself (src/submerge/worker.py), so that a job pays
    no start-up of its own. Cluster jobs, and `warm_worker: false`, start as usual."""
    global WARM_WORKER
    if not RECIPE.warm_worker or not workflow.local_exec or workflow.remote_exec:
        return
    from submerge import worker

    preload = [*worker.COMMON_PRELOAD, worker.ADAPTER + RECIPE.suite.adapter]
    WARM_WORKER = worker.start(preload, log=f"logs/{SUITE}/warm_worker.log")


def stop_warm_worker():
    if WARM_WORKER is not None:
        WARM_WORKER.stop()


def all_targets():
    targets = [f"{R}/scores.csv"]
    targets += [f"{R}/spectra/{e}.h5" for e in EXPERTS]
    targets += [f"{R}/hogsvd/{g}.h5" for g in GROUPS]
    if selection():
        targets.append(f"{R}/selection/selection.csv")
    targets += report_targets()
    return targets


# ------------------------------------------------------------- export.smk (merged models)


def export_inputs(wildcards):
    g, m = wildcards.group, wildcards.method
    return {
        "base": model_file("base"),
        "merged": f"{R}/merged/{g}/{m}.h5",
        "test": f"{R}/test/{g}/{m}.json",
        "grid": f"{R}/grid/{g}/{m}",
        "heads": head_files(wildcards),
        "experts": [f"{R}/models/experts/{e}.safetensors" for e in members(g)],
    }


def export_targets():
    return [f"{R}/export/{g}/{m}" for g, m in RECIPE.export]
