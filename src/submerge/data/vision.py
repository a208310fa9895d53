"""Evaluation data of the real vision suites: Hugging Face datasets, the model's own
preprocessing, and the expert's classification head.

Config of one expert (``suite_cfg["experts"][expert]``), the ``dataset`` block::

    dataset:
      kind: image              # optional ("text" selects submerge.data.language)
      hub: tanganke/mnist      # Hugging Face dataset id; loaded with
                               #   datasets.load_dataset(hub, config_name, split=..., revision=...)
      config_name: null        # optional dataset configuration (e.g. "cropped_digits" for SVHN)
      revision: null           # optional revision (commit, tag, branch) of the hub dataset
      path: /data/mnist        # instead of hub: a DatasetDict saved with save_to_disk (load_from_disk)
      train_split: train       # the split the validation examples are drawn from
      test_split: test         # the official test split
      val_split: null          # optional: a named split used as validation instead of a part of train
      val_fraction: 0.1        # validation = int(val_fraction * len(train)) examples, at most val_max,
      val_max: 5000            #   the last ones of torch.randperm(len(train), seed=val_seed),
      val_seed: 0              #   i.e. torch random_split([train, val], manual_seed(val_seed))
      image_key: image         # column holding the images (PIL images or HxW[xC] uint8 arrays)
      label_key: label         # column holding the integer (or boolean) labels
      classes: mnist           # an entry of vision_tasks.json (case/punctuation-insensitive),
                               #   or an explicit list of class names in label order
      templates: null          # prompt templates ("{c}" = class name); default: the entry's;
                               #   required with an explicit class list

Exactly one of ``hub`` and ``path``; ``classes`` and ``templates`` are only needed to build
a zero-shot head (:func:`prompts`) and to check the head's size. Suite level: ``adapter``
(``open_clip_vit`` or ``hf_clip_vision``), ``arch`` as the adapter takes it (the input size
is read from it), optional ``num_workers`` (DataLoader workers, default 0).

Splits follow tall_masks / FusionBench: "val" = 10% of train (at most 5000, seed 0),
"test" = the official test split. The head is read from ``{root}/heads/{expert}.safetensors``.

Prepared evaluation data (``rule eval_data``, :mod:`submerge.stages.evaldata`): the evaluated
examples of one split (the ``max_examples`` subset already applied), decoded and put through
the geometric part of the preprocessing once (:func:`prepare_split`), stored as safetensors
``images`` (uint8 N×S×S×3) and ``labels`` (int64 N) with a JSON sidecar (:func:`save_prepared`).
A :class:`VisionTask` given such a file (``prepared={split: path}`` or :meth:`VisionTask.
use_prepared`) reads it instead of the dataset and applies only the tensor part (an exact
lookup table): the same accuracies, bit for bit, as decoding the dataset.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from pathlib import Path

import numpy as np
import torch

from submerge.data.heads import head_logits, load_head
from submerge.errors import CheckpointError, ConfigError
from submerge.models import ImageTensor, get_adapter

log = logging.getLogger(__name__)

VISION_TASKS_FILE = Path(__file__).with_name("vision_tasks.json")

# Keys of a dataset block shared by vision and text datasets, with their defaults.
SOURCE_DEFAULTS = {
    "hub": None, "config_name": None, "revision": None, "path": None,
    "train_split": "train", "test_split": "test", "val_split": None,
    "val_fraction": 0.1, "val_max": 5000, "val_seed": 0,
}
VISION_DEFAULTS = {**SOURCE_DEFAULTS, "kind": "image", "image_key": "image", "label_key": "label",
                   "classes": None, "templates": None}
SPLITS = ("val", "test")


# ----------------------------------------------------------------------------- splits

def val_split_indices(n: int, fraction: float = 0.1, max_size: int | None = 5000,
                      seed: int = 0) -> tuple[list[int], list[int]]:
    """(train part, validation part) indices of a train split of ``n`` examples.

    Validation size ``min(int(n * fraction), max_size)``; the order is
    ``torch.randperm(n, generator=manual_seed(seed))``, train part first, exactly like
    ``torch.utils.data.random_split(train, [n - n_val, n_val], generator)`` in tall_masks
    (``split_train_into_train_val``) and FusionBench (``train_validation_split``).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {fraction}")
    n_val = int(n * fraction)
    if max_size is not None:
        n_val = min(n_val, int(max_size))
    if n_val < 1 or n - n_val < 1:
        raise ValueError(f"a train split of {n} examples leaves no validation or no train part "
                         f"(val_fraction={fraction}, val_max={max_size})")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    return perm[: n - n_val], perm[n - n_val:]


def subset_indices(n: int, max_examples: int | None, seed: int = 0) -> list[int]:
    """Indices of the examples evaluated: all ``n`` in order, or, when ``max_examples < n``,
    the first ``max_examples`` of ``torch.randperm(n, seed)`` (the same on every call; a
    random subset, because many datasets are sorted by label)."""
    if max_examples is None or max_examples >= n:
        return list(range(n))
    if max_examples < 1:
        raise ValueError(f"max_examples must be positive, got {max_examples}")
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: int(max_examples)].tolist()


def parse_dataset_cfg(entry: Mapping, expert: str, defaults: Mapping) -> dict:
    """The ``dataset`` block of an expert entry with defaults filled in; ConfigError on bad keys."""
    if not isinstance(entry, Mapping) or not isinstance(entry.get("dataset"), Mapping):
        raise ConfigError(f"expert {expert!r}: needs a 'dataset' mapping")
    dcfg = dict(entry["dataset"])
    unknown = sorted(set(dcfg) - set(defaults))
    if unknown:
        raise ConfigError(f"expert {expert!r}: unknown dataset field(s) {unknown}; known: {sorted(defaults)}")
    if (dcfg.get("hub") is None) == (dcfg.get("path") is None):
        raise ConfigError(f"expert {expert!r}: dataset needs exactly one of 'hub' and 'path'")
    return {**defaults, **dcfg}


def _source(dcfg: Mapping) -> str:
    return f"dataset.path {dcfg['path']}" if dcfg.get("path") else f"hub dataset {dcfg['hub']!r}"


def load_named_split(dcfg: Mapping, field: str, *, expert: str):
    """The split named by ``dcfg[field]`` (e.g. ``test_split``) from disk or the hub."""
    import datasets

    name = dcfg[field]
    if dcfg.get("path"):
        path = Path(dcfg["path"])
        if not path.exists():
            raise ConfigError(f"expert {expert!r}: dataset.path {path} does not exist")
        data = datasets.load_from_disk(str(path))
        if not isinstance(data, datasets.DatasetDict):
            raise ConfigError(f"expert {expert!r}: dataset.path {path} holds a single Dataset, "
                              f"not a DatasetDict of named splits")
        if name not in data:
            raise ConfigError(f"expert {expert!r}: dataset.{field} = {name!r} is not a split of "
                              f"{path} (splits: {sorted(data)})")
        return data[name]
    try:
        return datasets.load_dataset(dcfg["hub"], dcfg.get("config_name"), split=name, revision=dcfg.get("revision"))
    except ValueError as e:  # datasets raises ValueError('Unknown split ...')
        raise ConfigError(f"expert {expert!r}: dataset.{field} = {name!r} could not be loaded from "
                          f"{_source(dcfg)}: {e}") from e


def open_split(dcfg: Mapping, split: str, *, expert: str):
    """The evaluation split ``split`` ("val" or "test") of a parsed dataset block."""
    if split == "test":
        return load_named_split(dcfg, "test_split", expert=expert)
    if split == "val":
        if dcfg.get("val_split"):
            return load_named_split(dcfg, "val_split", expert=expert)
        train = load_named_split(dcfg, "train_split", expert=expert)
        _, val = val_split_indices(len(train), dcfg["val_fraction"], dcfg["val_max"], dcfg["val_seed"])
        return train.select(val)
    raise ValueError(f"expert {expert!r}: unknown split {split!r}; expected one of {SPLITS}")


def require_columns(ds, dcfg: Mapping, fields: Sequence[str], *, expert: str, split: str) -> None:
    """ConfigError naming the field when a configured column is missing from ``ds``."""
    for field in fields:
        column = dcfg[field]
        if column not in ds.column_names:
            raise ConfigError(f"expert {expert!r}: dataset.{field} = {column!r} is not a column of the "
                              f"{split!r} split of {_source(dcfg)} (columns: {ds.column_names})")


# ----------------------------------------------------------------------------- class names, prompts

def _norm_key(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.lower())


@cache
def vision_tasks() -> dict:
    """The ``tasks`` table of vision_tasks.json (class names + templates of the 20 vision tasks)."""
    return json.loads(VISION_TASKS_FILE.read_text(encoding="utf-8"))["tasks"]


def vision_task_entry(name: str) -> dict:
    """The vision_tasks.json entry for ``name`` (key or alias; case and punctuation ignored)."""
    key = _norm_key(name)
    for k, entry in vision_tasks().items():
        if key == k or key in (_norm_key(a) for a in entry.get("aliases", ())):
            return entry
    raise ConfigError(f"classes {name!r} is not an entry of {VISION_TASKS_FILE} "
                      f"(entries: {sorted(vision_tasks())})")


def prompts(dcfg: Mapping, expert: str) -> tuple[list[str], list[str]]:
    """(class names, templates) of a parsed vision dataset block, for a zero-shot head."""
    classes, templates = dcfg.get("classes"), dcfg.get("templates")
    if classes is None:
        raise ConfigError(f"expert {expert!r}: dataset.classes is not set")
    if isinstance(classes, str):
        try:
            entry = vision_task_entry(classes)
        except ConfigError as e:
            raise ConfigError(f"expert {expert!r}: dataset.{e}") from None
        classes, templates = entry["classnames"], templates or entry["templates"]
    elif templates is None:
        raise ConfigError(f"expert {expert!r}: dataset.templates is required with an explicit class list")
    if not all(isinstance(c, str) for c in classes) or not classes:
        raise ConfigError(f"expert {expert!r}: dataset.classes must be a non-empty list of strings")
    if not templates or not all(isinstance(t, str) and "{c}" in t for t in templates):
        raise ConfigError(f"expert {expert!r}: dataset.templates must be strings containing {{c}}")
    return list(classes), list(templates)


# ----------------------------------------------------------------------------- preprocessing

def image_transform(suite_cfg: Mapping) -> Callable:
    """The evaluation preprocessing of the suite's model: PIL image -> float tensor (3, S, S).

    The suite's adapter owns it (:meth:`submerge.models.Adapter.image_transform`): open_clip:
    ``open_clip.image_transform(S, is_train=False)`` with OpenAI CLIP mean/std (bicubic resize
    of the shorter side, center crop); transformers CLIP: a ``CLIPImageProcessor`` for S (same
    steps, same constants). S = the tower's input size: ``arch.image_size``, the open_clip
    config of ``arch.model``, or the CLIPVisionConfig of ``arch``. ConfigError for an adapter
    without image preprocessing.
    """
    return get_adapter(suite_cfg.get("adapter")).image_transform(suite_cfg.get("arch"))


def image_geometry(suite_cfg: Mapping) -> Callable:
    """The geometric part of :func:`image_transform` (resize, center crop, RGB): PIL image ->
    uint8 array (S, S, 3) (:meth:`submerge.models.Adapter.image_geometry`)."""
    return get_adapter(suite_cfg.get("adapter")).image_geometry(suite_cfg.get("arch"))


def image_tensor(suite_cfg: Mapping) -> ImageTensor:
    """The tensor part of :func:`image_transform`: uint8 (B, S, S, 3) -> float (B, 3, S, S),
    on the images' device (:meth:`submerge.models.Adapter.image_tensor`)."""
    return get_adapter(suite_cfg.get("adapter")).image_tensor(suite_cfg.get("arch"))


def to_pil(image):
    """A PIL RGB image from a PIL image or an HxW / HxWxC uint8 array."""
    import PIL.Image

    if not isinstance(image, PIL.Image.Image):
        image = PIL.Image.fromarray(np.asarray(image, dtype=np.uint8))
    return image.convert("RGB")


class _ImageRows(torch.utils.data.Dataset):
    def __init__(self, ds, image_key: str, label_key: str, transform: Callable):
        self.ds, self.image_key, self.label_key, self.transform = ds, image_key, label_key, transform

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        row = self.ds[i]
        return self.transform(to_pil(row[self.image_key])), int(row[self.label_key])


# ----------------------------------------------------------------------------- prepared data

PREPARED_RULE = "eval_data"
_VERIFIED: dict[tuple[str, int, int], str] = {}   # (file, size, mtime_ns) -> sha256 checked in this process


def _effective_max(max_examples: int | None, n_split: int) -> int | None:
    """``max_examples`` as :func:`subset_indices` uses it: None when it keeps the whole split."""
    return None if max_examples is None or max_examples >= n_split else int(max_examples)


def _redo(path: Path) -> str:
    return f"delete {path} and rerun (rule {PREPARED_RULE})"


def _as_json(obj):
    return json.loads(json.dumps(obj))


def prepare_split(suite_cfg: Mapping, expert: str, split: str, max_examples: int | None = None,
                  *, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``(images, labels, meta)`` of the examples of ``split`` that :meth:`VisionTask.accuracy`
    evaluates with ``max_examples``: images (uint8 N×S×S×3, the geometric part of the
    preprocessing applied), labels (int64 N), in evaluation order; ``meta`` is what
    :func:`save_prepared` writes to the sidecar."""
    task = VisionTask(suite_cfg, expert, root=".")
    ds = task.split(split)
    n_split = len(ds)
    if max_examples is not None:
        ds = ds.select(subset_indices(n_split, max_examples))
    n = len(ds)
    if n == 0:
        raise ConfigError(f"expert {expert!r}: the {split!r} split is empty")
    size = get_adapter(suite_cfg.get("adapter")).image_size(suite_cfg.get("arch"))
    images = torch.empty((n, size, size, 3), dtype=torch.uint8)
    labels = torch.empty((n,), dtype=torch.int64)
    loader = torch.utils.data.DataLoader(
        _ImageRows(ds, task.cfg["image_key"], task.cfg["label_key"], image_geometry(suite_cfg)),
        batch_size=batch_size, shuffle=False, num_workers=task.num_workers,
    )
    start = 0
    for batch, batch_labels in loader:
        if batch.dtype != torch.uint8 or tuple(batch.shape[1:]) != (size, size, 3):
            raise RuntimeError(f"the geometric preprocessing gave {batch.dtype} {tuple(batch.shape[1:])}, "
                               f"expected uint8 {(size, size, 3)}")
        images[start:start + len(batch)] = batch
        labels[start:start + len(batch)] = batch_labels
        start += len(batch)
    meta = {"format": 1, "expert": expert, "split": split, "n": n, "n_split": n_split,
            "max_examples": _effective_max(max_examples, n_split), **task.prepared_identity()}
    log.info("%s/%s: %d of %d examples prepared (%dx%d)", expert, split, n, n_split, size, size)
    return images, labels, meta


def save_prepared(path: str | Path, images: torch.Tensor, labels: torch.Tensor, meta: Mapping) -> None:
    """Write prepared evaluation data atomically: safetensors ``images`` + ``labels`` and the
    JSON sidecar ``path.with_suffix(".json")`` (``meta`` + the file's sha256)."""
    from submerge.io.checkpoints import save_normalized

    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"prepared images must be uint8 (N, S, S, 3), got {images.dtype} {tuple(images.shape)}")
    if labels.dtype != torch.int64 or tuple(labels.shape) != (images.shape[0],) or meta.get("n") != len(labels):
        raise ValueError(f"prepared labels must be int64 ({images.shape[0]},) and meta n = {images.shape[0]}")
    save_normalized({"images": images.contiguous(), "labels": labels.contiguous()}, path, dict(meta))


def read_prepared_meta(path: str | Path) -> dict:
    """The sidecar of a prepared file; CheckpointError naming the file when it cannot be read."""
    path = Path(path)
    sidecar = path.with_suffix(".json")
    if not path.is_file():
        raise CheckpointError(f"prepared evaluation data {path} does not exist (rule {PREPARED_RULE})")
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"prepared evaluation data {path}: cannot read its sidecar {sidecar} ({exc}): "
                              f"{_redo(path)}") from exc
    missing = [k for k in ("expert", "split", "n", "n_split", "max_examples", "dataset", "adapter",
                           "image_size", "sha256") if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise CheckpointError(f"prepared evaluation data {path}: sidecar {sidecar} lacks {missing}: {_redo(path)}")
    return meta


class PreparedSplit:
    """One prepared file, checked (sidecar, sha256 once per process, tensor shapes), read in
    batches from a memory map."""

    def __init__(self, path: str | Path, meta: Mapping | None = None):
        from safetensors import SafetensorError, safe_open

        from submerge.io.checkpoints import verify_sha256

        self.path = path = Path(path)
        self.meta = dict(meta) if meta is not None else read_prepared_meta(path)
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if _VERIFIED.get(key) != self.meta["sha256"]:
            try:
                verify_sha256(path, self.meta["sha256"])
            except CheckpointError as exc:
                raise CheckpointError(f"prepared evaluation data {path}: {exc} (the file is truncated or "
                                      f"corrupt): {_redo(path)}") from exc
            _VERIFIED[key] = self.meta["sha256"]
        self.n = int(self.meta["n"])
        try:
            with safe_open(str(path), framework="pt") as f:
                shapes = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"prepared evaluation data {path}: cannot read it ({exc}): {_redo(path)}") from exc
        size = int(self.meta["image_size"])
        want = {"images": ("U8", (self.n, size, size, 3)), "labels": ("I64", (self.n,))}
        if shapes != want:
            raise CheckpointError(f"prepared evaluation data {path}: holds {shapes}, its sidecar says {want}: "
                                  f"{_redo(path)}")

    def batches(self, batch_size: int):
        """``(uint8 images (B, S, S, 3), int64 labels (B,))`` in order, ``batch_size`` at a time."""
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            images, labels = f.get_slice("images"), f.get_tensor("labels")
            for start in range(0, self.n, batch_size):
                stop = min(start + batch_size, self.n)
                yield images[start:stop], labels[start:stop]


# ----------------------------------------------------------------------------- the task

class VisionTask:
    """Accuracy of an image encoder + the expert's head on a Hugging Face image dataset."""

    def __init__(self, suite_cfg: Mapping, expert: str, *, root: str | Path,
                 prepared: Mapping[str, str | Path] | None = None):
        experts = suite_cfg.get("experts") or {}
        if expert not in experts:
            raise ConfigError(f"expert {expert!r} is not in the suite's experts")
        self.name = expert
        self.root = Path(root)
        self.cfg = parse_dataset_cfg(experts[expert], expert, VISION_DEFAULTS)
        if self.cfg["kind"] != "image":
            raise ConfigError(f"expert {expert!r}: dataset.kind must be 'image' for a vision task, "
                              f"got {self.cfg['kind']!r}")
        self.adapter_name = suite_cfg.get("adapter")
        self.image_size = get_adapter(self.adapter_name).image_size(suite_cfg.get("arch"))
        self.transform = image_transform(suite_cfg)
        self.tensor = image_tensor(suite_cfg)
        self.num_workers = int(suite_cfg.get("num_workers", 0))
        self._splits: dict[str, object] = {}
        self._prepared: dict[str, tuple[Path, dict]] = {}
        self._opened: dict[str, PreparedSplit] = {}
        for split, path in (prepared or {}).items():
            self.use_prepared(split, path)

    def prepared_identity(self) -> dict:
        """What a prepared file of this task must have been made with (besides split and
        max_examples): the dataset block, the adapter and the input size."""
        return {"dataset": _as_json(self.cfg), "adapter": self.adapter_name, "image_size": self.image_size}

    def use_prepared(self, split: str, path: str | Path) -> None:
        """Evaluate ``split`` from the prepared file ``path`` (rule eval_data) instead of the
        dataset; CheckpointError when the file was made for another expert, split, dataset or
        preprocessing (``max_examples`` is checked by :meth:`accuracy`)."""
        if split not in SPLITS:
            raise ValueError(f"expert {self.name!r}: unknown split {split!r}; expected one of {SPLITS}")
        path = Path(path)
        meta = read_prepared_meta(path)
        made = {"expert": meta["expert"], "split": meta["split"], "dataset": meta["dataset"],
                "adapter": meta["adapter"], "image_size": meta["image_size"]}
        want = {"expert": self.name, "split": split, **self.prepared_identity()}
        if made != want:
            diff = sorted(k for k in want if made[k] != want[k])
            raise CheckpointError(f"prepared evaluation data {path} was made for another {', '.join(diff)} "
                                  f"({[made[k] for k in diff]}, this task: {[want[k] for k in diff]}): "
                                  f"{_redo(path)}")
        self._prepared[split] = (path, meta)
        self._opened.pop(split, None)

    def _prepared_split(self, split: str, max_examples: int | None) -> PreparedSplit | None:
        if split not in self._prepared:
            return None
        path, meta = self._prepared[split]
        if _effective_max(max_examples, meta["n_split"]) != meta["max_examples"]:
            raise ConfigError(f"expert {self.name!r}: evaluating {split!r} with max_examples={max_examples}, "
                              f"but the prepared file {path} holds max_examples={meta['max_examples']} "
                              f"(of {meta['n_split']}): the eval_data rule and the evaluation disagree")
        if split not in self._opened:
            self._opened[split] = PreparedSplit(path, meta)
        return self._opened[split]

    def split(self, split: str):
        """The Hugging Face dataset of ``split`` ("val" or "test"), columns checked, cached."""
        if split not in self._splits:
            ds = open_split(self.cfg, split, expert=self.name)
            require_columns(ds, self.cfg, ("image_key", "label_key"), expert=self.name, split=split)
            self._splits[split] = ds
        return self._splits[split]

    def head(self):
        """(weight, bias, meta) of the expert's head, checked against ``dataset.classes``."""
        weight, bias, meta = load_head(self.root, self.name)
        if self.cfg.get("classes") is not None:
            classes, _ = prompts(self.cfg, self.name)
            if len(classes) != weight.shape[0]:
                raise CheckpointError(f"expert {self.name!r}: head {self.root / 'heads' / self.name}.safetensors "
                                      f"has {weight.shape[0]} classes, dataset.classes has {len(classes)}")
        return weight, bias, meta

    @torch.no_grad()
    def accuracy(self, adapter, module, split: str, *, device="cpu", batch_size: int = 256,
                 max_examples: int | None = None) -> float:
        """Top-1 accuracy in [0, 1] of ``adapter.encode(module, images)`` + head on ``split``.

        ``max_examples`` evaluates a seeded random subset (:func:`subset_indices`). A split
        with a prepared file (:meth:`use_prepared`) is read from it, in the same batches, with
        the same input tensors; the dataset is not opened.
        """
        prepared = self._prepared_split(split, max_examples)
        if prepared is not None:
            n, source = prepared.n, f" (prepared {prepared.path})"
            loader = prepared.batches(batch_size)

            def inputs(images):
                return self.tensor(images.to(device))
        else:
            ds = self.split(split)
            if max_examples is not None:
                ds = ds.select(subset_indices(len(ds), max_examples))
            n, source = len(ds), ""
            if n == 0:
                raise ConfigError(f"expert {self.name!r}: the {split!r} split is empty")
            loader = torch.utils.data.DataLoader(
                _ImageRows(ds, self.cfg["image_key"], self.cfg["label_key"], self.transform),
                batch_size=batch_size, shuffle=False, num_workers=self.num_workers,
            )

            def inputs(images):
                return images.to(device)
        weight, bias, meta = self.head()
        weight = weight.to(device=device, dtype=torch.float32)
        bias = None if bias is None else bias.to(device=device, dtype=torch.float32)
        n_classes = weight.shape[0]
        was_training = module.training
        module.eval()
        correct = 0
        try:
            for images, labels in loader:
                if labels.min() < 0 or labels.max() >= n_classes:
                    raise ConfigError(f"expert {self.name!r}: dataset.label_key {self.cfg['label_key']!r} has "
                                      f"labels outside [0, {n_classes}) (the head's classes)")
                features = adapter.encode(module, inputs(images)).float()
                if features.shape[-1] != weight.shape[1]:
                    raise CheckpointError(
                        f"expert {self.name!r}: the encoder gives {features.shape[-1]}-d features, the head "
                        f"{self.root / 'heads' / self.name}.safetensors expects {weight.shape[1]}-d ones "
                        f"(a zero-shot head lives in CLIP's projected embedding space)")
                pred = head_logits(features, weight, bias, meta).argmax(dim=-1).cpu()
                correct += int((pred == labels).sum())
        finally:
            module.train(was_training)
        acc = correct / n
        log.info("%s/%s: accuracy %.4f on %d examples%s", self.name, split, acc, n, source)
        return acc
