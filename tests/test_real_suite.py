"""The workflow end to end on a REAL-suite config path (adapter hf_clip_vision, downloaded-style
checkpoints pinned by sha256, zero-shot heads from a full CLIPModel, datasets saved to disk),
entirely offline: a tiny seeded transformers CLIPModel stands in for openai/clip-vit-base-patch32
and perturbed copies of its vision tower, saved as FusionBench saves its experts (CLIPVisionModel
keys ``vision_model.*``, no ``visual_projection``), stand in for the experts."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from workflow_utils import snakemake, write_config
from test_heads import _tiny_word_tokenizer  # the one tiny offline tokenizer of the tests

pytestmark = pytest.mark.slow

SUITE = "fbtiny"
EXPERTS = {"e0": ["red", "green"], "e1": ["dark", "bright", "blue"]}
TEMPLATES = ["a photo of a {c} .", "a {c} image ."]
WORDS = "a photo of image . red green blue dark bright".split()
OFFLINE = {"SUBMERGE_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _arch(vocab_size: int) -> dict:
    """A full CLIPConfig dict (text tower included: the zero-shot CLIP is built from it)."""
    return {
        "text_config": {"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64,
                        "num_hidden_layers": 2, "num_attention_heads": 2,
                        "max_position_embeddings": 16, "pad_token_id": 0, "bos_token_id": 2,
                        "eos_token_id": 3},
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                          "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        "projection_dim": 16,
    }


def _text_head(clip, tokenizer, classes) -> torch.Tensor:
    """CLIP's zero-shot head computed directly: per class, the normalised mean over templates of
    the normalised projected EOS state of the text tower."""
    rows = []
    with torch.no_grad():
        for c in classes:
            embs = []
            for t in TEMPLATES:
                ids = tokenizer(t.replace("{c}", c), return_tensors="pt")["input_ids"]
                assert ids[0, -1] == 3
                emb = clip.text_projection(clip.text_model(input_ids=ids).last_hidden_state[0, -1])
                embs.append(emb / emb.norm())
            mean = torch.stack(embs).mean(0)
            rows.append(mean / mean.norm())
    return torch.stack(rows)


def _dataset(path: Path, clip, vision_sd, head, arch, seed: int) -> None:
    """train/test DatasetDict of random 32x32 RGB images labelled with the expert's own
    prediction (its vision tower, the base's projection, the zero-shot head), so that the
    pipeline must find the expert 100% accurate. Near-ties are left out."""
    import datasets
    import numpy as np
    import PIL.Image

    from submerge.data.vision import image_transform

    model = copy.deepcopy(clip)
    model.load_state_dict(vision_sd, strict=False)
    transform = image_transform({"adapter": "hf_clip_vision", "arch": arch})
    rng = np.random.default_rng(seed)
    images = [PIL.Image.fromarray(np.clip(rng.uniform(0, 255, 3) + rng.normal(0, 60, (32, 32, 3)),
                                          0, 255).astype(np.uint8)) for _ in range(120)]
    with torch.no_grad():
        pixels = torch.stack([transform(im) for im in images])
        feats = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        logits = (feats / feats.norm(dim=-1, keepdim=True)) @ head.T
    top2 = logits.topk(2, dim=-1).values
    keep = [i for i in range(len(images)) if top2[i, 0] - top2[i, 1] > 1e-3][:60]
    assert len(keep) == 60
    labels = logits.argmax(-1).tolist()
    classes = [f"c{i}" for i in range(head.shape[0])]
    features = datasets.Features({"img": datasets.Image(), "target": datasets.ClassLabel(names=classes)})

    def split(idx):
        return datasets.Dataset.from_dict({"img": [images[i] for i in idx],
                                           "target": [labels[i] for i in idx]}, features=features)

    datasets.DatasetDict({"train": split(keep[:40]), "test": split(keep[40:])}).save_to_disk(str(path))


def _make_inputs(root: Path) -> tuple[dict, object, object]:
    """Checkpoints, tokenizer and datasets under ``root``; returns (config, clip, tokenizer)."""
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel

    tokenizer = _tiny_word_tokenizer(WORDS)
    tok_dir = root / "tokenizer"
    tokenizer.save_pretrained(str(tok_dir))
    arch = _arch(len(tokenizer))
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(**copy.deepcopy(arch))).eval()
    full = {k: v.detach().clone().contiguous() for k, v in clip.state_dict().items()}
    assert any(k.startswith("text_model.") for k in full)
    base_file = root / "clip" / "model.safetensors"
    base_file.parent.mkdir()
    save_file(full, str(base_file))

    gen = torch.Generator().manual_seed(1)
    experts = {}
    for i, (name, classes) in enumerate(EXPERTS.items()):
        vision = {k: v + 0.02 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
                  for k, v in full.items() if k.startswith("vision_model.")}
        path = root / "experts" / name / "model.safetensors"
        path.parent.mkdir(parents=True)
        save_file(vision, str(path))
        data = root / "data" / name
        _dataset(data, clip, vision, _text_head(clip, tokenizer, classes), arch, seed=i)
        experts[name] = {
            "source": {"path": str(path), "sha256": _sha256(path)},
            "head": {"zeroshot": True},
            "dataset": {"path": str(data), "classes": classes, "templates": TEMPLATES,
                        "image_key": "img", "label_key": "target"},
        }
    base_source = {"path": str(base_file), "sha256": _sha256(base_file)}
    cfg = {
        "suite": SUITE,
        "adapter": "hf_clip_vision",
        "arch": arch,
        "base": {"source": dict(base_source)},
        "tokenizer": {"path": str(tok_dir)},
        "zeroshot_model": {"source": dict(base_source)},
        "experts": experts,
        "groups": {"all": list(EXPERTS)},
        "methods": {"ta": {"merge": "task_arithmetic"},
                    "ta_sb": {"merge": "task_arithmetic", "boost": {}}},
        "grid": {"alpha": [0.5, 1.0], "beta": [0.0]},
        "eval": {"batch_size": 16},
        "device": "cpu",
    }
    return cfg, clip, tokenizer


@pytest.fixture(scope="module")
def offline_env():
    with pytest.MonkeyPatch.context() as mp:
        for k, v in OFFLINE.items():
            mp.setenv(k, v)
        yield


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, offline_env):
    inputs = tmp_path_factory.mktemp("inputs")
    cfg, clip, tokenizer = _make_inputs(inputs)
    workdir = tmp_path_factory.mktemp("run")
    snakemake(workdir, write_config(workdir, cfg), timeout=600)
    return workdir, cfg, clip, tokenizer


def test_scores_have_every_grid_and_test_row(real_run):
    workdir, cfg, _, _ = real_run
    root = workdir / "results" / SUITE
    scores = pd.read_csv(root / "scores.csv")
    n = len(EXPERTS)
    val, test = scores[scores.split == "val"], scores[scores.split == "test"]
    # ta: 2 alphas; ta_sb: 2 alphas x 1 beta; one row per task
    assert sorted(val.groupby("method").size().items()) == [("ta", 2 * n), ("ta_sb", 2 * n)]
    assert sorted(test.groupby("method").size().items()) == [("ta", n), ("ta_sb", n)]
    assert set(scores.task) == set(EXPERTS) and set(scores.group) == {"all"}
    assert scores.accuracy.between(0, 1).all() and scores.expert_accuracy.between(0, 1).all()
    # the labels are each expert's own predictions: the whole chain (normalised tower, projection
    # completed from the base, zero-shot head, preprocessing) must reproduce them
    for name in EXPERTS:
        ref = json.loads((root / "reference" / f"{name}.json").read_text())
        assert ref["val"]["expert"] == 1.0 and ref["test"]["expert"] == 1.0, ref
    assert (root / "tables" / "main_results.csv").is_file()
    assert (root / "figures" / "rank_collapse.png").is_file()


def test_heads_are_zero_shot_from_the_clip_text_tower(real_run):
    from safetensors.torch import load_file

    workdir, _, clip, tokenizer = real_run
    for name, classes in EXPERTS.items():
        path = workdir / "results" / SUITE / "heads" / f"{name}.safetensors"
        meta = json.loads(path.with_suffix(".json").read_text())
        assert meta["normalize"] is True and meta["classes"] == classes and meta["expert"] == name
        weight = load_file(str(path))["weight"]
        torch.testing.assert_close(weight, _text_head(clip, tokenizer, classes), atol=1e-5, rtol=0)


def test_visual_projection_comes_from_the_base(real_run):
    from submerge.io import hdf5
    from submerge.io.checkpoints import load_normalized

    workdir, _, clip, _ = real_run
    root = workdir / "results" / SUITE
    proj = clip.visual_projection.weight.detach()
    base, base_meta = load_normalized(root / "models" / "base.safetensors")
    assert not any(k.startswith("text_") or k == "logit_scale" for k in base)
    torch.testing.assert_close(base["visual_projection.weight"], proj, atol=0, rtol=0)
    for name in EXPERTS:
        sd, _ = load_normalized(root / "models" / "experts" / f"{name}.safetensors")
        assert set(sd) == set(base)
        torch.testing.assert_close(sd["visual_projection.weight"], proj, atol=0, rtol=0)
        tv, layer_info, _ = hdf5.read_state_dict(root / "taskvectors" / f"{name}.h5")
        assert layer_info["visual_projection.weight"].kind == "head"
        assert torch.count_nonzero(tv["visual_projection.weight"]) == 0
        # the rest of the tower did move
        key = "vision_model.encoder.layers.0.mlp.fc1.weight"
        assert torch.count_nonzero(tv[key]) > 0


def test_sha256_mismatch_fails_the_expert_job(tmp_path, real_run):
    workdir, cfg, _, _ = real_run
    cfg = copy.deepcopy(cfg)
    good = cfg["experts"]["e1"]["source"]["sha256"]
    bad = "0" * 64
    cfg["experts"]["e1"]["source"]["sha256"] = bad
    target = f"results/{SUITE}/models/experts/e1.safetensors"
    proc = snakemake(tmp_path, write_config(tmp_path, cfg), target, check=False, timeout=300)
    assert proc.returncode != 0
    # the job ran (and failed in build_expert), not a dry run: its log file was opened
    assert (tmp_path / "logs" / SUITE / "expert_model" / "e1.log").is_file()
    text = proc.stderr
    assert "CheckpointError: sha256 mismatch" in text, text[-3000:]
    assert cfg["experts"]["e1"]["source"]["path"] in text
    assert f"expected {bad}, got {good}" in text
    assert not (tmp_path / target).exists()
    assert (tmp_path / "results" / SUITE / "models" / "base.safetensors").is_file()


def test_zero_shot_head_needs_the_text_tower(real_run):
    """A vision-only checkpoint as zeroshot_model is refused, not loaded with a random text tower."""
    from submerge.errors import CheckpointError
    from submerge.recipe import parse_config
    from submerge.stages.checkpoints import zero_shot_head_for_suite

    _, cfg, _, _ = real_run
    cfg = copy.deepcopy(cfg)
    vision_only = cfg["experts"]["e0"]["source"]["path"]
    cfg["zeroshot_model"] = {"source": {"path": vision_only}}
    suite = parse_config(cfg).suite
    with pytest.raises(CheckpointError, match="text_model") as info:
        zero_shot_head_for_suite(suite, "e0")
    assert vision_only in str(info.value)


def test_exported_model_loads_with_transformers_and_equals_the_pipelines_model(real_run):
    """The default export (the largest group's boosted method, ta_sb on `all`) is a
    save_pretrained directory that transformers loads, with the pipeline's outputs at the chosen
    point, the zero-shot heads beside it and a model card naming the experts' sha256."""
    from transformers import CLIPVisionModelWithProjection

    from submerge.recipe import EvalSettings, GridPoint, Method, Suite, parse_config
    from submerge.stages.evaluate import Sweep

    workdir, cfg, _, _ = real_run
    root = workdir / "results" / SUITE
    out = root / "export" / "all" / "ta_sb"
    assert {"config.json", "model.safetensors", "README.md", "README.md.json",
            "head_e0.safetensors", "head_e1.safetensors"} <= {p.name for p in out.iterdir()}
    model = CLIPVisionModelWithProjection.from_pretrained(str(out)).eval()
    test = json.loads((root / "test" / "all" / "ta_sb.json").read_text())
    recipe = parse_config(cfg)
    experts = list(EXPERTS)
    sweep = Sweep(Suite.from_params(recipe.suite_view(experts)), experts,
                  Method.from_params(recipe.methods["ta_sb"].to_params()), "all",
                  root / "models" / "base.safetensors", root / "merged" / "all" / "ta_sb.h5",
                  [root / "heads" / f"{e}.safetensors" for e in experts], EvalSettings(device="cpu"),
                  workdir / "cache-copy")
    _, want, _ = sweep.model(GridPoint(test["alpha"], test["beta"]))
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(pixel_values=pixels).image_embeds, want(pixel_values=pixels).image_embeds)
    card = (out / "README.md").read_text()
    for e in experts:
        assert cfg["experts"][e]["source"]["sha256"] in card
