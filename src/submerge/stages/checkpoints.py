"""Stage 1 (``workflow/rules/checkpoints.smk``): the base and each expert, downloaded (sha256
pinned) or built (``digits``), normalised to a safetensors state dict of the merged tower + JSON
sidecar; each expert's classification head beside it."""

from __future__ import annotations

import logging

import torch

from submerge.errors import ConfigError
from submerge.recipe import Suite, is_digits
from submerge.stages.common import PathLike, load_source

log = logging.getLogger(__name__)


def build_base(suite: Suite, out: PathLike) -> None:
    """The base model's tower, normalised to safetensors + JSON sidecar."""
    from submerge.io.checkpoints import save_normalized
    from submerge.models import get_adapter

    adapter = get_adapter(suite.adapter)
    meta = {"suite": suite.name, "model": "base", "adapter": adapter.name}
    if is_digits(suite.base):
        from submerge.suites import digits

        cfg = digits.resolve_config(suite.view.get("digits"))
        sd = digits.pretrain_base(cfg)
        meta.update(source={"build": "digits"}, digits=cfg)
    else:
        raw, info = load_source(suite.base, "base")
        sd = adapter.tower_state_dict(raw)
        meta.update(info)
    meta["arch"] = suite.arch
    save_normalized(sd, out, meta)


def build_expert(suite: Suite, expert: str, base_path: PathLike, out_model: PathLike,
                 out_head: PathLike) -> None:
    """One expert's tower (normalised, checked against the base) and its classification head."""
    from submerge.data.heads import save_head
    from submerge.io.checkpoints import load_normalized, save_normalized
    from submerge.merging.task_vectors import validate_state_dicts
    from submerge.models import get_adapter

    adapter = get_adapter(suite.adapter)
    spec = suite.experts[expert]
    base_sd, _ = load_normalized(base_path)
    meta = {"suite": suite.name, "model": expert, "adapter": adapter.name}
    if is_digits(spec):
        from submerge.suites import digits

        cfg = digits.resolve_config(suite.view.get("digits"))
        head = digits.train_head(base_sd, spec["task"], cfg)
        sd, metrics = digits.finetune_expert(base_sd, head, spec["task"], cfg)
        meta.update(source={"build": "digits", "task": spec["task"]}, metrics=metrics)
        save_head(out_head, head["weight"], head.get("bias"),
                  {"normalize": False, "logit_scale": 1.0, "expert": expert,
                   "classes": list(digits.TASKS[spec["task"]].classes)})
    else:
        raw, info = load_source(spec, f"expert {expert}")
        sd = adapter.complete_from_base(adapter.tower_state_dict(raw), base_sd)
        meta.update(info)
        _build_real_head(suite, expert, out_head)
    validate_state_dicts(base_sd, {expert: sd})
    meta["arch"] = suite.arch
    save_normalized(sd, out_model, meta)


def _build_real_head(suite: Suite, expert: str, out_head: PathLike) -> None:
    """A shipped head (``head.source``) or a zero-shot head from the base's text tower."""
    from submerge.data import heads

    spec = suite.experts[expert]
    head_spec = spec.get("head")
    if spec.get("dataset", {}).get("kind") == "text":
        # text-to-text tasks are scored by the language model itself (data.language); the head
        # file only records that, so that every expert has the same outputs
        heads.save_head(out_head, torch.zeros(0, 0), None,
                        {"normalize": False, "logit_scale": 1.0, "expert": expert,
                         "kind": "text-to-text", "note": "no classification head: rank "
                         "classification / exact match with the T5 model"})
        return
    if head_spec is None:
        raise ConfigError(f"config field experts.{expert}.head: required for downloaded experts "
                          "({source: ...} or {zeroshot: true})")
    if "source" in head_spec:
        raw, info = load_source(head_spec, f"head of {expert}")
        weight, bias, meta = heads.head_from_module(raw)
        meta.update(info)
    else:
        weight, meta = zero_shot_head_for_suite(suite, expert)
        bias = None
    meta["expert"] = expert
    heads.save_head(out_head, weight, bias, meta)


def zero_shot_head_for_suite(suite: Suite, expert: str) -> tuple[torch.Tensor, dict]:
    """A zero-shot head for ``expert``'s dataset from the suite's full CLIP (``zeroshot_model``:
    image and text tower), with the class names and templates of its dataset block."""
    from submerge.data import heads, vision
    from submerge.models import get_adapter

    spec = suite.view.get("zeroshot_model")
    if spec is None:
        raise ConfigError(f"config field zeroshot_model: required for experts.{expert}.head.zeroshot "
                          "(a full CLIP checkpoint with its text tower)")
    dcfg = vision.parse_dataset_cfg(suite.experts[expert], expert, vision.VISION_DEFAULTS)
    classnames, templates = vision.prompts(dcfg, expert)
    raw, info = load_source(spec, "zero-shot CLIP")
    model, tokenizer = get_adapter(suite.adapter).zero_shot_model(
        suite.arch, raw, suite.view.get("tokenizer"), source=info["source_file"])
    weight, meta = heads.zero_shot_head(model, tokenizer, classnames, templates)
    meta.update(zeroshot_model=info)
    return weight, meta
