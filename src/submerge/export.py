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


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:g}"


def render_card(card: ModelCard, adapter, arch: Mapping, heads: bool = False) -> str:
    """The model card (Markdown with a YAML header) of an exported model (``heads``: the
    experts' heads lie beside it); ``adapter`` names the library and how to load it."""
    method = card.method
    library = adapter.library
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
    lines += ["", "## Loading", "", "```python", adapter.load_snippet(arch), "```", ""]
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
    from submerge.report.provenance import write_sidecar

    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        files = [Path(p) for p in adapter.save_model(module, tmp, arch)]
        for expert, head in (heads or {}).items():
            target = tmp / f"head_{expert}.safetensors"
            shutil.copyfile(head, target)
            files.append(target)
            meta = Path(head).with_suffix(".json")  # normalize, logit_scale, classes
            if meta.is_file():
                shutil.copyfile(meta, target.with_suffix(".json"))
                files.append(target.with_suffix(".json"))
        write_text_atomic(tmp / CARD, render_card(card, adapter, arch, heads=bool(heads)))
        top = [f for f in files if f.parent == tmp]
        write_sidecar([tmp / CARD, *top], inputs=list(inputs))  # as stages.common.record_provenance
    log.info("exported %s (%s) to %s", card.title, adapter.name, out)
    return out
