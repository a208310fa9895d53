"""Adapter for open_clip CLIP image encoders (``open_clip.transformer.VisionTransformer``).

Normalised keys are the ``VisionTransformer``'s own ``state_dict()`` keys, i.e. those of
``model.visual`` of an open_clip ``CLIP``:

==========================================================  ======  =====  =======
key                                                          kind    block  stacked
==========================================================  ======  =====  =======
``transformer.resblocks.{i}.attn.in_proj_weight``            attn    i      3 (W_q; W_k; W_v)
``transformer.resblocks.{i}.attn.out_proj.weight``           attn    i      1
``transformer.resblocks.{i}.mlp.c_fc.weight`` / ``c_proj``   mlp     i      1
``transformer.resblocks.{i}.ln_1.*`` / ``ln_2.*``            norm    i      1
biases of those layers (and layer-scale ``ls_{1,2}.gamma``)  other   i      1
``conv1.weight``, ``class_embedding``, ``positional_embedding``  embed  None  1
``ln_pre.*``, ``ln_post.*``                                  norm    None   1
``proj`` (final image projection)                            other   None   1
==========================================================  ======  =====  =======

``proj`` is ``other``: the paper boosts "linear layers and attention layers" of the blocks;
FusionBench's port also boosts ``visual.proj`` (docs/anchors.md), which callers can do by
selecting that key explicitly.

Raw checkpoints arrive as TALL-masks / task_vectors ``ImageEncoder`` state dicts
(``model.visual.*`` plus ``model.*`` text-tower keys, which are dropped), as full open_clip
``CLIP`` state dicts (``visual.*``), or as the tower itself.

QuickGELU: the OpenAI CLIP weights (and so the TALL-masks / task_vectors experts finetuned
from them with open_clip 2.x) use QuickGELU. open_clip's plain ``ViT-B-32`` config uses
``nn.GELU``; build those towers with ``{"model": "ViT-B-32", "quick_gelu": true}`` (or the
``ViT-B-32-quickgelu`` config), otherwise the weights load but the features are wrong.
"""

from __future__ import annotations

import logging
import re
from functools import cache
from typing import Any, Mapping

import numpy as np
import torch

from submerge.errors import ConfigError
from submerge.models import (
    Adapter, ImageGeometry, ImageTensor, StateDict, block_count, check_arch_fields, load_zero_shot_state,
    require_arch_mapping, square_image_size, strip_prefix,
)

log = logging.getLogger(__name__)

_B = r"transformer\.resblocks\.(?P<block>\d+)\."
_RAW_PREFIXES = ("model.visual.", "module.visual.", "visual.")
_TINY_FIELDS = ("image_size", "patch_size", "width", "layers", "heads", "mlp_ratio", "output_dim")
_TOP_KEYS = ("class_embedding", "positional_embedding", "conv1.weight",
             "ln_pre.weight", "ln_pre.bias", "ln_post.weight", "ln_post.bias")
_BLOCK_KEYS = ("ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias",
               "attn.out_proj.weight", "attn.out_proj.bias", "ln_2.weight", "ln_2.bias",
               "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")


class OpenClipViTAdapter(Adapter):
    """open_clip ``VisionTransformer`` (the image tower ``model.visual``)."""

    name = "open_clip_vit"
    rules = (
        (re.compile(_B + r"attn\.in_proj_weight"), "attn", 3),
        (re.compile(_B + r"attn\.out_proj\.weight"), "attn", 1),
        (re.compile(_B + r"mlp\.c_(fc|proj)\.weight"), "mlp", 1),
        (re.compile(_B + r"ln_[12]\.(weight|bias)"), "norm", 1),
        (re.compile(_B + r"(attn\.in_proj_bias|attn\.out_proj\.bias|mlp\.c_(fc|proj)\.bias|ls_[12]\.gamma)"),
         "other", 1),
        (re.compile(r"class_embedding|positional_embedding|conv1\.weight"), "embed", 1),
        (re.compile(r"ln_(pre|post)\.(weight|bias)"), "norm", 1),
        (re.compile(r"proj"), "other", 1),
    )

    def required_keys(self, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
        n = max(block_count(state_dict, r"^transformer\.resblocks\.(\d+)\."), 1)
        return list(_TOP_KEYS) + [f"transformer.resblocks.{i}.{k}" for i in range(n) for k in _BLOCK_KEYS]

    def tower_state_dict(self, raw: Mapping[str, torch.Tensor]) -> StateDict:
        """The image tower of ``raw`` under normalised keys; CheckpointError if it is not one."""
        for prefix in _RAW_PREFIXES:
            if any(key.startswith(prefix) for key in raw):
                tower = strip_prefix(raw, prefix)
                log.debug("open_clip_vit: kept %d keys under %r, dropped %d", len(tower), prefix,
                          len(raw) - len(tower))
                break
        else:
            tower = dict(raw)
        self.check_tower(tower)
        return tower

    def build(self, arch: dict) -> torch.nn.Module:
        """The image tower with random init, in eval mode, on the default torch device.

        ``arch`` is ``{"model": <open_clip config name>, "quick_gelu": bool}`` (the tower of
        ``open_clip.create_model(name, pretrained=None)``) or an explicit config with fields
        ``image_size, patch_size, width, layers, heads, mlp_ratio, output_dim`` (+ optional
        ``quick_gelu``) that builds ``open_clip.transformer.VisionTransformer`` directly.
        """
        import open_clip
        from open_clip.transformer import QuickGELU, VisionTransformer

        quick_gelu = bool(arch.get("quick_gelu", False))
        if "model" in arch:
            check_arch_fields(arch, ("model", "quick_gelu"), ("model",), self.name)
            try:
                model = open_clip.create_model(arch["model"], pretrained=None, force_quick_gelu=quick_gelu,
                                               device=torch.get_default_device())
            except RuntimeError as exc:
                raise ConfigError(f"{self.name}: arch field 'model': {exc}") from exc
            tower = model.visual
        else:
            check_arch_fields(arch, _TINY_FIELDS + ("quick_gelu",), _TINY_FIELDS, self.name)
            tower = VisionTransformer(
                image_size=int(arch["image_size"]), patch_size=int(arch["patch_size"]),
                width=int(arch["width"]), layers=int(arch["layers"]), heads=int(arch["heads"]),
                mlp_ratio=float(arch["mlp_ratio"]), output_dim=int(arch["output_dim"]),
                act_layer=QuickGELU if quick_gelu else torch.nn.GELU,
            )
        return tower.eval()

    def encode(self, module: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` -> projected image features ``(B, output_dim)``, not normalised.

        Runs under the caller's grad mode (wrap in ``torch.no_grad()`` for evaluation).
        """
        return module(inputs)

    library = "open_clip"
    EXPORT_FILE = "open_clip_visual.safetensors"
    EXPORT_CONFIG = "open_clip_config.json"  # explicit (tiny) archs: for open_clip.add_model_config

    def save_model(self, module: torch.nn.Module, out_dir, arch: Mapping) -> list:
        """The tower's state dict as safetensors (``open_clip_visual.safetensors``): exactly
        what ``open_clip.create_model(<arch>).visual.load_state_dict`` takes, strictly; for an
        explicit arch also ``open_clip_config.json``, an open_clip model config of that tower
        (:func:`open_clip_config`)."""
        import json
        from pathlib import Path

        from submerge.io.atomic import write_text_atomic
        from submerge.io.checkpoints import _safetensors_ready, save_safetensors

        path = Path(out_dir) / self.EXPORT_FILE
        save_safetensors(_safetensors_ready(module.state_dict()), path, metadata={"format": "pt"})
        written = [path]
        config = open_clip_config(arch)
        if config is not None:
            written.append(Path(out_dir) / self.EXPORT_CONFIG)
            write_text_atomic(written[-1], json.dumps(config, indent=2) + "\n")
        return written

    def load_snippet(self, arch: Mapping) -> str:
        if "model" in arch:
            name = arch["model"]
            gelu = ", force_quick_gelu=True" if arch.get("quick_gelu") else ""
            first = "import open_clip, safetensors.torch"
        else:
            name, gelu = self.EXPORT_CONFIG.removesuffix(".json"), ""
            first = f"import open_clip, safetensors.torch; open_clip.add_model_config(\"{self.EXPORT_CONFIG}\")"
        return (f"{first}\nmodel = open_clip.create_model(\"{name}\"{gelu})\n"
                f"model.visual.load_state_dict(safetensors.torch.load_file(\"{self.EXPORT_FILE}\"))")

    def image_size(self, arch: Mapping) -> int:
        """``arch["image_size"]``, or the ``vision_cfg.image_size`` of open_clip's bundled config
        ``arch["model"]``."""
        arch = require_arch_mapping(arch)
        if "model" in arch:  # {"model": "ViT-B-32"}: open_clip's bundled config
            import open_clip

            model_cfg = open_clip.get_model_config(arch["model"])
            if model_cfg is None:
                raise ConfigError(f"arch.model {arch['model']!r} is not an open_clip model config")
            size = model_cfg["vision_cfg"]["image_size"]
        else:
            size = arch.get("image_size")
        return square_image_size(size)

    def image_geometry(self, arch: Mapping) -> ImageGeometry:
        """The steps of ``open_clip.image_transform(S, is_train=False)`` before ``ToTensor``
        (bicubic resize of the shorter side to S, center crop, RGB), S = :meth:`image_size`:
        PIL image -> uint8 array (S, S, 3)."""
        return _open_clip_parts(self.image_size(arch))[0]

    def image_tensor(self, arch: Mapping) -> ImageTensor:
        """The steps of that transform from ``ToTensor`` on (to float, /255, normalise with the
        OpenAI CLIP mean/std) as an exact lookup table: uint8 (B, S, S, 3) -> float (B, 3, S, S)."""
        return _open_clip_parts(self.image_size(arch))[1]

    def zero_shot_model(self, arch: Mapping, raw: Mapping[str, torch.Tensor],
                        tokenizer_spec: Mapping | None = None, *,
                        source: str = "checkpoint") -> tuple[torch.nn.Module, Any]:
        """The open_clip ``CLIP`` of ``arch["model"]`` (``quick_gelu`` as in ``arch``) with ``raw``
        loaded strictly, and ``open_clip.get_tokenizer(arch["model"])``; ``tokenizer_spec`` is
        not used (open_clip's config names its tokenizer)."""
        import open_clip

        arch = require_arch_mapping(arch)
        if "model" not in arch:
            raise ConfigError("config field arch: zero-shot heads with open_clip_vit need 'model' "
                              "(an open_clip config with a text tower, e.g. ViT-B-32)")
        try:
            model = open_clip.create_model(arch["model"], pretrained=None,
                                           force_quick_gelu=bool(arch.get("quick_gelu", False)))
        except RuntimeError as exc:
            raise ConfigError(f"{self.name}: arch field 'model': {exc}") from exc
        tokenizer = open_clip.get_tokenizer(arch["model"])
        load_zero_shot_state(model, raw, source)
        return model, tokenizer


# the text tower open_clip needs to build a CLIP around an explicit (tiny) image tower; unused
_TINY_TEXT_CFG = {"context_length": 8, "vocab_size": 16, "width": 8, "heads": 1, "layers": 1}


def open_clip_config(arch: Mapping) -> dict | None:
    """An open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``) whose image
    tower is the explicit ``arch`` (fields of :meth:`OpenClipViTAdapter.build`); None for a
    named arch (``{"model": ...}``: open_clip ships its config)."""
    if "model" in arch:
        return None
    width, heads = int(arch["width"]), int(arch["heads"])
    return {"embed_dim": int(arch["output_dim"]), "quick_gelu": bool(arch.get("quick_gelu", False)),
            "vision_cfg": {"image_size": int(arch["image_size"]), "patch_size": int(arch["patch_size"]),
                           "width": width, "layers": int(arch["layers"]), "head_width": width // heads,
                           "mlp_ratio": float(arch["mlp_ratio"])},
            "text_cfg": dict(_TINY_TEXT_CFG)}


class _PILSteps:
    """open_clip's transform steps before ``ToTensor``, returning the uint8 array that
    ``ToTensor`` would read (``np.array`` of the RGB PIL image)."""

    def __init__(self, steps):
        self.steps = steps

    def __call__(self, image) -> np.ndarray:
        out = self.steps(image)
        if getattr(out, "mode", None) != "RGB":
            raise ValueError(f"open_clip's geometric steps gave {out!r}, expected an RGB PIL image")
        return np.array(out, dtype=np.uint8)


@cache
def _open_clip_parts(size: int) -> tuple[ImageGeometry, ImageTensor]:
    """(geometry, tensor) parts of ``open_clip.image_transform(size, is_train=False)`` with the
    OpenAI CLIP mean/std, split at its ``ToTensor`` step."""
    import open_clip
    import PIL.Image
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from torchvision.transforms import Compose, ToTensor

    transform = open_clip.image_transform(size, is_train=False, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD)
    steps = list(transform.transforms)
    at = next((i for i, step in enumerate(steps) if isinstance(step, ToTensor)), None)
    if at is None:
        raise RuntimeError(f"open_clip.image_transform has no ToTensor step to split at: {transform}")
    tensor_steps = Compose(steps[at:])
    table = ImageTensor.from_reference(lambda array: tensor_steps(PIL.Image.fromarray(array)),
                                       "open_clip image_transform")
    return _PILSteps(Compose(steps[:at])), table
