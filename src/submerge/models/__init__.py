"""Model adapters: the only place that knows architectures.

An adapter maps each *normalised tower key* (the tower module's own ``state_dict()`` key)
to a :class:`~submerge.layers.LayerInfo`, strips checkpoint wrappers down to the tower,
builds the tower with random init, and runs it. One adapter per architecture family:

* ``open_clip_vit``  -- open_clip CLIP image encoders (:mod:`submerge.models.open_clip_vit`)
* ``hf_clip_vision`` -- transformers ``CLIPVisionModel`` (:mod:`submerge.models.hf_clip`)
* ``hf_t5``          -- transformers ``T5ForConditionalGeneration`` (:mod:`submerge.models.hf_t5`)

Besides the tower itself, an adapter owns everything else that depends on the
architecture, so that no code outside this package compares adapter names:

* :meth:`Adapter.image_size` / :meth:`Adapter.image_transform` -- the evaluation image
  preprocessing of the CLIP towers (:mod:`submerge.data.vision` calls them), split into its
  geometric part :meth:`Adapter.image_geometry` (PIL image -> uint8 S×S×3 array, what
  ``rule eval_data`` stores) and its tensor part :meth:`Adapter.image_tensor` (uint8 batch ->
  normalised float batch, an exact per-channel lookup table, :class:`ImageTensor`);
* :meth:`Adapter.zero_shot_model` -- the full CLIP (image and text tower) and its tokenizer
  that :func:`submerge.data.heads.zero_shot_head` needs;
* :meth:`Adapter.score_choices` / :meth:`Adapter.generate` -- how a seq2seq language model
  scores answer choices and generates answers (:mod:`submerge.data.language` calls them).

The base class raises :class:`~submerge.errors.ConfigError` for what an architecture does
not have (a T5 has no image preprocessing, a CLIP tower scores no text answers).

Adapters are imported lazily, so using one does not import the others' libraries.
"""

from __future__ import annotations

import importlib
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from submerge.errors import CheckpointError, ConfigError
from submerge.layers import LayerInfo


StateDict = dict[str, torch.Tensor]
ImageTransform = Callable[[Any], torch.Tensor]   # PIL RGB image -> float tensor (3, S, S)
ImageGeometry = Callable[[Any], np.ndarray]      # PIL RGB image -> uint8 array (S, S, 3)


class ImageTensor:
    """The tensor part of an image preprocessing (to float, rescale, normalise): uint8 images
    ``(B, H, W, 3)`` -> float32 ``(B, 3, H, W)``, contiguous, on the images' device.

    Every output value depends only on its channel and its uint8 input value, so the whole
    part is a lookup table of 3 × 256 floats, filled by running the library's own tensor
    steps on the 256 values of each channel (:meth:`from_reference`): the values are bit for
    bit those of the library's steps, on any device (a lookup is a copy).
    """

    def __init__(self, lut: torch.Tensor):
        lut = torch.as_tensor(lut)
        if lut.shape != (3, 256) or lut.dtype != torch.float32:
            raise ValueError(f"ImageTensor needs a float32 (3, 256) lookup table, got {lut.dtype} {tuple(lut.shape)}")
        self.lut = lut.contiguous()
        self._on: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def from_reference(cls, steps: Callable[[np.ndarray], torch.Tensor], what: str) -> "ImageTensor":
        """The table of ``steps`` (uint8 ``(H, W, 3)`` array -> float ``(3, H, W)``, e.g. a
        library's ToTensor + Normalize), checked on a random image: a ``steps`` whose values do
        not depend on the channel and the input value alone raises RuntimeError."""
        row = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # (1, 256, 3)
        out = steps(row)
        if out.dtype != torch.float32 or tuple(out.shape) != (3, 1, 256):
            raise RuntimeError(f"{what}: the tensor steps give {out.dtype} {tuple(out.shape)} for a "
                               "(1, 256, 3) uint8 image, expected float32 (3, 1, 256)")
        table = cls(out.reshape(3, 256))
        probe = np.random.RandomState(0).randint(0, 256, (7, 5, 3)).astype(np.uint8)
        if not torch.equal(table(torch.from_numpy(probe)[None])[0], steps(probe)):
            raise RuntimeError(f"{what}: the tensor steps are not a per-channel function of the uint8 "
                               "values; their output cannot be precomputed from uint8 images")
        return table

    def __getstate__(self):  # DataLoader workers: no per-device copies
        return {"lut": self.lut}

    def __setstate__(self, state):
        self.__init__(state["lut"])

    def __call__(self, images) -> torch.Tensor:
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"ImageTensor takes uint8 (B, H, W, 3) images, got {images.dtype} "
                             f"{tuple(images.shape)}")
        device = images.device
        if device not in self._on:
            self._on[device] = self.lut.to(device)
        lut = self._on[device]
        b, h, w, _ = images.shape
        out = torch.empty((b, 3, h, w), dtype=torch.float32, device=device)
        for c in range(3):
            out[:, c] = lut[c][images[..., c].to(torch.int32)]
        return out


class ComposedImageTransform:
    """``tensor(geometry(image))`` for one image: PIL image -> float tensor (3, S, S)."""

    def __init__(self, geometry: ImageGeometry, tensor: ImageTensor):
        self.geometry, self.tensor = geometry, tensor

    def __call__(self, image) -> torch.Tensor:
        return self.tensor(torch.from_numpy(self.geometry(image))[None])[0]

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

    # ------------------------------------------------------------------ export (source format)

    # the upstream library (its import name) that builds, runs and loads the models: named in
    # exported models' cards; the warm worker of local runs (submerge.worker) preloads it
    library: str = ""

    def save_model(self, module: torch.nn.Module, out_dir, arch: Mapping) -> list:
        """Write ``module`` (a tower :meth:`build` made from ``arch``, merged weights loaded)
        into the existing directory ``out_dir`` in the source library's own format, the
        inverse of :meth:`tower_state_dict`; return the paths written. Callers make it atomic
        (:func:`submerge.io.atomic.atomic_dir`)."""
        raise NotImplementedError(f"adapter {self.name!r} cannot export models")

    def load_snippet(self, arch: Mapping) -> str:
        """Python lines that load what :meth:`save_model` wrote, with the upstream library."""
        raise NotImplementedError(f"adapter {self.name!r} cannot export models")

    # ------------------------------------------------------------------ images (CLIP towers)

    def image_size(self, arch: Mapping) -> int:
        """The input resolution S (square) of the tower ``arch`` builds; ConfigError if none."""
        raise ConfigError(f"adapter {self.name!r} has no image preprocessing; "
                          "expected open_clip_vit or hf_clip_vision")

    def image_geometry(self, arch: Mapping) -> ImageGeometry:
        """The geometric part of the evaluation preprocessing (resize, crop, RGB): PIL RGB
        image -> uint8 array (S, S, 3)."""
        raise ConfigError(f"adapter {self.name!r} has no image preprocessing; "
                          "expected open_clip_vit or hf_clip_vision")

    def image_tensor(self, arch: Mapping) -> ImageTensor:
        """The tensor part of the evaluation preprocessing: uint8 (B, S, S, 3) -> float
        (B, 3, S, S), exactly the library's steps after :meth:`image_geometry`."""
        raise ConfigError(f"adapter {self.name!r} has no image preprocessing; "
                          "expected open_clip_vit or hf_clip_vision")

    def image_transform(self, arch: Mapping) -> ImageTransform:
        """The evaluation preprocessing of the tower: PIL RGB image -> float tensor (3, S, S);
        :meth:`image_tensor` after :meth:`image_geometry`, bit for bit the library's own
        transform."""
        return ComposedImageTransform(self.image_geometry(arch), self.image_tensor(arch))

    # ------------------------------------------------------------------ zero-shot heads (CLIP)

    def zero_shot_model(self, arch: Mapping, raw: Mapping[str, torch.Tensor],
                        tokenizer_spec: Mapping | None = None, *,
                        source: str = "checkpoint") -> tuple[torch.nn.Module, Any]:
        """``(full CLIP model, tokenizer)`` for :func:`submerge.data.heads.zero_shot_head`.

        ``arch`` is the suite's ``arch``; ``raw`` the full CLIP checkpoint (image and text
        tower), loaded **strictly** (CheckpointError naming ``source`` otherwise: a missing
        text tower must not be left randomly initialised); ``tokenizer_spec`` the suite's
        ``tokenizer`` (``{path: dir}`` or ``{hub: id, revision: ...}``) where the adapter
        needs one. The model is returned on the CPU, in whatever mode it was built.
        """
        raise ConfigError(f"config field adapter: zero-shot heads need a CLIP adapter, not {self.name!r}")

    # ------------------------------------------------------------------ text (seq2seq LMs)

    def score_choices(self, module: torch.nn.Module, tokenizer, inputs: Sequence[str],
                      choices: Sequence[Sequence[str]], *, device="cpu",
                      scoring: str = "sum") -> list[torch.Tensor]:
        """Per input, a float32 tensor with the score of each of its answer choices."""
        raise ConfigError(f"adapter {self.name!r} cannot score text answers; text tasks need a "
                          "seq2seq language model adapter (hf_t5)")

    def generate(self, module: torch.nn.Module, tokenizer, inputs: Sequence[str], *, device="cpu",
                 max_new_tokens: int = 64) -> list[str]:
        """Greedy answers to ``inputs``, decoded without special tokens and stripped."""
        raise ConfigError(f"adapter {self.name!r} cannot generate text answers; text tasks need a "
                          "seq2seq language model adapter (hf_t5)")


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


def square_image_size(size) -> int:
    """``size`` (an int, or a square ``[S, S]``) as one positive int; ConfigError otherwise."""
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ConfigError(f"arch image_size must be square, got {size}")
        size = size[0]
    if not isinstance(size, int) or size < 1:
        raise ConfigError(f"arch needs 'image_size' (or 'model' for open_clip), got {size!r}")
    return size


def require_arch_mapping(arch) -> Mapping:
    """``arch`` itself when it is a mapping; ConfigError otherwise."""
    if not isinstance(arch, Mapping):
        raise ConfigError(f"suite needs an 'arch' mapping, got {arch!r}")
    return arch


def load_tokenizer(spec: Mapping | None):
    """``transformers.AutoTokenizer.from_pretrained`` of ``{path: dir}`` or ``{hub: id, revision: ...}``."""
    from pathlib import Path

    from transformers import AutoTokenizer

    if not isinstance(spec, Mapping) or (spec.get("path") is None) == (spec.get("hub") is None):
        raise ConfigError(f"suite 'tokenizer' needs exactly one of 'path' and 'hub', got {spec!r}")
    if spec.get("path") is not None:
        path = Path(spec["path"])
        if not path.is_dir():
            raise ConfigError(f"tokenizer.path {path} is not a directory")
        return AutoTokenizer.from_pretrained(str(path))
    return AutoTokenizer.from_pretrained(spec["hub"], revision=spec.get("revision"))


def load_zero_shot_state(model: torch.nn.Module, raw: Mapping[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(raw)`` strictly; CheckpointError naming ``source`` on a mismatch."""
    try:  # strict: a missing text tower must not leave a randomly initialised one behind
        model.load_state_dict(raw)
    except RuntimeError as exc:
        raise CheckpointError(
            f"zeroshot_model {source}: not a full CLIP checkpoint of config field arch "
            f"(hf_clip_vision: a vision-only arch gets transformers' default text tower; otherwise give "
            f"a CLIPConfig dict with text_config, vision_config and projection_dim): {exc}") from exc


# Hugging Face config.json model_type -> adapter (`submerge merge` reading an HF checkpoint)
_HF_MODEL_TYPES = {"t5": "hf_t5", "clip": "hf_clip_vision", "clip_vision_model": "hf_clip_vision"}


def adapter_for_hf_config(config: Mapping) -> str | None:
    """The adapter of a Hugging Face ``config.json`` (by its ``model_type``), None if none fits."""
    return _HF_MODEL_TYPES.get(config.get("model_type"))


class TransformersAdapter(Adapter):
    """An adapter whose models are transformers models of class ``model_class``: exported with
    ``save_pretrained`` (config.json, safetensors shards), which ``from_pretrained`` loads."""

    library = "transformers"
    model_class = ""  # e.g. "T5ForConditionalGeneration"

    def save_model(self, module: torch.nn.Module, out_dir, arch: Mapping) -> list:
        """``module.save_pretrained(out_dir)``; the files written."""
        from pathlib import Path

        out = Path(out_dir)
        before = set(out.rglob("*"))
        module.save_pretrained(str(out))
        return sorted(p for p in out.rglob("*") if p.is_file() and p not in before)

    def load_snippet(self, arch: Mapping) -> str:
        return (f"from transformers import {self.model_class}\n"
                f"model = {self.model_class}.from_pretrained(\"<this directory>\")")


def get_adapter(name: str) -> Adapter:
    """The adapter registered under ``name``; ConfigError listing the known ones otherwise."""
    if name not in _ADAPTERS:
        raise ConfigError(f"unknown model adapter {name!r}; known adapters: {sorted(_ADAPTERS)}")
    module_name, class_name = _ADAPTERS[name]
    return getattr(importlib.import_module(module_name), class_name)()


__all__ = ["Adapter", "adapter_for_hf_config", "ComposedImageTransform", "ImageGeometry", "ImageTensor", "ImageTransform", "StateDict",
           "TransformersAdapter", "get_adapter", "load_tokenizer"]
