"""Model adapters: the only place that knows architectures.

An adapter maps each *normalised tower key* (the tower module's own ``state_dict()`` key)
to a :class:`~submerge.layers.LayerInfo`, strips checkpoint wrappers down to the tower,
builds the tower with random init, and runs it. One adapter per architecture family:

* ``open_clip_vit``  -- open_clip CLIP image encoders (:mod:`submerge.models.open_clip_vit`)
* ``hf_clip_vision`` -- transformers ``CLIPVisionModel`` (:mod:`submerge.models.hf_clip`)
* ``hf_t5``          -- transformers ``T5ForConditionalGeneration`` (:mod:`submerge.models.hf_t5`)

Adapters are imported lazily, so using one does not import the others' libraries.
"""

from __future__ import annotations

import importlib
import re
from typing import Iterable, Mapping

import torch

from submerge.errors import CheckpointError, ConfigError
from submerge.layers import LayerInfo


StateDict = dict[str, torch.Tensor]

# name -> (module, class); imported on first use.
_ADAPTERS: dict[str, tuple[str, str]] = {
    "open_clip_vit": ("submerge.models.open_clip_vit", "OpenClipViTAdapter"),
    "hf_clip_vision": ("submerge.models.hf_clip", "HFCLIPVisionAdapter"),
    "hf_t5": ("submerge.models.hf_t5", "HFT5Adapter"),
}


class Adapter:
    """Base class. Subclasses set ``name`` and ``rules`` and implement the architecture parts.

    ``rules`` is a sequence of ``(regex, kind, stacked)``; the first regex that fully
    matches a key decides its :class:`LayerInfo`, and a named group ``block`` gives the
    block index (``None`` when the regex has none).
    """

    name: str = ""
    rules: tuple[tuple[re.Pattern[str], str, int], ...] = ()

    def layer_info(self, key: str) -> LayerInfo:
        """Block, kind and stacking of one normalised key; CheckpointError for a foreign key."""
        for pattern, kind, stacked in self.rules:
            m = pattern.fullmatch(key)
            if m is not None:
                block = m.groupdict().get("block")
                return LayerInfo(None if block is None else int(block), kind, stacked)
        raise CheckpointError(
            f"adapter {self.name!r}: unexpected key {key!r} (not a parameter of this architecture)"
        )

    def layer_infos(self, state_dict: Iterable[str] | Mapping[str, torch.Tensor]) -> dict[str, LayerInfo]:
        """``layer_info`` of every key of ``state_dict`` (a mapping or an iterable of keys)."""
        return {key: self.layer_info(key) for key in state_dict}

    def build(self, arch: dict) -> torch.nn.Module:
        raise NotImplementedError

    def tower_state_dict(self, raw: Mapping[str, torch.Tensor]) -> StateDict:
        raise NotImplementedError

    def encode(self, module: torch.nn.Module, inputs) -> torch.Tensor:
        raise NotImplementedError

    def complete_from_base(self, expert_sd: Mapping[str, torch.Tensor],
                           base_sd: Mapping[str, torch.Tensor]) -> StateDict:
        """Fill keys an expert checkpoint does not carry but the tower has (the expert never
        changed them) from the base. Default: nothing is missing by construction."""
        return dict(expert_sd)

    def required_keys(self, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
        """Keys a complete tower must have, given the block count seen in ``state_dict``."""
        raise NotImplementedError

    def check_tower(self, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
        """CheckpointError unless every key is known and no required key is missing."""
        if not state_dict:
            raise CheckpointError(f"adapter {self.name!r}: {source} has no tensors")
        for key, value in state_dict.items():
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"adapter {self.name!r}: {source} entry {key!r} is not a tensor")
            self.layer_info(key)
        missing = [key for key in self.required_keys(state_dict) if key not in state_dict]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(
                f"adapter {self.name!r}: {source} is missing key {missing[0]!r}{more}; "
                "it is not a complete tower of this architecture"
            )


def block_count(keys: Iterable[str], pattern: str) -> int:
    """1 + the largest ``(\\d+)`` captured by ``pattern`` (searched in each key), 0 if none."""
    regex = re.compile(pattern)
    found = [int(m.group(1)) for key in keys if (m := regex.search(key)) is not None]
    return max(found) + 1 if found else 0


def strip_prefix(raw: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    """Entries of ``raw`` under ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}


def check_arch_fields(arch: Mapping, allowed: Iterable[str], required: Iterable[str], what: str) -> None:
    """ConfigError naming the first unknown or missing field of an ``arch`` mapping."""
    allowed = set(allowed)
    for field in arch:
        if field not in allowed:
            raise ConfigError(f"{what}: unknown arch field {field!r}; known: {sorted(allowed)}")
    for field in required:
        if field not in arch:
            raise ConfigError(f"{what}: arch field {field!r} is required")


def get_adapter(name: str) -> Adapter:
    """The adapter registered under ``name``; ConfigError listing the known ones otherwise."""
    if name not in _ADAPTERS:
        raise ConfigError(f"unknown model adapter {name!r}; known adapters: {sorted(_ADAPTERS)}")
    module_name, class_name = _ADAPTERS[name]
    return getattr(importlib.import_module(module_name), class_name)()


__all__ = ["Adapter", "StateDict", "get_adapter"]
