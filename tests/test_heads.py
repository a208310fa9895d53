"""Zero-shot heads (open_clip and transformers CLIP), shipped heads, and head files."""

from __future__ import annotations

import json
import math

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from submerge.data.heads import head_from_module, render_template, save_head, zero_shot_head
from submerge.errors import CheckpointError

CLASSES = ["cat", "dog", "bird"]
TEMPLATES = ["a photo of a {c}.", "a bad photo of the {c}.", "{c}"]
CONTEXT = 16


@pytest.fixture(scope="module")
def oc_clip():
    torch.manual_seed(0)
    return open_clip.CLIP(
        embed_dim=8,
        vision_cfg=dict(image_size=16, patch_size=8, width=16, layers=1, head_width=8),
        text_cfg=dict(context_length=CONTEXT, vocab_size=49408, width=16, heads=2, layers=1),
    )


def oc_tokenize(texts):
    return open_clip.tokenize(texts, context_length=CONTEXT)


def reference_head(embed_one, classnames, templates):
    """Straightforward float64 reading of CLIP's zero-shot classifier, one text at a time."""
    rows = []
    for name in classnames:
        embs = [embed_one(t.replace("{c}", name)).double() for t in templates]
        embs = [e / e.norm() for e in embs]
        mean = torch.stack(embs).mean(0)
        rows.append(mean / mean.norm())
    return torch.stack(rows)


def test_render_template():
    assert render_template('a "{c}" sign.', "stop") == 'a "stop" sign.'
    with pytest.raises(ValueError, match="placeholder"):
        render_template("no class here", "x")


def test_zero_shot_head_open_clip(oc_clip):
    oc_clip.train()
    weight, meta = zero_shot_head(oc_clip, oc_tokenize, CLASSES, TEMPLATES)
    assert oc_clip.training  # mode restored
    assert weight.shape == (3, 8) and weight.dtype == torch.float32
    torch.testing.assert_close(weight.norm(dim=1), torch.ones(3), atol=1e-6, rtol=0)
    oc_clip.eval()
    with torch.no_grad():
        ref = reference_head(lambda text: oc_clip.encode_text(oc_tokenize([text]))[0], CLASSES, TEMPLATES)
    torch.testing.assert_close(weight.double(), ref, atol=1e-5, rtol=0)
    assert meta["normalize"] is True and meta["classes"] == CLASSES
    assert math.isclose(meta["logit_scale"], 1 / 0.07, rel_tol=1e-5)  # open_clip init: log(1/0.07)


def _tiny_word_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


def test_zero_shot_head_transformers_clip():
    from transformers import CLIPConfig, CLIPModel

    tokenizer = _tiny_word_tokenizer("a photo of the bad . cat dog bird".split())
    torch.manual_seed(1)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8),
        projection_dim=6,
    )
    model = CLIPModel(cfg).eval()
    weight, meta = zero_shot_head(model, tokenizer, CLASSES, TEMPLATES)
    assert weight.shape == (3, 6)
    torch.testing.assert_close(weight.norm(dim=1), torch.ones(3), atol=1e-6, rtol=0)

    def embed_one(text):  # independent: run the text tower, take the EOS state, project
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        assert ids[0, -1] == 3
        with torch.no_grad():
            hidden = model.text_model(input_ids=ids).last_hidden_state[0, -1]
            return model.text_projection(hidden)

    torch.testing.assert_close(weight.double(), reference_head(embed_one, CLASSES, TEMPLATES), atol=1e-5, rtol=0)
    assert math.isclose(meta["logit_scale"], math.exp(cfg.logit_scale_init_value), rel_tol=1e-5)


def test_zero_shot_head_rejects_bad_input(oc_clip):
    with pytest.raises(ValueError, match="placeholder"):
        zero_shot_head(oc_clip, oc_tokenize, CLASSES, ["a photo"])
    with pytest.raises(ValueError, match="class names"):
        zero_shot_head(oc_clip, oc_tokenize, [], TEMPLATES)
    with pytest.raises(TypeError, match="encode_text"):
        zero_shot_head(torch.nn.Linear(2, 2), oc_tokenize, CLASSES, TEMPLATES)


class ClassificationHead(torch.nn.Linear):
    """The shape of tall_masks' src/models/modeling.py ClassificationHead."""

    def __init__(self, normalize, weights, biases=None):
        super().__init__(weights.shape[1], weights.shape[0])
        self.normalize = normalize
        self.weight = torch.nn.Parameter(weights.clone())
        self.bias = torch.nn.Parameter(biases.clone() if biases is not None else torch.zeros(weights.shape[0]))

    def forward(self, inputs):
        if self.normalize:
            inputs = inputs / inputs.norm(dim=-1, keepdim=True)
        return super().forward(inputs)


@pytest.mark.parametrize("normalize", [True, False])
def test_head_from_module_reproduces_the_module(normalize):
    g = torch.Generator().manual_seed(0)
    module = ClassificationHead(normalize, torch.randn(5, 7, generator=g), torch.randn(5, generator=g))
    weight, bias, meta = head_from_module(module)
    x = torch.randn(4, 7, generator=g)
    feats = x / x.norm(dim=-1, keepdim=True) if meta["normalize"] else x
    logits = meta["logit_scale"] * feats @ weight.T + bias  # the contract's formula
    with torch.no_grad():
        torch.testing.assert_close(logits, module(x))
    assert meta["normalize"] is normalize and meta["classes"] is None


def test_head_from_state_dict():
    sd = {"weight": torch.ones(3, 4), "bias": torch.zeros(3)}
    weight, bias, meta = head_from_module(sd, classes=["a", "b", "c"])
    assert meta == {"normalize": True, "logit_scale": 1.0, "classes": ["a", "b", "c"]}  # tall_masks heads normalise
    assert torch.equal(weight, sd["weight"]) and torch.equal(bias, sd["bias"])
    assert head_from_module({"weight": torch.ones(3, 4)}, normalize=False)[2]["normalize"] is False
    assert head_from_module({"weight": torch.ones(3, 4)})[1] is None


@pytest.mark.parametrize("bad, field", [
    ({"bias": torch.zeros(3)}, "weight"),
    ({"weight": torch.ones(3)}, "weight"),
    ({"weight": torch.ones(3, 4, dtype=torch.int64)}, "weight"),
    ({"weight": torch.ones(3, 4), "bias": torch.zeros(4)}, "bias"),
    ({"weight": torch.full((3, 4), float("nan"))}, "NaN"),
])
def test_head_from_module_rejects_bad_heads(bad, field):
    with pytest.raises(CheckpointError, match=field):
        head_from_module(bad)
    with pytest.raises(CheckpointError, match="class names"):
        head_from_module({"weight": torch.ones(3, 4)}, classes=["a"])


def test_save_head_round_trip(tmp_path):
    weight, bias = torch.randn(3, 4), torch.randn(3)
    meta = {"normalize": True, "logit_scale": 100.0, "classes": ("a", "b", "c"), "source": "zero_shot"}
    path = tmp_path / "heads" / "mnist.safetensors"
    save_head(path, weight, bias, meta)
    tensors = load_file(str(path))
    assert torch.equal(tensors["weight"], weight) and torch.equal(tensors["bias"], bias)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    from submerge.io.atomic import sha256_file

    hashes = {k: sidecar.pop(k) for k in ("sha256", "sidecar_sha256")}
    assert sidecar == {"normalize": True, "logit_scale": 100.0, "classes": ["a", "b", "c"], "source": "zero_shot"}
    assert hashes["sha256"] == sha256_file(path)  # the head's own hash, checked on reading
    assert sorted(p.name for p in path.parent.iterdir()) == ["mnist.json", "mnist.safetensors"]  # no temp files

    save_head(path, weight, None, {"normalize": False, "logit_scale": 1, "classes": None})
    assert set(load_file(str(path))) == {"weight"}


@pytest.mark.parametrize("kwargs, message", [
    (dict(meta={"logit_scale": 1.0}), "normalize"),
    (dict(meta={"normalize": True}), "logit_scale"),
    (dict(meta={"normalize": True, "logit_scale": 1.0, "classes": ["a"]}), "classes"),
    (dict(bias=torch.zeros(2)), "bias"),
    (dict(name="head.pt"), "safetensors"),
])
def test_save_head_rejects_bad_input(tmp_path, kwargs, message):
    args = dict(name="h.safetensors", weight=torch.ones(3, 4), bias=None,
                meta={"normalize": True, "logit_scale": 1.0, "classes": None})
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        save_head(tmp_path / args["name"], args["weight"], args["bias"], args["meta"])
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("damage", ["truncated head", "garbage head", "garbage sidecar", "list sidecar"])
def test_load_head_damaged_files_say_what_to_rerun(tmp_path, damage):
    from submerge.data.heads import head_path, load_head

    path = head_path(tmp_path, "mnist")
    save_head(path, torch.randn(3, 4), torch.randn(3), {"normalize": True, "logit_scale": 1.0, "classes": None})
    data = path.read_bytes()
    if damage == "truncated head":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage head":
        path.write_bytes(b"\x00" * 16)
    else:
        path.with_suffix(".json").write_text("{oops" if damage == "garbage sidecar" else "[]")
    name = "mnist.json" if "sidecar" in damage else "mnist.safetensors"
    with pytest.raises(CheckpointError, match=rf"{name}.*delete .*mnist\.safetensors and rerun \(rule expert_model\)"):
        load_head(tmp_path, "mnist")


def test_save_head_file_modes_follow_the_umask(tmp_path):
    import os

    for umask in (0o022, 0o077):
        old = os.umask(umask)
        try:
            path = tmp_path / f"u{umask:o}" / "heads" / "mnist.safetensors"
            save_head(path, torch.randn(3, 4), None, {"normalize": True, "logit_scale": 1.0})
        finally:
            os.umask(old)
        for p in (path, path.with_suffix(".json")):
            assert os.stat(p).st_mode & 0o777 == 0o666 & ~umask, (p, oct(umask))
