"""Merged models written in their source's own format, with a model card.

:func:`write_export` writes one merged model into a directory, atomically (a temporary
directory renamed into place), with a provenance sidecar (``README.md.json``):

* ``open_clip_vit``: ``open_clip_visual.safetensors``, the tower's state dict that
  ``open_clip.create_model(<arch>).visual.load_state_dict`` takes strictly (for an explicit
  tiny architecture, ``open_clip_config.json`` names it for ``open_clip.add_model_config``);
* ``hf_clip_vision`` / ``hf_t5``: a ``save_pretrained`` directory (``config.json``,
  safetensors) that ``CLIPVisionModelWithProjection`` / ``T5ForConditionalGeneration``
  ``.from_pretrained`` loads;
* ``head_<expert>.safetensors``: the experts' classification heads, where the suite has them;
* ``README.md``: the model card (method, α, β, the experts with their sha256, accuracies).

The adapters (:meth:`submerge.models.Adapter.save_model`) own the formats; this module owns
the directory, the card and the provenance. Used by the pipeline's ``export`` rule
(:mod:`submerge.stages.export`) and by ``submerge merge`` (:mod:`submerge.cli`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

log = logging.getLogger(__name__)

PathLike = str | os.PathLike
CARD = "README.md"
OPEN_CLIP_CONFIG = "open_clip_config.json"
# the text tower open_clip needs to build a CLIP around an explicit (tiny) image tower; unused
_TINY_TEXT_CFG = {"context_length": 8, "vocab_size": 16, "width": 8, "heads": 1, "layers": 1}


@dataclass
class ModelCard:
    """What the model card says. ``experts``: name -> sha256 of its checkpoint;
    ``accuracy``: split -> {task: accuracy} (empty outside the pipeline)."""

    title: str
    method: Any  # recipe.Method
    alpha: float
    beta: float | None
    experts: Mapping[str, str]
    base_sha256: str | None = None
    accuracy: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    chosen: str = ""  # how α/β were chosen
    extra: Mapping[str, Any] = field(default_factory=dict)


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


def load_snippet(adapter: str, arch: Mapping) -> str:
    """Python lines that load the exported model with its upstream library."""
    if adapter == "open_clip_vit":
        if "model" in arch:
            name = arch["model"]
            gelu = ", force_quick_gelu=True" if arch.get("quick_gelu") else ""
            first = "import open_clip, safetensors.torch"
        else:
            name, gelu = Path(OPEN_CLIP_CONFIG).stem, ""
            first = (f"import open_clip, safetensors.torch; "
                     f"open_clip.add_model_config(\"{OPEN_CLIP_CONFIG}\")")
        return (f"{first}\n"
                f"model = open_clip.create_model(\"{name}\"{gelu})\n"
                f"model.visual.load_state_dict(safetensors.torch.load_file(\"open_clip_visual.safetensors\"))")
    cls = {"hf_clip_vision": "CLIPVisionModelWithProjection",
           "hf_t5": "T5ForConditionalGeneration"}.get(adapter, "AutoModel")
    return f"from transformers import {cls}\nmodel = {cls}.from_pretrained(\"<this directory>\")"


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:g}"


def render_card(card: ModelCard, adapter: str, arch: Mapping, heads: bool = False) -> str:
    """The model card (Markdown with a YAML header) of an exported model (``heads``: the
    experts' heads lie beside it)."""
    method = card.method
    library = "open_clip" if adapter == "open_clip_vit" else "transformers"
    hyper = ", ".join(f"{k}={v}" for k, v in dict(method.hyper).items()) or "none"
    lines = ["---", f"library_name: {library}", "tags: [model-merging, submerge, subspace-boosting]",
             "---", "", f"# {card.title}", "",
             "A merged model written by [submerge](https://arxiv.org/abs/2506.16506) "
             "(Subspace-Boosted Model Merging): θ = θ_base + α · Δ_merge, Δ_merge the "
             f"merged task vector of {len(card.experts)} experts.", "",
             "| setting | value |", "|---|---|",
             f"| method | {method.label or method.name} (`{method.merge}`; hyperparameters: {hyper}) |",
             f"| LiNeS | {json.dumps(method.lines.to_params()) if method.lines else 'no'} |",
             f"| Subspace Boosting | {json.dumps(method.boost.to_params()) if method.boost else 'no'} |",
             f"| α | {_fmt(card.alpha)} |", f"| β | {_fmt(card.beta)} |"]
    if method.boost is not None and card.beta is not None:
        betas = method.boost.betas(card.beta)
        lines.append(f"| β per layer kind | attn {_fmt(betas['attn'])}, mlp {_fmt(betas['mlp'])} |")
    if card.chosen:
        lines.append(f"| α, β chosen | {card.chosen} |")
    for key, value in card.extra.items():
        lines.append(f"| {key} | {value} |")
    if card.base_sha256:
        lines.append(f"| base sha256 | `{card.base_sha256}` |")
    splits = [s for s in ("val", "test") if card.accuracy.get(s)]
    lines += ["", "## Experts", "",
              "| expert | sha256 |" + "".join(f" {s} accuracy |" for s in splits),
              "|---|---|" + "--:|" * len(splits)]
    for name, digest in card.experts.items():
        accs = "".join(f" {100 * card.accuracy[s][name]:.2f} |" if name in card.accuracy[s] else " — |"
                       for s in splits)
        lines.append(f"| {name} | `{digest}` |{accs}")
    if splits:
        means = ", ".join(f"{s} {100 * sum(card.accuracy[s].values()) / len(card.accuracy[s]):.2f} %"
                          for s in splits)
        lines += ["", f"Mean accuracy over the experts' tasks: {means}."]
    lines += ["", "## Loading", "", "```python", load_snippet(adapter, arch), "```", ""]
    if heads:
        lines += ["`head_<expert>.safetensors` (where present): each task's classification head "
                  "(`weight`, optional `bias`) on the image features, and `head_<expert>.json` "
                  "(whether features are normalised, the logit scale, the class names).", ""]
    return "\n".join(lines)


def write_export(adapter, module, arch: Mapping, out_dir: PathLike, card: ModelCard, *,
                 heads: Mapping[str, PathLike] | None = None,
                 inputs: Sequence[PathLike] = ()) -> Path:
    """Write ``module`` (the merged tower, built by ``adapter``) into ``out_dir`` in its
    source's format with ``heads`` (expert -> head file) beside it, the model card and a
    provenance sidecar naming ``inputs``; atomically (the directory appears complete or not
    at all). Returns ``out_dir``."""
    from submerge.io.atomic import atomic_dir, write_text_atomic
    from submerge.stages.common import record_provenance

    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        files = [Path(p) for p in adapter.save_model(module, tmp)]
        if adapter.name == "open_clip_vit":
            config = open_clip_config(arch)
            if config is not None:
                write_text_atomic(tmp / OPEN_CLIP_CONFIG, json.dumps(config, indent=2) + "\n")
                files.append(tmp / OPEN_CLIP_CONFIG)
        for expert, head in (heads or {}).items():
            target = tmp / f"head_{expert}.safetensors"
            shutil.copyfile(head, target)
            files.append(target)
            meta = Path(head).with_suffix(".json")  # normalize, logit_scale, classes
            if meta.is_file():
                shutil.copyfile(meta, target.with_suffix(".json"))
                files.append(target.with_suffix(".json"))
        write_text_atomic(tmp / CARD, render_card(card, adapter.name, arch, heads=bool(heads)))
        top = [f for f in files if f.parent == tmp]
        record_provenance([tmp / CARD, *top], list(inputs))
    log.info("exported %s (%s) to %s", card.title, adapter.name, out)
    return out
