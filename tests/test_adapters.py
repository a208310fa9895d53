"""Model adapters on tiny random-initialised towers, checked against the modules themselves.

The expected attention / MLP weights come from walking ``named_modules()`` of each block
(``nn.MultiheadAttention`` and ``nn.Linear`` layers and the type of their parent), not from
key names, so the adapters' key patterns are checked against an independent enumeration.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from submerge.errors import CheckpointError, ConfigError
from submerge.layers import num_blocks
from submerge.models import get_adapter

TINY_VIT = {"image_size": 16, "patch_size": 8, "width": 16, "layers": 3, "heads": 2, "mlp_ratio": 2.0, "output_dim": 8}


def _linear_kinds(blocks: nn.ModuleList, prefix: str) -> dict[str, tuple[int, str, int]]:
    """2-D attention / MLP weights of each block, found from module types."""
    out = {}
    for i, block in enumerate(blocks):
        for name, module in block.named_modules():
            parent = block.get_submodule(name.rpartition(".")[0])
            if isinstance(module, nn.MultiheadAttention):
                out[f"{prefix}{i}.{name}.in_proj_weight"] = (i, "attn", 3)
                out[f"{prefix}{i}.{name}.out_proj.weight"] = (i, "attn", 1)
            elif isinstance(module, nn.Linear) and not isinstance(parent, nn.MultiheadAttention):
                kind = "attn" if "Attention" in type(parent).__name__ else "mlp"
                out[f"{prefix}{i}.{name}.weight"] = (i, kind, 1)
    return out


def _found(adapter, sd) -> dict[str, tuple[int, str, int]]:
    return {k: (i.block, i.kind, i.stacked) for k, i in adapter.layer_infos(sd).items() if i.kind in ("attn", "mlp")}


def _check_norms_and_rest(adapter, module: nn.Module, block_prefixes: tuple[str, ...]):
    """LayerNorm-like parameters are ``norm``; nothing 1-D is attn/mlp; blocks come from the prefix."""
    infos = adapter.layer_infos(module.state_dict())
    for name, sub in module.named_modules():
        if isinstance(sub, nn.LayerNorm) or "LayerNorm" in type(sub).__name__:
            for pname in sub.state_dict():
                assert infos[f"{name}.{pname}"].kind == "norm", f"{name}.{pname}"
    for key, tensor in module.state_dict().items():
        info = infos[key]
        if tensor.dim() != 2:
            assert info.kind not in ("attn", "mlp"), key
        in_block = next((p for p in block_prefixes if key.startswith(p)), None)
        if in_block is None:
            assert info.block is None, key
        else:
            assert info.block == int(key[len(in_block):].split(".")[0]), key
    return infos


def test_get_adapter_unknown():
    with pytest.raises(ConfigError, match=r"'nope'.*hf_clip_vision.*hf_t5.*open_clip_vit"):
        get_adapter("nope")
    assert get_adapter("open_clip_vit").name == "open_clip_vit"


# ---------------------------------------------------------------------------- open_clip


def test_open_clip_layer_info_matches_modules():
    adapter = get_adapter("open_clip_vit")
    torch.manual_seed(0)
    tower = adapter.build(TINY_VIT)
    sd = tower.state_dict()
    assert _found(adapter, sd) == _linear_kinds(tower.transformer.resblocks, "transformer.resblocks.")
    infos = _check_norms_and_rest(adapter, tower, ("transformer.resblocks.",))
    assert num_blocks(infos) == 3
    assert {k: infos[k].kind for k in ("conv1.weight", "class_embedding", "positional_embedding", "proj")} == {
        "conv1.weight": "embed", "class_embedding": "embed", "positional_embedding": "embed", "proj": "other"}
    assert infos["transformer.resblocks.2.attn.in_proj_bias"].kind == "other"
    assert infos["transformer.resblocks.1.mlp.c_fc.bias"].kind == "other"


def test_open_clip_named_config_keys():
    """The real ViT-B-32 tower (built on the meta device: keys and shapes, no memory)."""
    adapter = get_adapter("open_clip_vit")
    with torch.device("meta"):
        tower = adapter.build({"model": "ViT-B-32", "quick_gelu": True})
    sd = tower.state_dict()
    adapter.check_tower(sd)
    found = _found(adapter, sd)
    assert found == _linear_kinds(tower.transformer.resblocks, "transformer.resblocks.")
    assert len(found) == 48 and num_blocks(adapter.layer_infos(sd)) == 12
    assert sd["transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 768, 768)
    assert type(tower.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    with pytest.raises(ConfigError, match="'model'"):
        adapter.build({"model": "ViT-NOPE-99"})
    with pytest.raises(ConfigError, match="'heads'"):
        adapter.build({k: v for k, v in TINY_VIT.items() if k != "heads"})
    with pytest.raises(ConfigError, match="'depth'"):
        adapter.build({**TINY_VIT, "depth": 3})


def test_open_clip_tower_state_dict_from_wrappers():
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    adapter = get_adapter("open_clip_vit")
    torch.manual_seed(0)
    vision = {k: v for k, v in TINY_VIT.items() if k not in ("output_dim", "heads")}
    vision["head_width"] = TINY_VIT["width"] // TINY_VIT["heads"]
    clip = open_clip.model.CLIP(embed_dim=8, vision_cfg=CLIPVisionCfg(**vision),
                                text_cfg=CLIPTextCfg(context_length=6, vocab_size=40, width=16, heads=2, layers=1))
    want = clip.visual.state_dict()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want_features = clip.visual(images)
    full = clip.state_dict()  # visual.* plus top-level text-tower keys (transformer.resblocks.* too)
    tall = {"model." + k: v for k, v in full.items() if not k.startswith("transformer.")}  # TALL-masks layout
    for raw in (full, tall, want):
        tower_sd = adapter.tower_state_dict(raw)
        assert tower_sd.keys() == want.keys()
        assert all(torch.equal(tower_sd[k], want[k]) for k in want)
    module = adapter.build(TINY_VIT)
    module.load_state_dict(adapter.tower_state_dict(tall), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(adapter.encode(module, images), want_features)
    assert adapter.encode(module, images).shape == (2, 8)


def test_open_clip_rejects_foreign_or_incomplete():
    adapter = get_adapter("open_clip_vit")
    sd = adapter.build(TINY_VIT).state_dict()
    missing = dict(sd)
    del missing["transformer.resblocks.1.mlp.c_fc.weight"]
    with pytest.raises(CheckpointError, match=r"missing key 'transformer\.resblocks\.1\.mlp\.c_fc\.weight'"):
        adapter.tower_state_dict(missing)
    gap = {k: v for k, v in sd.items() if not k.startswith("transformer.resblocks.1.")}
    with pytest.raises(CheckpointError, match=r"transformer\.resblocks\.1\."):
        adapter.tower_state_dict(gap)
    with pytest.raises(CheckpointError, match=r"unexpected key 'transformer\.resblocks\.0\.attn\.extra'"):
        adapter.tower_state_dict({**sd, "transformer.resblocks.0.attn.extra": torch.ones(1)})
    with pytest.raises(CheckpointError, match="unexpected key"):
        adapter.tower_state_dict({"visual.trunk.blocks.0.weight": torch.ones(1)})
    with pytest.raises(CheckpointError, match="unexpected key"):
        adapter.layer_info("encoder.layers.0.self_attn.q_proj.weight")


# ---------------------------------------------------------------------------- HF CLIP vision


def _clip_vision_config(**extra):
    return {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2,
            "image_size": 16, "patch_size": 8, **extra}


def _tiny_clip():
    """A full transformers CLIPModel (vision + text tower), projection_dim 8."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    return CLIPModel(CLIPConfig(vision_config=_clip_vision_config(),
                                text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                             "num_attention_heads": 2, "vocab_size": 40, "bos_token_id": 0,
                                             "eos_token_id": 1, "pad_token_id": 1},
                                projection_dim=8)).eval()


def _projected(clip, images):
    """Independent computation of CLIP's image features: pooled output times visual_projection."""
    with torch.no_grad():
        return clip.vision_model(pixel_values=images).pooler_output @ clip.visual_projection.weight.T


def test_hf_clip_layer_info_matches_modules():
    adapter = get_adapter("hf_clip_vision")
    torch.manual_seed(0)
    model = adapter.build(_clip_vision_config(projection_dim=8))
    sd = model.state_dict()
    assert sd.keys() == set(adapter.required_keys(sd)) | {"visual_projection.weight"}
    expected = _linear_kinds(model.vision_model.encoder.layers, "vision_model.encoder.layers.")
    assert _found(adapter, sd) == expected
    assert sum(kind == "attn" for _, kind, _ in expected.values()) == 12  # q, k, v, out x 3 blocks
    assert sum(kind == "mlp" for _, kind, _ in expected.values()) == 6  # fc1, fc2 x 3 blocks
    infos = _check_norms_and_rest(adapter, model, ("vision_model.encoder.layers.",))
    assert infos["vision_model.embeddings.patch_embedding.weight"].kind == "embed"
    assert infos["vision_model.encoder.layers.0.self_attn.q_proj.bias"].kind == "other"
    assert (infos["visual_projection.weight"].block, infos["visual_projection.weight"].kind) == (None, "head")
    assert sd["visual_projection.weight"].shape == (8, 16)
    assert num_blocks(infos) == 3


def test_hf_clip_build_from_vision_or_full_config():
    adapter = get_adapter("hf_clip_vision")
    full = adapter.build({"vision_config": _clip_vision_config(projection_dim=4), "projection_dim": 8})
    assert full.visual_projection.weight.shape == (8, 16)  # CLIPModel uses the top-level projection_dim
    assert adapter.build(_clip_vision_config(projection_dim=6)).visual_projection.weight.shape == (6, 16)
    with pytest.raises(ConfigError, match="arch must be a mapping"):
        adapter.build([1, 2])


def test_hf_clip_real_config_keys():
    """The suite's ViT-B/32 tower (meta device: keys and shapes only)."""
    adapter = get_adapter("hf_clip_vision")
    arch = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
            "image_size": 224, "patch_size": 32, "projection_dim": 512}
    with torch.device("meta"):
        model = adapter.build(arch)
    sd = model.state_dict()
    adapter.check_tower(sd)
    found = _found(adapter, sd)
    assert found == _linear_kinds(model.vision_model.encoder.layers, "vision_model.encoder.layers.")
    assert len(found) == 72 and num_blocks(adapter.layer_infos(sd)) == 12
    assert sd["visual_projection.weight"].shape == (512, 768)


def test_hf_clip_tower_from_full_clip_model():
    adapter = get_adapter("hf_clip_vision")
    clip = _tiny_clip()
    raw = {**clip.state_dict(), "vision_model.embeddings.position_ids": torch.arange(5)[None]}  # legacy buffer
    tower = adapter.tower_state_dict(raw)
    module = adapter.build({"vision_config": _clip_vision_config(), "projection_dim": 8})
    assert tower.keys() == module.state_dict().keys()
    assert torch.equal(tower["visual_projection.weight"], clip.visual_projection.weight)
    module.load_state_dict(tower, strict=True)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        got = adapter.encode(module, images)
    assert got.shape == (2, 8)
    torch.testing.assert_close(got, _projected(clip, images))
    broken = dict(tower)
    del broken["vision_model.encoder.layers.2.mlp.fc2.bias"]
    with pytest.raises(CheckpointError, match=r"'vision_model\.encoder\.layers\.2\.mlp\.fc2\.bias'"):
        adapter.tower_state_dict(broken)
    with pytest.raises(CheckpointError, match=r"unexpected key 'vision_model\.extra'"):
        adapter.tower_state_dict({**raw, "vision_model.extra": torch.ones(1)})
    stripped = {k[len("vision_model."):] if k.startswith("vision_model.") else k: v
                for k, v in clip.state_dict().items()}  # no known layout: text keys are not dropped
    with pytest.raises(CheckpointError, match="unexpected key '(logit_scale|text_model|text_projection)"):
        adapter.tower_state_dict(stripped)


def test_hf_clip_vision_only_expert_completed_from_base():
    """FusionBench experts are CLIPVisionModel checkpoints: no visual_projection, taken from the base."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    adapter = get_adapter("hf_clip_vision")
    clip = _tiny_clip()
    base = adapter.tower_state_dict(clip.state_dict())
    torch.manual_seed(1)  # an "expert": the same architecture, other weights
    vision = CLIPVisionModel(CLIPVisionConfig(**_clip_vision_config())).eval()
    t5_layout = vision.state_dict()  # transformers 5: no "vision_model." prefix
    t4_layout = {"vision_model." + k: v for k, v in t5_layout.items()}  # as FusionBench saved them
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = vision(pixel_values=images).pooler_output @ clip.visual_projection.weight.T
    for raw in (t5_layout, t4_layout):
        expert = adapter.tower_state_dict(raw)
        assert expert.keys() == base.keys() - {"visual_projection.weight"}
        assert all(torch.equal(expert["vision_model." + k], v) for k, v in t5_layout.items())
        done = adapter.complete_from_base(expert, base)
        assert done.keys() == base.keys()
        assert torch.equal(done["visual_projection.weight"], base["visual_projection.weight"])
        module = adapter.build(_clip_vision_config(projection_dim=8))
        module.load_state_dict(done, strict=True)
        with torch.no_grad():
            torch.testing.assert_close(adapter.encode(module, images), want)
    # an expert that carries its own projection keeps it
    own = {**base, "visual_projection.weight": torch.zeros(8, 16)}
    assert torch.equal(adapter.complete_from_base(own, base)["visual_projection.weight"], torch.zeros(8, 16))
    # any other missing key is an error, projection or not
    gap = {k: v for k, v in t4_layout.items() if k != "vision_model.encoder.layers.1.self_attn.k_proj.weight"}
    with pytest.raises(CheckpointError, match=r"missing key 'vision_model\.encoder\.layers\.1\.self_attn\.k_proj"):
        adapter.tower_state_dict(gap)
    with pytest.raises(CheckpointError, match=r"missing key 'vision_model\.encoder\.layers\.1\.self_attn\.k_proj"):
        adapter.complete_from_base({k: base[k] for k in gap}, base)
    # a base without projection cannot complete a vision-only expert
    with pytest.raises(CheckpointError, match=r"neither the expert nor the base.*'visual_projection\.weight'"):
        adapter.complete_from_base(adapter.tower_state_dict(t4_layout), adapter.tower_state_dict(t4_layout))


# ---------------------------------------------------------------------------- T5


def _t5_config(ffn: str) -> dict:
    return {"vocab_size": 40, "d_model": 16, "d_kv": 4, "d_ff": 32, "num_layers": 2, "num_decoder_layers": 3,
            "num_heads": 2, "feed_forward_proj": ffn, "decoder_start_token_id": 0, "pad_token_id": 0}


@pytest.mark.parametrize("ffn", ["relu", "gated-gelu"])
def test_t5_layer_info_matches_modules(ffn):
    adapter = get_adapter("hf_t5")
    torch.manual_seed(0)
    model = adapter.build(_t5_config(ffn))
    sd = model.state_dict()
    expected = {**_linear_kinds(model.encoder.block, "encoder.block."),
                **_linear_kinds(model.decoder.block, "decoder.block.")}
    assert _found(adapter, sd) == expected
    n_ffn = 3 if ffn.startswith("gated") else 2
    assert len(expected) == 2 * (4 + n_ffn) + 3 * (8 + n_ffn)
    infos = _check_norms_and_rest(adapter, model, ("encoder.block.", "decoder.block."))
    assert num_blocks(infos) == 3  # decoder block i shares depth i with encoder block i
    assert infos["lm_head.weight"].kind == "head"
    assert infos["shared.weight"].kind == infos["decoder.embed_tokens.weight"].kind == "embed"
    assert infos["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].kind == "other"


def test_t5_tower_fills_tied_names_and_encodes():
    adapter = get_adapter("hf_t5")
    torch.manual_seed(0)
    model = adapter.build(_t5_config("relu"))
    full = model.state_dict()
    saved = {k: v.clone() for k, v in full.items()
             if k not in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")}
    tower = adapter.tower_state_dict(saved)
    assert tower.keys() == full.keys()
    fresh = adapter.build(_t5_config("relu"))
    fresh.load_state_dict(tower, strict=True)
    inputs = {"input_ids": torch.tensor([[3, 4, 5, 1]]), "attention_mask": torch.ones(1, 4, dtype=torch.long),
              "labels": torch.tensor([[6, 1]])}
    with torch.no_grad():
        got = adapter.encode(fresh, inputs)
        torch.testing.assert_close(got, adapter.encode(model, inputs))
    assert got.shape == (1, 2, 40)
    with pytest.raises(ValueError, match="labels"):
        adapter.encode(model, {"input_ids": inputs["input_ids"]})
    del saved["decoder.block.2.layer.1.EncDecAttention.k.weight"]
    with pytest.raises(CheckpointError, match=r"'decoder\.block\.2\.layer\.1\.EncDecAttention\.k\.weight'"):
        adapter.tower_state_dict(saved)


# ----------------------------------------------------------------------------- image preprocessing

def _random_image(height=37, width=23, seed=0):
    import numpy as np
    import PIL.Image

    return PIL.Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3)).astype(np.uint8))


@pytest.mark.parametrize("arch, size", [({"model": "ViT-B-32"}, 224), (TINY_VIT, 16),
                                        ({**TINY_VIT, "image_size": [16, 16]}, 16)])
def test_open_clip_image_transform_is_open_clips_eval_transform(arch, size):
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    from submerge.data.vision import image_transform

    adapter = get_adapter("open_clip_vit")
    assert adapter.image_size(arch) == size
    reference = open_clip.image_transform(size, is_train=False, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD)
    for image in (_random_image(), _random_image(20, 41, seed=1)):
        expected = reference(image)
        assert expected.shape == (3, size, size)
        assert torch.equal(adapter.image_transform(arch)(image), expected)
        assert torch.equal(image_transform({"adapter": "open_clip_vit", "arch": arch})(image), expected)


@pytest.mark.parametrize("arch, size", [(_clip_vision_config(), 16), ({"vision_config": {"image_size": 32}}, 32),
                                        ({}, 224)])
def test_hf_clip_image_transform_is_clip_image_processor(arch, size):
    from transformers import CLIPImageProcessor

    from submerge.data.vision import image_transform

    adapter = get_adapter("hf_clip_vision")
    assert adapter.image_size(arch) == size
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    for image in (_random_image(), _random_image(20, 41, seed=1)):
        expected = processor(images=image, return_tensors="pt")["pixel_values"][0]
        assert expected.shape == (3, size, size)
        assert torch.equal(adapter.image_transform(arch)(image), expected)
        assert torch.equal(image_transform({"adapter": "hf_clip_vision", "arch": arch})(image), expected)


def _reference_transform(name, size):
    """The library's own evaluation transform of each CLIP adapter (what image_transform was)."""
    if name == "open_clip_vit":
        import open_clip
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        return open_clip.image_transform(size, is_train=False, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD)
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return lambda image: processor(images=image, return_tensors="pt")["pixel_values"][0]


@pytest.mark.parametrize("name, arch, size", [
    ("open_clip_vit", TINY_VIT, 16), ("open_clip_vit", {"model": "ViT-B-32"}, 224),
    ("hf_clip_vision", _clip_vision_config(), 16), ("hf_clip_vision", {}, 224),
])
def test_image_geometry_then_tensor_is_the_library_transform(name, arch, size):
    import numpy as np
    import PIL.Image

    adapter = get_adapter(name)
    reference = _reference_transform(name, size)
    geometry, tensor = adapter.image_geometry(arch), adapter.image_tensor(arch)
    rs = np.random.RandomState(3)
    images = []
    for i in range(12):  # non-square, smaller and larger than S, RGB and grayscale
        h, w = rs.randint(size // 2, 2 * size + 40, 2)
        shape = (h, w) if i % 4 == 0 else (h, w, 3)
        images.append(PIL.Image.fromarray(rs.randint(0, 256, shape).astype(np.uint8)).convert("RGB"))
    arrays = [geometry(image) for image in images]
    assert all(a.dtype == np.uint8 and a.shape == (size, size, 3) for a in arrays)
    expected = torch.stack([reference(image) for image in images])
    batch = tensor(torch.from_numpy(np.stack(arrays)))
    assert batch.dtype == torch.float32 and batch.shape == (12, 3, size, size) and batch.is_contiguous()
    assert torch.equal(batch, expected)
    composed = adapter.image_transform(arch)
    assert all(torch.equal(composed(image), want) for image, want in zip(images, expected))


def test_image_tensor_table():
    import pickle

    import numpy as np

    from submerge.models import ImageTensor

    oc = get_adapter("open_clip_vit").image_tensor(TINY_VIT)
    assert oc.lut.shape == (3, 256) and oc.lut.dtype == torch.float32
    again = pickle.loads(pickle.dumps(oc))  # DataLoader workers
    x = torch.randint(0, 256, (2, 5, 4, 3), dtype=torch.uint8)
    assert torch.equal(again(x), oc(x))
    for bad in (x.float(), x[0], x[..., :2]):
        with pytest.raises(ValueError, match=r"uint8 \(B, H, W, 3\)"):
            oc(bad)
    mean = lambda a: torch.from_numpy(a).permute(2, 0, 1).float() - float(a.mean())  # noqa: E731 - not per value
    with pytest.raises(RuntimeError, match="not a per-channel function"):
        ImageTensor.from_reference(mean, "mean-centred")
    with pytest.raises(RuntimeError, match="expected float32"):
        ImageTensor.from_reference(lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))), "uint8")


def test_image_preprocessing_errors():
    with pytest.raises(ConfigError, match="adapter 'hf_t5' has no image preprocessing"):
        get_adapter("hf_t5").image_transform({})
    with pytest.raises(ConfigError, match="adapter 'hf_t5' has no image preprocessing"):
        get_adapter("hf_t5").image_size({})
    for part in ("image_geometry", "image_tensor"):
        with pytest.raises(ConfigError, match="adapter 'hf_t5' has no image preprocessing"):
            getattr(get_adapter("hf_t5"), part)({})
    oc, hf = get_adapter("open_clip_vit"), get_adapter("hf_clip_vision")
    with pytest.raises(ConfigError, match="must be square"):
        oc.image_size({**TINY_VIT, "image_size": [16, 8]})
    with pytest.raises(ConfigError, match="image_size"):
        oc.image_size({"patch_size": 8})
    with pytest.raises(ConfigError, match="not an open_clip model config"):
        oc.image_transform({"model": "ViT-Nope"})
    with pytest.raises(ConfigError, match="CLIPVisionConfig"):
        hf.image_size({"vision_config": "not a mapping"})
    for adapter in (oc, hf):
        with pytest.raises(ConfigError, match="'arch' mapping"):
            adapter.image_transform(None)


# ----------------------------------------------------------------------------- zero-shot models

_TINY_OC_CLIP = "submerge-test-tiny-clip"


@pytest.fixture()
def tiny_open_clip_config(monkeypatch):
    """A tiny full open_clip CLIP registered as a named config (as ViT-B-32 is)."""
    import open_clip.factory

    cfg = {"embed_dim": 8, "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 16, "layers": 1, "head_width": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, _TINY_OC_CLIP, cfg)
    return {"model": _TINY_OC_CLIP, "quick_gelu": True}


@pytest.fixture()
def clip_tokenizer_dir(tmp_path):
    """A tiny word-level tokenizer in CLIP's layout (<s> text </s>), saved like a hub tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate("a photo of the cat dog .".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>",
                            unk_token="<unk>").save_pretrained(str(tmp_path / "tok"))
    return tmp_path / "tok"


def _same_state(model, raw):
    sd = model.state_dict()
    assert sd.keys() == raw.keys()
    assert all(torch.equal(sd[k], raw[k]) for k in raw)


def test_open_clip_zero_shot_model_loads_strictly(tiny_open_clip_config):
    import open_clip

    from submerge.data.heads import zero_shot_head

    adapter = get_adapter("open_clip_vit")
    torch.manual_seed(3)
    source = open_clip.create_model(_TINY_OC_CLIP, pretrained=None, force_quick_gelu=True).eval()
    raw = {k: v.clone() for k, v in source.state_dict().items()}
    model, tokenizer = adapter.zero_shot_model(tiny_open_clip_config, raw, None, source="clip.safetensors")
    _same_state(model, raw)
    assert type(model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    got, _ = zero_shot_head(model, tokenizer, ["cat", "dog"], ["a photo of a {c}."])
    want, _ = zero_shot_head(source, open_clip.get_tokenizer(_TINY_OC_CLIP), ["cat", "dog"], ["a photo of a {c}."])
    assert torch.equal(got, want)
    vision_only = {f"visual.{k}": v for k, v in source.visual.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"zeroshot_model clip\.safetensors: not a full CLIP checkpoint"):
        adapter.zero_shot_model(tiny_open_clip_config, vision_only, None, source="clip.safetensors")
    with pytest.raises(ConfigError, match="'model'"):
        adapter.zero_shot_model(TINY_VIT, raw)


def test_hf_clip_zero_shot_model_loads_strictly(clip_tokenizer_dir):
    from transformers import AutoTokenizer

    from submerge.data.heads import zero_shot_head

    adapter = get_adapter("hf_clip_vision")
    source = _tiny_clip()
    arch = source.config.to_dict()
    raw = {k: v.clone() for k, v in source.state_dict().items()}
    legacy = {"vision_model.embeddings.position_ids": torch.arange(5)[None],
              "text_model.embeddings.position_ids": torch.arange(16)[None]}  # saved by transformers 4
    model, tokenizer = adapter.zero_shot_model(arch, {**raw, **legacy}, {"path": str(clip_tokenizer_dir)},
                                               source="clip.bin")
    _same_state(model, raw)
    got, _ = zero_shot_head(model, tokenizer, ["cat", "dog"], ["a photo of the {c} ."])
    want, _ = zero_shot_head(source, AutoTokenizer.from_pretrained(str(clip_tokenizer_dir)), ["cat", "dog"],
                             ["a photo of the {c} ."])
    assert torch.equal(got, want)
    vision_only = adapter.tower_state_dict(raw)  # a CLIPVisionModelWithProjection: no text tower
    with pytest.raises(CheckpointError,
                       match=r"(?s)zeroshot_model clip\.bin: not a full CLIP checkpoint.*Missing.*text_model"):
        adapter.zero_shot_model(arch, vision_only, {"path": str(clip_tokenizer_dir)}, source="clip.bin")
    with pytest.raises(ConfigError, match="config field tokenizer"):
        adapter.zero_shot_model(arch, raw, None)


def test_zero_shot_model_needs_a_clip_adapter():
    with pytest.raises(ConfigError, match="config field adapter: zero-shot heads need a CLIP adapter, not 'hf_t5'"):
        get_adapter("hf_t5").zero_shot_model({}, {}, None)
