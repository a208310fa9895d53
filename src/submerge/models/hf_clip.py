"""Adapter for transformers ``CLIPVisionModelWithProjection`` (FusionBench's experts).

FusionBench merges ``tanganke/clip-vit-base-patch32_<task>`` experts (``CLIPVisionModel``
checkpoints) finetuned from ``openai/clip-vit-base-patch32`` (a full ``CLIPModel``), and
classifies with the *pretrained* ``CLIPModel.visual_projection`` applied on top of the
finetuned tower. Zero-shot heads (:func:`submerge.data.heads.zero_shot_head`) live in that
projected space, and the projection comes before the head's normalisation, so it belongs to
the encoder: the tower here is ``CLIPVisionModelWithProjection`` and :meth:`encode` returns
its ``image_embeds`` (``projection_dim`` wide).

Normalised keys are ``CLIPVisionModelWithProjection.state_dict()`` keys (transformers 5),
which are also the vision keys of a full ``CLIPModel``:

==============================================================================  ======  =====
key                                                                              kind    block
==============================================================================  ======  =====
``vision_model.encoder.layers.{i}.self_attn.{q,k,v,out}_proj.weight``            attn    i
``vision_model.encoder.layers.{i}.mlp.fc1.weight`` / ``fc2.weight``              mlp     i
``vision_model.encoder.layers.{i}.layer_norm{1,2}.*``                            norm    i
biases of the projections and of ``fc1`` / ``fc2``                               other   i
``vision_model.embeddings.{class_embedding,patch_embedding.weight,
position_embedding.weight}``                                                     embed   None
``vision_model.pre_layrnorm.*``, ``vision_model.post_layernorm.*``               norm    None
``visual_projection.weight``                                                     head    None
==============================================================================  ======  =====

Every entry has ``stacked = 1`` (q, k, v are separate matrices here).

Raw checkpoints accepted by :meth:`~HFCLIPVisionAdapter.tower_state_dict`:

* a full ``CLIPModel`` (``openai/clip-vit-base-patch32``): ``text_model.*``,
  ``text_projection.weight`` and ``logit_scale`` are dropped;
* a ``CLIPVisionModelWithProjection``: taken as it is;
* a ``CLIPVisionModel`` saved by transformers 4 (``vision_model.*``: FusionBench's experts)
  or its transformers 5 ``state_dict()`` (the same keys without ``vision_model.``). These
  carry **no** ``visual_projection``: the expert never changed it, so the pipeline takes the
  base's with :meth:`~HFCLIPVisionAdapter.complete_from_base` (its task vector is then zero).

The legacy ``vision_model.embeddings.position_ids`` buffer is dropped.
"""

from __future__ import annotations

import logging
import re
from functools import cache
from typing import Any, Mapping

import numpy as np
import torch

from submerge.errors import CheckpointError, ConfigError
from submerge.models import (
    ImageGeometry, ImageTensor, TransformersAdapter, StateDict, block_count, load_tokenizer, load_zero_shot_state,
    require_arch_mapping, square_image_size,
)

log = logging.getLogger(__name__)

_PREFIX = "vision_model."
_PROJECTION = "visual_projection.weight"
_B = r"vision_model\.encoder\.layers\.(?P<block>\d+)\."
_TOP_KEYS = tuple(_PREFIX + k for k in (
    "embeddings.class_embedding", "embeddings.patch_embedding.weight", "embeddings.position_embedding.weight",
    "pre_layrnorm.weight", "pre_layrnorm.bias", "post_layernorm.weight", "post_layernorm.bias"))
_BLOCK_KEYS = tuple(f"self_attn.{p}_proj.{w}" for p in ("q", "k", "v", "out") for w in ("weight", "bias")) + (
    "layer_norm1.weight", "layer_norm1.bias", "layer_norm2.weight", "layer_norm2.bias",
    "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")
_LEGACY_BUFFER = _PREFIX + "embeddings.position_ids"
_CLIP_TEXT = re.compile(r"text_model\..*|text_projection\.weight|logit_scale")  # a CLIPModel's text side
_TOWER_PARTS = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")  # CLIPVisionModel, transformers 5


def clip_image_processor(size: int, **steps):
    """``CLIPImageProcessor`` for S (resize the shortest edge to S, center crop S×S, rescale,
    OpenAI CLIP mean/std); ``steps`` switch steps off (``do_resize=False``, ...)."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, **steps)


class CLIPImageGeometry:
    """The resize and center crop of ``CLIPImageProcessor`` for S (rescale and normalise
    switched off) on one PIL image -> the uint8 array (S, S, 3) the processor normalises."""

    def __init__(self, size: int):
        self.processor = clip_image_processor(size, do_rescale=False, do_normalize=False)

    def __call__(self, image) -> np.ndarray:
        pixels = self.processor(images=image, return_tensors="pt")["pixel_values"][0]
        if pixels.dtype != torch.uint8:
            raise ValueError(f"CLIPImageProcessor without rescale/normalise gave {pixels.dtype} pixels, "
                             "expected uint8")
        return pixels.permute(1, 2, 0).contiguous().numpy()


@cache
def _clip_image_parts(size: int) -> tuple[ImageGeometry, ImageTensor]:
    """(geometry, tensor) parts of ``CLIPImageProcessor`` for S: resize + crop; rescale +
    normalise (the processor run without resize and crop, as a lookup table)."""
    import PIL.Image

    processor = clip_image_processor(size, do_resize=False, do_center_crop=False)
    table = ImageTensor.from_reference(
        lambda array: processor(images=PIL.Image.fromarray(array), return_tensors="pt")["pixel_values"][0],
        "CLIPImageProcessor")
    return CLIPImageGeometry(size), table


class HFCLIPVisionAdapter(TransformersAdapter):
    """transformers ``CLIPVisionModelWithProjection``."""

    name = "hf_clip_vision"
    rules = (
        (re.compile(_B + r"self_attn\.(q|k|v|out)_proj\.weight"), "attn", 1),
        (re.compile(_B + r"mlp\.fc[12]\.weight"), "mlp", 1),
        (re.compile(_B + r"layer_norm[12]\.(weight|bias)"), "norm", 1),
        (re.compile(_B + r"(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])\.bias"), "other", 1),
        (re.compile(r"vision_model\.embeddings\.(class_embedding|patch_embedding\.weight|position_embedding\.weight)"),
         "embed", 1),
        (re.compile(r"vision_model\.(pre_layrnorm|post_layernorm)\.(weight|bias)"), "norm", 1),
        (re.compile(re.escape(_PROJECTION)), "head", 1),
    )

    def required_keys(self, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
        """Keys every checkpoint of the tower carries: all but ``visual_projection.weight``,
        which a ``CLIPVisionModel`` checkpoint lacks (see :meth:`complete_from_base`)."""
        n = max(block_count(state_dict, r"^vision_model\.encoder\.layers\.(\d+)\."), 1)
        return list(_TOP_KEYS) + [f"{_PREFIX}encoder.layers.{i}.{k}" for i in range(n) for k in _BLOCK_KEYS]

    def tower_state_dict(self, raw: Mapping[str, torch.Tensor]) -> StateDict:
        """The vision tower of ``raw`` under normalised keys; CheckpointError if it is not one.

        ``visual_projection.weight`` is kept when ``raw`` has it and may be missing (a
        ``CLIPVisionModel`` checkpoint); every other key of the tower must be there.
        """
        if any(key.startswith(_PREFIX) for key in raw):  # CLIPModel, ...WithProjection, transformers-4 vision model
            tower = {k: v for k, v in raw.items() if not _CLIP_TEXT.fullmatch(k)}
        else:  # transformers-5 CLIPVisionModel.state_dict(): the same tower without the prefix
            tower = {(_PREFIX + k if k.startswith(_TOWER_PARTS) else k): v for k, v in raw.items()}
        tower.pop(_LEGACY_BUFFER, None)
        log.debug("hf_clip_vision: kept %d of %d checkpoint entries", len(tower), len(raw))
        self.check_tower(tower)
        if _PROJECTION not in tower:
            log.info("hf_clip_vision: checkpoint has no %r (a CLIPVisionModel); complete_from_base fills "
                     "it from the base", _PROJECTION)
        return tower

    def complete_from_base(self, expert_sd: Mapping[str, torch.Tensor],
                           base_sd: Mapping[str, torch.Tensor]) -> StateDict:
        """``expert_sd`` (a :meth:`tower_state_dict`) with ``visual_projection.weight`` taken from
        the base when the expert checkpoint does not carry it (FusionBench's experts never
        change it); CheckpointError if neither has it or the result is not a complete tower."""
        sd = dict(expert_sd)
        if _PROJECTION not in sd:
            if _PROJECTION not in base_sd:
                raise CheckpointError(f"adapter {self.name!r}: neither the expert nor the base checkpoint has "
                                      f"{_PROJECTION!r}; the base must be a full CLIPModel or a "
                                      "CLIPVisionModelWithProjection")
            sd[_PROJECTION] = base_sd[_PROJECTION]
            log.info("hf_clip_vision: %r taken from the base", _PROJECTION)
        self.check_tower(sd, source="expert checkpoint completed from the base")
        return sd

    def build(self, arch: dict) -> torch.nn.Module:
        """``CLIPVisionModelWithProjection`` with random init, in eval mode, on the default device.

        ``arch`` is a ``CLIPVisionConfig`` dict with ``projection_dim`` (e.g. a ``config.json``
        of a ``CLIPVisionModel``), or a full ``CLIPConfig`` dict: its ``vision_config`` with
        its top-level ``projection_dim`` (which ``CLIPModel`` uses). A missing
        ``projection_dim`` takes transformers' default (512).
        """
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        if not isinstance(arch, Mapping):
            raise ConfigError(f"{self.name}: arch must be a mapping of CLIPVisionConfig fields, got {arch!r}")
        fields = dict(arch.get("vision_config", arch))
        if "vision_config" in arch and "projection_dim" in arch:
            fields["projection_dim"] = arch["projection_dim"]
        try:
            config = CLIPVisionConfig.from_dict(fields)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{self.name}: invalid CLIPVisionConfig {fields!r}: {exc}") from exc
        return CLIPVisionModelWithProjection(config).eval()

    model_class = "CLIPVisionModelWithProjection"

    def encode(self, module: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """Pixel values ``(B, 3, H, W)`` -> ``image_embeds`` ``(B, projection_dim)``: the pooled
        output (post-layernorm CLS token) times ``visual_projection``, not normalised."""
        return module(pixel_values=inputs).image_embeds

    def image_size(self, arch: Mapping) -> int:
        """``image_size`` of the ``CLIPVisionConfig`` of ``arch`` (a ``CLIPVisionConfig`` dict, or a
        ``CLIPConfig`` dict with ``vision_config``); transformers' default when absent."""
        from transformers import CLIPVisionConfig

        arch = require_arch_mapping(arch)
        try:
            size = CLIPVisionConfig.from_dict(dict(arch.get("vision_config", arch))).image_size
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"arch is not a valid CLIPVisionConfig: {exc}") from exc
        return square_image_size(size)

    def image_geometry(self, arch: Mapping) -> ImageGeometry:
        """The resize (shortest edge to S, bicubic) and center crop of ``CLIPImageProcessor`` for
        S = :meth:`image_size`: PIL image -> uint8 array (S, S, 3)."""
        return _clip_image_parts(self.image_size(arch))[0]

    def image_tensor(self, arch: Mapping) -> ImageTensor:
        """The rescale and normalise (OpenAI CLIP mean/std) of that processor as an exact
        lookup table: uint8 (B, S, S, 3) -> float (B, 3, S, S)."""
        return _clip_image_parts(self.image_size(arch))[1]

    def zero_shot_model(self, arch: Mapping, raw: Mapping[str, torch.Tensor],
                        tokenizer_spec: Mapping | None = None, *,
                        source: str = "checkpoint") -> tuple[torch.nn.Module, Any]:
        """A transformers ``CLIPModel`` with ``raw`` loaded strictly, and the tokenizer of
        ``tokenizer_spec`` (required: ``{hub: id}`` or ``{path: dir}`` of a CLIP tokenizer).

        ``arch`` is a full ``CLIPConfig`` dict (with ``vision_config``), or a vision config
        dict: then the text tower is transformers' default and ``projection_dim`` is
        ``arch.get("projection_dim", 512)``. ``...embeddings.position_ids`` entries that
        transformers 4 saved and the model no longer has are dropped from ``raw``.
        """
        import transformers

        arch = require_arch_mapping(arch)
        if tokenizer_spec is None:
            raise ConfigError("config field tokenizer: required to build zero-shot heads with "
                              "hf_clip_vision ({hub: <repo id>} or {path: <dir>} of a CLIP tokenizer)")
        tokenizer = load_tokenizer(tokenizer_spec)
        config = transformers.CLIPConfig(**arch) if "vision_config" in arch else \
            transformers.CLIPConfig(vision_config=dict(arch), projection_dim=arch.get("projection_dim", 512))
        model = transformers.CLIPModel(config)
        # transformers 4 saved the position_ids buffers that transformers 5 no longer keeps
        expected = set(model.state_dict())
        raw = {k: v for k, v in raw.items() if k in expected or not k.endswith("embeddings.position_ids")}
        load_zero_shot_state(model, raw, source)
        return model, tokenizer
