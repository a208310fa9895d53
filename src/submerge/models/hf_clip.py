"""Adapter for transformers ``CLIPVisionModel`` (FusionBench's experts).

FusionBench merges ``tanganke/clip-vit-base-patch32_<task>`` experts finetuned from
``openai/clip-vit-base-patch32``; both are ``CLIPVisionModel`` checkpoints. Normalised keys
are the ``CLIPVisionModel``'s own ``state_dict()`` keys, which in transformers 5 carry no
``vision_model.`` prefix:

=====================================================================  ======  =====
key                                                                     kind    block
=====================================================================  ======  =====
``encoder.layers.{i}.self_attn.{q,k,v,out}_proj.weight``                attn    i
``encoder.layers.{i}.mlp.fc1.weight`` / ``fc2.weight``                  mlp     i
``encoder.layers.{i}.layer_norm{1,2}.*``                                norm    i
biases of the projections and of ``fc1`` / ``fc2``                      other   i
``embeddings.{class_embedding,patch_embedding.weight,position_embedding.weight}``  embed  None
``pre_layrnorm.*``, ``post_layernorm.*``                                norm    None
=====================================================================  ======  =====

Every entry has ``stacked = 1`` (q, k, v are separate matrices here).

Raw checkpoints may carry a ``vision_model.`` prefix (``CLIPVisionModel`` saved by
transformers 4, or a full ``CLIPModel``, whose text tower, ``visual_projection``,
``text_projection`` and ``logit_scale`` are dropped); the legacy
``embeddings.position_ids`` buffer is dropped too.

``encode`` returns the pooled output (post-layernorm CLS token), *without* a visual
projection: the tower that is merged has none. FusionBench's classifier applies the
*pretrained* ``CLIPModel.visual_projection`` to this pooled output before comparing with the
zero-shot text embeddings, so that projection belongs to the classification head.
"""

from __future__ import annotations

import logging
import re
from typing import Mapping

import torch

from submerge.errors import ConfigError
from submerge.models import Adapter, StateDict, block_count, strip_prefix

log = logging.getLogger(__name__)

_B = r"encoder\.layers\.(?P<block>\d+)\."
_TOP_KEYS = ("embeddings.class_embedding", "embeddings.patch_embedding.weight",
             "embeddings.position_embedding.weight", "pre_layrnorm.weight", "pre_layrnorm.bias",
             "post_layernorm.weight", "post_layernorm.bias")
_BLOCK_KEYS = tuple(f"self_attn.{p}_proj.{w}" for p in ("q", "k", "v", "out") for w in ("weight", "bias")) + (
    "layer_norm1.weight", "layer_norm1.bias", "layer_norm2.weight", "layer_norm2.bias",
    "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")
_LEGACY_BUFFERS = ("embeddings.position_ids",)


class HFCLIPVisionAdapter(Adapter):
    """transformers ``CLIPVisionModel``."""

    name = "hf_clip_vision"
    rules = (
        (re.compile(_B + r"self_attn\.(q|k|v|out)_proj\.weight"), "attn", 1),
        (re.compile(_B + r"mlp\.fc[12]\.weight"), "mlp", 1),
        (re.compile(_B + r"layer_norm[12]\.(weight|bias)"), "norm", 1),
        (re.compile(_B + r"(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])\.bias"), "other", 1),
        (re.compile(r"embeddings\.(class_embedding|patch_embedding\.weight|position_embedding\.weight)"),
         "embed", 1),
        (re.compile(r"(pre_layrnorm|post_layernorm)\.(weight|bias)"), "norm", 1),
    )

    def required_keys(self, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
        n = max(block_count(state_dict, r"^encoder\.layers\.(\d+)\."), 1)
        return list(_TOP_KEYS) + [f"encoder.layers.{i}.{k}" for i in range(n) for k in _BLOCK_KEYS]

    def tower_state_dict(self, raw: Mapping[str, torch.Tensor]) -> StateDict:
        """The vision tower of ``raw`` under normalised keys; CheckpointError if it is not one."""
        if any(key.startswith("vision_model.") for key in raw):
            tower = strip_prefix(raw, "vision_model.")
            log.debug("hf_clip_vision: kept %d keys under 'vision_model.', dropped %d", len(tower),
                      len(raw) - len(tower))
        else:
            tower = dict(raw)
        for key in _LEGACY_BUFFERS:
            tower.pop(key, None)
        self.check_tower(tower)
        return tower

    def build(self, arch: dict) -> torch.nn.Module:
        """``CLIPVisionModel`` with random init, in eval mode, on the default torch device.

        ``arch`` is a ``CLIPVisionConfig`` dict (e.g. ``{"hidden_size": 768, ...}`` or a
        ``config.json``); a full ``CLIPConfig`` dict contributes its ``vision_config``.
        """
        from transformers import CLIPVisionConfig, CLIPVisionModel

        if not isinstance(arch, Mapping):
            raise ConfigError(f"{self.name}: arch must be a mapping of CLIPVisionConfig fields, got {arch!r}")
        fields = dict(arch.get("vision_config", arch))
        try:
            config = CLIPVisionConfig.from_dict(fields)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{self.name}: invalid CLIPVisionConfig {fields!r}: {exc}") from exc
        return CLIPVisionModel(config).eval()

    def encode(self, module: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """Pixel values ``(B, 3, H, W)`` -> pooled output ``(B, hidden_size)`` (no projection)."""
        return module(pixel_values=inputs).pooler_output
