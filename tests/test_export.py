"""Exported merged models (``submerge.export``, ``stages.export``, config field ``export``) and the
``submerge merge`` / ``submerge diagnose`` command line (``submerge.cli``, ``submerge.standalone``).

Models are tiny and offline: digits towers built by the pipeline's own checkpoint stage (one
block, width 32) and seeded transformers CLIP vision / T5 models saved with ``save_pretrained``.
Each exported model is loaded with its upstream library (open_clip / transformers) and its
outputs compared with the pipeline's own model of the same point."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

from submerge import cli
from submerge.errors import ConfigError
from submerge.recipe import EvalSettings, GridPoint, Method, Suite, parse_export, parse_method

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = {"arch": {"width": 32, "layers": 1, "heads": 2, "output_dim": 16},
        "n_train": 300, "n_val": 60, "n_test": 60, "base_epochs": 1, "expert_epochs": 1,
        "head_steps": 30}
EXPERTS = ["rot90", "parity", "invert"]


# ------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """The pipeline's stages in one process on a tiny digits suite: checkpoints, task vectors,
    the merged cache of TA + SB on two experts, references, the sweep (2 α × 2 β) and the
    export of the chosen point."""
    from submerge.stages.checkpoints import build_base, build_expert
    from submerge.stages.evaluate import run_reference, run_sweep
    from submerge.stages.export import export_model
    from submerge.stages.merge import merge_group
    from submerge.stages.taskvectors import make_task_vector

    torch.set_num_threads(1)
    workdir = tmp_path_factory.mktemp("digits")
    root = workdir / "results" / "tiny"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)  # the suite's heads are read from results/<suite>/heads/
        return _run_stages(root)


def _run_stages(root: Path) -> dict:
    from submerge.stages.checkpoints import build_base, build_expert
    from submerge.stages.evaluate import run_reference, run_sweep
    from submerge.stages.export import export_model
    from submerge.stages.merge import merge_group
    from submerge.stages.taskvectors import make_task_vector

    suite = Suite.from_params({"suite": "tiny", "adapter": "open_clip_vit", "base": {"build": "digits"},
                               "digits": TINY,
                               "experts": {e: {"build": "digits", "task": e} for e in EXPERTS}})
    base = root / "models" / "base.safetensors"
    build_base(suite, base)
    models, heads, tvs = {}, {}, {}
    for e in EXPERTS:
        models[e] = root / "models" / "experts" / f"{e}.safetensors"
        heads[e] = root / "heads" / f"{e}.safetensors"
        build_expert(suite, e, base, models[e], heads[e])
        tvs[e] = root / "taskvectors" / f"{e}.h5"
        make_task_vector(suite, e, base, models[e], tvs[e])
    group = EXPERTS[:2]
    method = parse_method("ta_sb", {"merge": "task_arithmetic", "boost": {}},
                          {"alpha": [0.5, 1.0], "beta": [0.0, 0.2]}, ["g2"])
    merged = root / "merged" / "g2" / "ta_sb.h5"
    merge_group(group, [tvs[e] for e in group], method, merged, device="cpu")
    settings = EvalSettings(device="cpu", max_val_examples=40, max_test_examples=40)
    refs = [root / "reference" / f"{e}.json" for e in group]
    for e, ref in zip(group, refs):
        run_reference(suite, e, base, models[e], ref, settings)
    grid, test = root / "grid" / "g2" / "ta_sb", root / "test" / "g2" / "ta_sb.json"
    run_sweep(suite, group, method, "g2", method.grid(), base, merged, [heads[e] for e in group],
              refs, grid, test, settings, root / "cache" / "points")
    out = root / "export" / "g2" / "ta_sb"
    export_model(suite, group, method, "g2", base, merged, test, grid, [heads[e] for e in group],
                 [models[e] for e in group], out, device="cpu")
    return {"root": root, "suite": suite, "method": method, "base": base, "models": models,
            "heads": heads, "merged": merged, "test": test, "grid": grid, "out": out,
            "settings": settings, "group": group, "refs": refs}


def _images(n=5, size=8, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------- config: export


def _methods():
    grid = {"alpha": [1.0], "beta": [0.0]}
    groups = ["small", "big"]
    return {"ta": parse_method("ta", {"merge": "task_arithmetic"}, grid, groups),
            "ta_sb": parse_method("ta_sb", {"merge": "task_arithmetic", "boost": {}}, grid, groups),
            "ties_sb": parse_method("ties_sb", {"merge": "ties", "boost": {}, "groups": ["small"]},
                                    grid, groups)}


def test_export_field_defaults_to_the_largest_groups_boosted_methods():
    groups = {"small": ("a", "b"), "big": ("a", "b", "c")}
    methods = _methods()
    assert parse_export(None, groups, methods) == (("big", "ta_sb"),)
    assert parse_export("default", groups, methods) == (("big", "ta_sb"),)
    assert parse_export("none", groups, methods) == () == parse_export([], groups, methods)
    assert parse_export("all", groups, methods) == (
        ("small", "ta"), ("small", "ta_sb"), ("small", "ties_sb"), ("big", "ta"), ("big", "ta_sb"))
    # a bare method name: the largest group it is merged on
    assert parse_export(["ties_sb", "small/ta", "ta"], groups, methods) == (
        ("small", "ties_sb"), ("small", "ta"), ("big", "ta"))


@pytest.mark.parametrize("value, message", [
    ("some", r"config field export: 'some' is not one of"),
    (["nope"], r"config field export\[0\]: unknown method 'nope'"),
    (["huge/ta"], r"config field export\[0\]: unknown group 'huge'"),
    (["big/ties_sb"], r"config field export\[0\]: method 'ties_sb' is not merged on group 'big'"),
    ([3], r"config field export\[0\]: 3 is not"),
])
def test_export_field_errors_name_the_field(value, message):
    groups = {"small": ("a", "b"), "big": ("a", "b", "c")}
    with pytest.raises(ConfigError, match=message):
        parse_export(value, groups, _methods())


def test_export_field_is_in_the_schema_and_not_in_the_suite_view():
    from submerge.recipe import check_schema, parse_config

    root = Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((root / "tests" / "configs" / "tiny.yaml").read_text())
    schema = root / "workflow" / "schemas" / "config.schema.yaml"
    for value in ("all", "none", ["ta_sb", "g2/ta"]):
        check_schema({**cfg, "export": value}, schema)
    with pytest.raises(ConfigError, match="config field export"):
        check_schema({**cfg, "export": "everything"}, schema)
    recipe = parse_config({**cfg, "export": ["g2/ta"]})
    assert recipe.export == (("g2", "ta"),) and "export" not in recipe.suite.view
    assert parse_config(cfg).export == (("g2", "ta_sb"),)


# ------------------------------------------------------------- pipeline export stage


def test_exported_open_clip_model_equals_the_pipelines_model_of_the_chosen_point(digits_run):
    import open_clip
    from safetensors.torch import load_file

    from submerge.stages.evaluate import Sweep

    r = digits_run
    out, test = r["out"], json.loads(r["test"].read_text())
    point = GridPoint(test["alpha"], test["beta"])
    files = sorted(p.name for p in out.iterdir())
    assert files == ["README.md", "README.md.json", "head_parity.json", "head_parity.safetensors",
                     "head_rot90.json", "head_rot90.safetensors", "open_clip_config.json",
                     "open_clip_visual.safetensors"]
    # open_clip builds the tower from the exported config and loads the weights strictly
    open_clip.add_model_config(out / "open_clip_config.json")
    model = open_clip.create_model("open_clip_config").eval()
    model.visual.load_state_dict(load_file(out / "open_clip_visual.safetensors"))  # strict
    sweep = Sweep(r["suite"], r["group"], r["method"], "g2", r["base"], r["merged"],
                  [r["heads"][e] for e in r["group"]], r["settings"], r["root"] / "cache2")
    _, pipeline_model, _ = sweep.model(point)
    images = _images()
    with torch.no_grad():
        assert torch.equal(model.visual(images), pipeline_model(images))
    # the heads beside it are the experts' heads, byte for byte
    for e in r["group"]:
        assert (out / f"head_{e}.safetensors").read_bytes() == r["heads"][e].read_bytes()


def test_model_card_names_method_point_experts_and_accuracies(digits_run):
    r = digits_run
    card = (r["out"] / "README.md").read_text()
    test = json.loads(r["test"].read_text())
    point = GridPoint(test["alpha"], test["beta"])
    val = json.loads((r["grid"] / f"{point.name}.json").read_text())
    assert "TA + SB" in card and "`task_arithmetic`" in card
    assert f"| α | {test['alpha']:g} |" in card and f"| β | {test['beta']:g} |" in card
    for e in r["group"]:
        sha = json.loads(r["models"][e].with_suffix(".json").read_text())["sha256"]
        assert f"| {e} | `{sha}` | {100 * val['accuracy'][e]:.2f} | {100 * test['accuracy'][e]:.2f} |" in card


def test_export_has_a_provenance_sidecar_that_audits_clean(digits_run):
    from submerge.report.provenance import audit

    sidecar = json.loads((digits_run["out"] / "README.md.json").read_text())
    names = {o["name"] for o in sidecar["outputs"]}
    assert {"README.md", "open_clip_visual.safetensors", "head_rot90.safetensors"} <= names
    inputs = {Path(i["path"]).name for i in sidecar["inputs"]}
    assert {"base.safetensors", "ta_sb.h5", "ta_sb.json"} <= inputs
    assert audit(digits_run["out"] / "README.md").ok


def test_export_is_atomic(digits_run, tmp_path, monkeypatch):
    """A writer that fails half-way leaves the previous export as it was and no temporary."""
    from submerge.models.open_clip_vit import OpenClipViTAdapter
    from submerge.stages.export import export_model

    r = digits_run
    out = tmp_path / "export"
    args = (r["suite"], r["group"], r["method"], "g2", r["base"], r["merged"], r["test"], r["grid"],
            [r["heads"][e] for e in r["group"]], [r["models"][e] for e in r["group"]], out)
    export_model(*args, device="cpu")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "README.md.json"}

    def broken(self, module, out_dir, arch):
        (Path(out_dir) / "open_clip_visual.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(OpenClipViTAdapter, "save_model", broken)
    with pytest.raises(OSError, match="disk full"):
        export_model(*args, device="cpu")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "README.md.json"} == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


# ------------------------------------------------------------------- submerge merge


def _library_merge(base_path, expert_paths, method: Method, alpha, beta):
    """The library's merge of the same inputs, in memory (the pipeline's merge functions)."""
    from submerge.io.checkpoints import load_normalized
    from submerge.merging.task_vectors import apply_task_vector, task_vectors
    from submerge.models import get_adapter
    from submerge.stages.merge import boost_factors, merged_task_vector, reconstruct

    base, _ = load_normalized(base_path)
    experts = {Path(p).stem: load_normalized(p)[0] for p in expert_paths}
    tvs = list(task_vectors(base, experts).values())
    layer_info = get_adapter("open_clip_vit").layer_infos(base)
    delta, _ = merged_task_vector(method, tvs, layer_info)
    factors = boost_factors(method, delta, layer_info)
    dense = {k: v for k, v in delta.items() if k not in factors}
    return apply_task_vector(base, reconstruct(dense, factors, layer_info, method, beta), alpha), delta


def _merge_flags(r, out, *extra):
    m = r["models"]
    return ["merge", "--base", str(r["base"]), "--expert", str(m["rot90"]), "--expert",
            str(m["parity"]), "--expert", str(m["invert"]), "--device", "cpu", "-o", str(out), *extra]


TIES_SB = ["--method", "ties", "--hyper", "top_k_percent=30", "--beta", "0.2", "--alpha", "0.4"]


def test_cli_merge_equals_the_library_merge_bitwise(digits_run, tmp_path, capsys):
    from safetensors.torch import load_file

    from submerge.boosting import subspace_boost
    from submerge.io.checkpoints import load_normalized
    from submerge.merging.task_vectors import apply_task_vector
    from submerge.models import get_adapter

    r = digits_run
    out = tmp_path / "merged"
    assert cli.main(_merge_flags(r, out, *TIES_SB)) == 0
    got = load_file(out / "open_clip_visual.safetensors")
    method = parse_method("m", {"merge": "ties", "top_k_percent": 30, "boost": {}},
                          {"alpha": [0.4], "beta": [0.2]}, [])
    want, delta = _library_merge(r["base"], [r["models"][e] for e in EXPERTS], method, 0.4, 0.2)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    # and Algorithm 1 applied directly (subspace_boost, README's library example), up to rounding
    layer_info = get_adapter("open_clip_vit").layer_infos(delta)
    base, _ = load_normalized(r["base"])
    direct = apply_task_vector(base, subspace_boost(delta, layer_info, beta=0.2), 0.4)
    assert all(torch.allclose(got[k], direct[k], atol=1e-5, rtol=1e-4) for k in direct)
    # the boost changed something (β = 0.2 cuts past the first singular value here)
    plain = apply_task_vector(base, delta, 0.4)
    assert any(not torch.allclose(got[k], plain[k]) for k in got)
    card = (out / "README.md").read_text()
    for e in EXPERTS:
        sha = json.loads(r["models"][e].with_suffix(".json").read_text())["sha256"]
        assert f"| {e} | `{sha}` |" in card


def test_cli_yaml_recipe_and_flags_give_the_same_model(digits_run, tmp_path):
    r = digits_run
    flags_out, yaml_out = tmp_path / "flags", tmp_path / "yaml"
    assert cli.main(_merge_flags(r, flags_out, *TIES_SB)) == 0
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "base": str(r["base"]), "experts": [str(r["models"][e]) for e in EXPERTS],
        "method": {"merge": "ties", "top_k_percent": 30, "boost": {"layers": "both"}},
        "alpha": 0.4, "beta": 0.2, "device": "cpu"}))
    assert cli.main(["merge", str(recipe), "-o", str(yaml_out)]) == 0
    name = "open_clip_visual.safetensors"
    assert (flags_out / name).read_bytes() == (yaml_out / name).read_bytes()


@pytest.fixture()
def bad_expert(tmp_path):
    """An open_clip tower of another width: a mismatched architecture."""
    from safetensors.torch import save_file

    from submerge.models import get_adapter

    torch.manual_seed(0)
    tower = get_adapter("open_clip_vit").build({"image_size": 8, "patch_size": 4, "width": 16, "layers": 1,
                                                 "heads": 2, "mlp_ratio": 4.0, "output_dim": 16})
    path = tmp_path / "narrow.safetensors"
    save_file({k: v.contiguous() for k, v in tower.state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize("case", ["missing", "mismatched", "beta", "method", "hyper", "yaml_method",
                                  "sha256"])
def test_cli_bad_input_is_one_line_naming_the_file_or_flag(case, digits_run, tmp_path, bad_expert,
                                                           capsys):
    r = digits_run
    out = tmp_path / "out"
    args = _merge_flags(r, out, *TIES_SB)
    if case == "missing":
        args[args.index("--base") + 1] = str(tmp_path / "nope.safetensors")
        expect = str(tmp_path / "nope.safetensors")
    elif case == "mismatched":
        args[args.index("--expert") + 1] = str(bad_expert)
        expect = str(bad_expert)
    elif case == "beta":
        args[args.index("--beta") + 1] = "1.0"
        expect = "--beta"
    elif case == "method":
        args[args.index("--method") + 1] = "tiess"
        expect = "--method"
    elif case == "hyper":
        args[args.index("--hyper") + 1] = "top_k=30"
        expect = "--hyper top_k"
    elif case == "sha256":
        args[args.index("--base") + 1] = f"{r['base']}#sha256={'0' * 64}"
        expect = str(r["base"])
    else:
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(yaml.safe_dump({"base": str(r["base"]), "experts": [str(r["models"]["rot90"])],
                                          "method": "slerp", "alpha": 1.0}))
        args = ["merge", str(recipe), "-o", str(out)]
        expect = f"{recipe}: config field method.merge"
    capsys.readouterr()
    assert cli.main(args) == cli.EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("submerge merge: error: "), err
    assert expect in err[0], err
    assert not out.exists()


def test_cli_help_describes_each_command_with_an_example(capsys):
    for argv in (["--help"], ["merge", "--help"], ["diagnose", "--help"]):
        with pytest.raises(SystemExit) as done:
            cli.main(argv)
        assert done.value.code == 0
        text = capsys.readouterr().out
        assert "example" in text and ("submerge merge" in text or "submerge diagnose" in text)


# ---------------------------------------------------------------- HF CLIP and T5 (tiny)


def _hf_models(kind: str, root: Path):
    """A seeded tiny transformers model saved with save_pretrained (base) and two perturbed
    copies (experts); returns (base dir, expert dirs, model class)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    if kind == "clip":
        cls = CLIPVisionModelWithProjection
        model = cls(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=16, patch_size=8,
                                     projection_dim=8)).eval()
    else:
        cls = T5ForConditionalGeneration
        model = cls(T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=2,
                             num_decoder_layers=2, num_heads=2, decoder_start_token_id=0)).eval()
    base = root / "base"
    model.save_pretrained(str(base))
    gen = torch.Generator().manual_seed(1)
    dirs = []
    for i in range(3):
        expert = copy.deepcopy(model)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        dirs.append(root / f"expert{i}")
        expert.save_pretrained(str(dirs[-1]))
    return base, dirs, cls


def _hf_inputs(kind):
    if kind == "clip":
        return {"pixel_values": torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))}
    ids = torch.randint(2, 32, (2, 5), generator=torch.Generator().manual_seed(2))
    return {"input_ids": ids, "decoder_input_ids": ids[:, :3]}


def _hf_output(model, kind, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.image_embeds if kind == "clip" else out.logits


@pytest.mark.parametrize("kind", ["clip", "t5"])
def test_cli_merge_and_diagnose_on_tiny_hf_checkpoints(kind, tmp_path):
    import pandas as pd
    from safetensors.torch import load_file

    from submerge import spectral
    from submerge.merging.task_vectors import task_vectors
    from submerge.models import get_adapter
    from submerge.stages.common import merged_module
    from submerge.stages.merge import boost_factors, merged_task_vector, point_delta, reconstruct

    base_dir, expert_dirs, cls = _hf_models(kind, tmp_path)
    out = tmp_path / "merged"
    flags = ["--base", str(base_dir), *sum((["--expert", str(d)] for d in expert_dirs), []),
             "--device", "cpu"]
    assert cli.main(["merge", *flags, "--method", "task_arithmetic", "--lines", "--beta", "0.1",
                     "--alpha", "0.7", "-o", str(out)]) == 0
    merged = cls.from_pretrained(str(out)).eval()  # the upstream library loads it
    # the library's merge of the same inputs (the pipeline's functions, in memory)
    adapter = get_adapter("hf_clip_vision" if kind == "clip" else "hf_t5")
    load = lambda d: adapter.tower_state_dict(load_file(str(d / "model.safetensors")))  # noqa: E731
    base = load(base_dir)
    tvs = list(task_vectors(base, {f"e{i}": adapter.complete_from_base(load(d), base)
                                   for i, d in enumerate(expert_dirs)}).values())
    layer_info = adapter.layer_infos(base)
    method = parse_method("m", {"merge": "task_arithmetic", "lines": {}, "boost": {}},
                          {"alpha": [0.7], "beta": [0.1]}, [])
    delta, attrs = merged_task_vector(method, tvs, layer_info)
    factors = boost_factors(method, delta, layer_info)
    delta = reconstruct({k: v for k, v in delta.items() if k not in factors}, factors, layer_info,
                        method, 0.1)
    # LiNeS' reference protocol (the default): α = 0.7 is LiNeS' β, the coefficient 1.0
    delta, coefficient = point_delta(delta, layer_info, method, 0.7, attrs.get("lines_scale"))
    arch = json.loads((base_dir / "config.json").read_text())
    suite = Suite(name="x", adapter=adapter.name, view={"arch": arch})
    _, want, _ = merged_module(suite, base, delta, coefficient, torch.device("cpu"))
    inputs = _hf_inputs(kind)
    assert torch.equal(_hf_output(merged, kind, inputs), _hf_output(want, kind, inputs))
    assert "task_arithmetic" in (out / "README.md").read_text()

    diag = tmp_path / "diagnose"
    assert cli.main(["diagnose", *flags, "--beta", "0.1", "-o", str(diag)]) == 0
    frame = pd.read_csv(diag / "rank_collapse.csv")
    assert (diag / "rank_collapse.png").stat().st_size > 0 and (diag / "rank_collapse.md").is_file()
    assert sorted(frame["n_experts"].unique()) == [1, 2, 3]
    # one expert's "merge" (TA of one task vector) is that task vector: its stable rank, directly
    key = next(k for k in frame["key"] if layer_info[k].kind == "mlp")
    row = frame[(frame.n_experts == 1) & (frame.key == key) & (frame.boosting == "before")]
    assert row["stable_rank"].item() == pytest.approx(spectral.stable_rank(tvs[0][key]), rel=1e-5)
    # boosting lifts small singular values and leaves the top one: stable rank never drops
    pivot = frame.pivot_table(index=["n_experts", "key"], columns="boosting", values="stable_rank")
    assert (pivot["after"] >= pivot["before"] - 1e-6).all() and (pivot["after"] > pivot["before"]).any()


def test_cli_diagnose_hogsvd_alignment(digits_run, tmp_path):
    import pandas as pd

    r = digits_run
    out = tmp_path / "diag"
    m = r["models"]
    assert cli.main(["diagnose", "--base", str(r["base"]), *sum((["--expert", str(m[e])] for e in EXPERTS), []),
                     "--beta", "0.2", "--hogsvd", "--device", "cpu", "-o", str(out)]) == 0
    align = pd.read_csv(out / "alignment.csv", index_col=0)
    assert list(align.index) == EXPERTS == list(align.columns)
    assert (out / "alignment.png").stat().st_size > 0
    assert json.loads((out / "alignment.csv.json").read_text())["outputs"][0]["name"] == "alignment.csv"


# ---------------------------------------------------------------- merge recipe parsing


def test_source_texts_become_the_pipelines_source_mappings(tmp_path):
    from submerge.recipe import parse_source_text

    f = tmp_path / "m.safetensors"
    f.write_bytes(b"x")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "pytorch_model.bin").write_bytes(b"x")
    pin = "ab" * 32
    assert parse_source_text(str(f), "base") == {"path": str(f)}
    assert parse_source_text(str(tmp_path / "dir"), "base") == {"path": str(tmp_path / "dir" / "pytorch_model.bin")}
    assert parse_source_text("org/name", "base") == {"hub": {"repo": "org/name", "file": "model.safetensors"}}
    assert parse_source_text(f"org/n.1:open_clip_model.safetensors@v2#sha256={pin.upper()}", "base") == {
        "hub": {"repo": "org/n.1", "file": "open_clip_model.safetensors", "revision": "v2"}, "sha256": pin}
    assert parse_source_text("https://h.org/a/b.pt", "x") == {"url": "https://h.org/a/b.pt"}
    with pytest.raises(ConfigError, match=r"config field experts\[1\]: 'sha256=12' is not"):
        parse_source_text("org/name#sha256=12", "experts[1]")
    with pytest.raises(ConfigError, match="has no model.safetensors"):
        parse_source_text(str(tmp_path), "base")


def test_merge_recipe_fields_are_checked_once_for_yaml_and_flags():
    from submerge.recipe import parse_merge_recipe

    base = {"base": "org/base", "experts": ["org/a", "other/a"]}
    r = parse_merge_recipe({**base, "method": {"merge": "ties", "boost": {"beta_attn": 0.1, "beta_mlp": 0.2}},
                            "alpha": 0.5})
    assert list(r.experts) == ["a", "a-2"] and r.method.hyper == {"top_k_percent": 20, "aggregate": "dis-mean"}
    assert r.method.boost.betas(r.beta) == {"attn": 0.1, "mlp": 0.2} and r.method.label == "TIES + SB"
    cases = [({"method": "task_arithmetic"}, "config field alpha: required"),
             ({"method": "task_arithmetic", "alpha": 1, "beta": 0.1}, "config field beta: given without"),
             ({"method": {"merge": "ta", "boost": {}}, "alpha": 1}, "config field method.merge: unknown"),
             ({"method": {"merge": "task_arithmetic", "boost": {}}, "alpha": 1}, "config field beta: required"),
             ({"method": {"merge": "task_arithmetic", "boost": {"layer": "mlp"}}, "alpha": 1, "beta": 0},
              "config field method.boost.layer: unknown"),
             ({"method": {"merge": "task_arithmetic", "alpha": 1}}, "config field method.alpha"),
             ({"method": "task_arithmetic", "alpha": 1, "models": []}, "config field models: unknown"),
             ({"method": "task_arithmetic", "alpha": 1, "device": "gpu"}, "config field device")]
    for extra, message in cases:
        with pytest.raises(ConfigError, match=message):
            parse_merge_recipe({**base, **extra})
