"""Classification heads for the merged vision encoders.

A head is a weight matrix ``W`` (C×d), an optional bias ``b`` (C) and a small meta dict
``{"normalize": bool, "logit_scale": float, "classes": list[str] | None}``; logits are
``logit_scale · normalize?(features) @ Wᵀ + b`` (see docs/contracts.md, ``submerge.data``).
Heads live at ``results/{suite}/heads/{expert}.safetensors`` with a JSON sidecar.

Two sources:

* :func:`zero_shot_head` builds CLIP's zero-shot classifier from the text tower of an
  open_clip ``CLIP`` or a transformers ``CLIPModel``, exactly as the references do
  (tall_masks ``src/models/heads.py::build_classification_head``, FusionBench
  ``HFCLIPClassifier.set_classification_task``): per class, the text embeddings of all
  templates are L2-normalised, averaged and renormalised. The rows of ``W`` stay unit-norm
  and ``exp(logit_scale)`` of the model goes to the meta (tall_masks folds it into ``W``;
  the logits are the same).
* :func:`head_from_module` takes a head shipped with the checkpoints (tall_masks /
  task_vectors ``ClassificationHead``: a ``torch.nn.Linear`` with a ``normalize`` flag, or
  its state dict); its logit scale is already folded into the weights, so it gets 1.0.

Head files: :func:`head_path` (where), :func:`save_head` (write), :func:`load_head` (read,
checked) and :func:`head_logits` (apply) are the only code that touches them; the
evaluation tasks (:mod:`submerge.data.vision`, :mod:`submerge.suites.digits`) use these.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from submerge.errors import CheckpointError
from submerge.io.atomic import sha256_file, write_text_atomic
from submerge.io.checkpoints import save_safetensors, sidecar_digest

log = logging.getLogger(__name__)

PLACEHOLDER = "{c}"


def render_template(template: str, classname: str) -> str:
    """One prompt: ``template`` with ``{c}`` replaced by ``classname`` (no other formatting)."""
    if PLACEHOLDER not in template:
        raise ValueError(f"template {template!r} has no {PLACEHOLDER} placeholder for the class name")
    return template.replace(PLACEHOLDER, classname)


def _text_features(clip_model, tokenizer, texts: list[str], device) -> torch.Tensor:
    """Unnormalised text embeddings of ``texts`` from an open_clip CLIP or a transformers CLIPModel."""
    if hasattr(clip_model, "get_text_features"):  # transformers CLIPModel
        tokens = tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(device)
        out = clip_model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        # transformers >= 5 returns a BaseModelOutputWithPooling with the projected embeddings
        # in pooler_output; older versions return the tensor itself.
        return out if isinstance(out, torch.Tensor) else out.pooler_output
    if hasattr(clip_model, "encode_text"):  # open_clip CLIP / CustomTextCLIP
        return clip_model.encode_text(tokenizer(texts).to(device))
    raise TypeError(
        f"zero_shot_head needs an open_clip CLIP (encode_text) or a transformers CLIPModel "
        f"(get_text_features), got {type(clip_model).__name__}"
    )


@torch.no_grad()
def zero_shot_head(
    clip_model,
    tokenizer,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, dict]:
    """CLIP's zero-shot classifier: one unit-norm row per class (float32, on CPU) and its meta.

    ``tokenizer``: for open_clip a callable ``texts -> LongTensor`` (``open_clip.get_tokenizer``);
    for transformers a tokenizer called as ``tokenizer(texts, padding=True, return_tensors="pt")``.
    ``templates`` are strings with ``{c}`` for the class name. The model is used in eval mode
    and put back in its previous mode afterwards. Returns ``(weight (C×d), meta)`` with
    ``meta = {"normalize": True, "logit_scale": exp(model.logit_scale), "classes": [...]}``.
    """
    if not classnames:
        raise ValueError("zero_shot_head: no class names")
    if not templates:
        raise ValueError("zero_shot_head: no templates")
    for t in templates:
        render_template(t, "")  # validates every template before any work
    was_training = clip_model.training
    clip_model.eval()
    try:
        rows = []
        for name in classnames:
            emb = _text_features(clip_model, tokenizer, [render_template(t, name) for t in templates], device)
            emb = emb.float()
            emb = emb / emb.norm(dim=-1, keepdim=True)
            mean = emb.mean(dim=0)
            rows.append(mean / mean.norm())
        weight = torch.stack(rows).cpu()
        logit_scale = float(clip_model.logit_scale.float().exp())
    finally:
        clip_model.train(was_training)
    meta = {"normalize": True, "logit_scale": logit_scale, "classes": list(classnames)}
    log.info("zero-shot head: %d classes, %d templates, dim %d", len(classnames), len(templates), weight.shape[1])
    return weight, meta


def head_from_module(
    obj, *, classes: Sequence[str] | None = None, normalize: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """(weight, bias, meta) of a shipped head: a ``ClassificationHead``-like module (attributes
    ``weight``, ``bias``, ``normalize``) or its state dict (``weight``, optional ``bias``,
    optional ``normalize``).

    A state dict carries no ``normalize`` flag; it then defaults to True, as every
    tall_masks / task_vectors head normalises. ``normalize`` overrides either source.
    Logit scale is 1.0 (those heads fold it into the weights). Raises ``CheckpointError``
    naming the field when the weight or bias is unusable.
    """
    if isinstance(obj, Mapping):
        if "weight" not in obj:
            raise CheckpointError(f"head state dict has no 'weight' (keys: {sorted(obj)})")
        weight, bias, flag = obj["weight"], obj.get("bias"), obj.get("normalize", True)
    elif hasattr(obj, "weight"):
        weight, bias, flag = obj.weight, getattr(obj, "bias", None), getattr(obj, "normalize", True)
    else:
        raise CheckpointError(f"head of type {type(obj).__name__} has no 'weight'")
    if normalize is not None:
        flag = normalize
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or not weight.is_floating_point():
        raise CheckpointError(f"head 'weight' must be a 2-D float tensor, got {_describe(weight)}")
    weight = weight.detach().cpu().clone()
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],) or not bias.is_floating_point():
            raise CheckpointError(
                f"head 'bias' must be a float tensor of shape ({weight.shape[0]},), got {_describe(bias)}"
            )
        bias = bias.detach().cpu().clone()
    if classes is not None and len(classes) != weight.shape[0]:
        raise CheckpointError(f"head has {weight.shape[0]} rows but {len(classes)} class names were given")
    if not torch.isfinite(weight).all() or (bias is not None and not torch.isfinite(bias).all()):
        raise CheckpointError("head 'weight' or 'bias' has NaN/Inf entries")
    meta = {"normalize": bool(flag), "logit_scale": 1.0, "classes": None if classes is None else list(classes)}
    return weight, bias, meta


def save_head(path: str | Path, weight: torch.Tensor, bias: torch.Tensor | None, meta: Mapping) -> None:
    """Write a head: ``path`` (.safetensors: ``weight``, optional ``bias``) and ``path.with_suffix('.json')``.

    Both files are written atomically, the sidecar last (it records the head's sha256 and its own). ``meta`` must hold ``normalize`` (bool) and
    ``logit_scale`` (number); ``classes`` (list of C names, or None) is stored when given,
    and any other JSON-serialisable entries are kept.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"head path {path} must end in .safetensors")
    if weight.ndim != 2:
        raise ValueError(f"head weight for {path} must be 2-D, got shape {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"head bias for {path} must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if not isinstance(meta.get("normalize"), bool):
        raise ValueError(f"head meta for {path} needs 'normalize' (bool), got {meta.get('normalize')!r}")
    if not isinstance(meta.get("logit_scale"), (int, float)) or isinstance(meta.get("logit_scale"), bool):
        raise ValueError(f"head meta for {path} needs 'logit_scale' (number), got {meta.get('logit_scale')!r}")
    classes = meta.get("classes")
    if classes is not None and len(classes) != weight.shape[0]:
        raise ValueError(f"head meta for {path} lists {len(classes)} classes for {weight.shape[0]} rows")
    tensors = {"weight": weight.detach().cpu().contiguous()}
    if bias is not None:
        tensors["bias"] = bias.detach().cpu().contiguous()
    digest = save_safetensors(tensors, path)  # the umask's file mode, like every result
    sidecar = {**dict(meta), "logit_scale": float(meta["logit_scale"]),
               "classes": None if classes is None else list(classes), "sha256": digest}
    sidecar["sidecar_sha256"] = sidecar_digest(sidecar)  # a changed digit in it is caught
    # the sidecar last, with the head's sha256: a head without its sidecar is refused on reading
    write_text_atomic(path.with_suffix(".json"), json.dumps(sidecar, indent=1, ensure_ascii=False) + "\n")


def head_path(root: str | Path, expert: str) -> Path:
    """Where the head of ``expert`` lives under a suite's results root."""
    return Path(root) / "heads" / f"{expert}.safetensors"


def load_head(root: str | Path, expert: str) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """The head of ``expert``: (weight (C, d) float32, bias (C,) float32 or None, meta).

    ``meta`` has ``normalize`` (bool), ``logit_scale`` (float) and ``classes`` (list or
    None) from the JSON sidecar. Raises :class:`CheckpointError` naming the file when the
    head or its sidecar is missing or malformed.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = head_path(root, expert)
    sidecar = path.with_suffix(".json")
    if not path.is_file():
        raise CheckpointError(f"head of expert {expert!r} not found: {path}")
    rerun = f"delete {path} and rerun (rule expert_model)"  # the head and its sidecar are its outputs
    if not sidecar.is_file():
        raise CheckpointError(f"head sidecar of expert {expert!r} not found: {sidecar}: {rerun}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read head of expert {expert!r}: {err} "
                              f"(truncated or not safetensors): {rerun}") from err
    try:
        raw = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{sidecar}: cannot read head sidecar: {err}: {rerun}") from err
    if not isinstance(raw, dict):
        raise CheckpointError(f"{sidecar}: expected a JSON object: {rerun}")
    if "sidecar_sha256" in raw and raw["sidecar_sha256"] != sidecar_digest(raw):
        raise CheckpointError(f"{sidecar}: changed after it was written (its sidecar_sha256 does "
                              f"not match): {rerun}")
    if "sha256" in raw and sha256_file(path) != raw["sha256"]:
        raise CheckpointError(f"{path}: sha256 differs from the one its sidecar recorded (the "
                              f"file changed after it was written): {rerun}")
    missing = [k for k in ("normalize", "logit_scale") if k not in raw]
    if missing:
        raise CheckpointError(f"{sidecar}: no {missing[0]!r}: {rerun}")

    weight, bias = tensors.get("weight"), tensors.get("bias")
    extra = set(tensors) - {"weight", "bias"}
    if weight is None or extra:
        raise CheckpointError(f"{path}: a head holds 'weight' and optional 'bias', "
                              f"got {sorted(tensors)}")
    if weight.ndim != 2 or not weight.is_floating_point():
        raise CheckpointError(f"{path}: 'weight' must be a 2-D float tensor, got "
                              f"{tuple(weight.shape)} {weight.dtype}")
    if bias is not None and (bias.shape != weight.shape[:1] or not bias.is_floating_point()):
        raise CheckpointError(f"{path}: 'bias' must be a float tensor of shape "
                              f"({weight.shape[0]},), got {tuple(bias.shape)} {bias.dtype}")
    normalize, scale, classes = raw.get("normalize", False), raw.get("logit_scale", 1.0), raw.get("classes")
    if not isinstance(normalize, bool):
        raise CheckpointError(f"{sidecar}: 'normalize' must be true or false, got {normalize!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise CheckpointError(f"{sidecar}: 'logit_scale' must be a finite number, got {scale!r}")
    if classes is not None and (not isinstance(classes, list) or len(classes) != weight.shape[0]):
        raise CheckpointError(f"{sidecar}: 'classes' must list the head's {weight.shape[0]} "
                              f"classes, got {classes!r:.200}")
    meta = {"normalize": normalize, "logit_scale": float(scale), "classes": classes}
    return weight.float(), (None if bias is None else bias.float()), meta


def head_logits(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                meta: Mapping) -> torch.Tensor:
    """``logit_scale · normalize?(features) @ weightᵀ + bias``, in float32 (float64 kept)."""
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    feats = features.to(dtype)
    if meta.get("normalize", False):
        feats = feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    logits = float(meta.get("logit_scale", 1.0)) * (feats @ weight.to(feats.device, dtype).T)
    if bias is not None:
        logits = logits + bias.to(feats.device, dtype)
    return logits


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__
