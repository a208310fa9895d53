"""The embedded default suite ``digits``: scikit-learn's 8×8 digits, a tiny open_clip ViT.

Everything here is small enough to build on a laptop CPU in about a minute, with no
download and no GPU, yet it has the structure of the paper's vision suites:

* **Data.** ``sklearn.datasets.load_digits`` (1797 images, 8×8, values 0..16, scaled to
  [0, 1] and replicated to 3 channels). One seeded permutation splits the images into
  disjoint ``test`` (``n_test``), ``val`` (``n_val``) and ``train`` (the rest, at most
  ``n_train``) sets, the same for every task. With the defaults: 1097 / 300 / 400.
* **Tasks.** :data:`TASKS` holds 20 tasks, in the order that :data:`GROUPS` takes
  prefixes of (n4, n8, n14, n20). Label maps on upright digits: ``parity`` (d mod 2),
  ``ge5`` (d ≥ 5), ``mod3``, ``mod4``, ``prime`` (d ∈ {2, 3, 5, 7}), ``digit`` (d itself).
  Input transforms, 10-way digit labels: ``rot90``/``rot180``/``rot270`` (counter-
  clockwise), ``flip_lr``, ``flip_ud``, ``transpose``, ``invert`` (1 − x), ``blur``
  (3×3 binomial kernel, zero padding), ``shift`` (2 px down and right, zero fill),
  ``crop`` (centre 6×6 resized to 8×8, bilinear), ``pixelate`` (2×2 means), ``occlude``
  (bottom three rows blanked), ``noise`` (+ N(0, 0.3²), clipped to [0, 1]) and
  ``permute`` (one fixed pixel permutation). The two random transforms draw once over the
  whole data set from a generator seeded by the suite seed and the task, so an image
  looks the same in every call and every split.
* **Model.** open_clip's own ``VisionTransformer`` with a tiny config, so the state-dict
  keys are those of the real CLIP ViTs (``transformer.resblocks.0.attn.in_proj_weight``, …)
  and the ``open_clip_vit`` adapter serves both.
* **Training.** :func:`pretrain_base` trains the base as a 10-way digit classifier on
  upright digits for one epoch by default (a deliberately short, generic pretraining);
  :func:`train_head` fits a linear probe per task on the frozen base (the analogue of the
  paper's frozen zero-shot heads); :func:`finetune_expert` finetunes the whole encoder on
  one task through its frozen head. Every function is deterministic given ``cfg["seed"]``.

``cfg`` is always the suite config's ``digits:`` block; :func:`resolve_config` merges it
over :data:`DEFAULTS` and rejects unknown keys with a :class:`ConfigError` naming them.
:data:`GRID` is the (α, β) grid the suite is tuned for; bench/digits.md has its numbers.
Those, :data:`TASK_NAMES` and :data:`GROUPS` live in the torch-free
:mod:`submerge.suites.digits_config` (what the config layer needs) and are re-exported here.
Training runs on the CPU, on one torch thread (see :func:`_one_thread`).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from submerge.data.heads import head_logits, load_head
from submerge.errors import CheckpointError, ConfigError
from submerge.models import get_adapter
from submerge.suites.digits_config import DEFAULTS, GRID, GROUPS, N_IMAGES, TASK_NAMES, resolve_config

__all__ = ["DEFAULTS", "GRID", "GROUPS", "N_IMAGES", "TASK_NAMES", "TASKS", "DigitsTask", "finetune_expert",
           "load_split", "pretrain_base", "resolve_config", "split_indices", "train_head"]

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

# --------------------------------------------------------------------------- data

_N_IMAGES = N_IMAGES


@functools.lru_cache(maxsize=1)
def _dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as (N, 8, 8) float32 in [0, 1] and (N,) int64 labels 0..9."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32) / 16.0
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    if images.shape != (_N_IMAGES, 8, 8):
        raise RuntimeError(f"unexpected sklearn digits shape {tuple(images.shape)}")
    return images, labels


def split_indices(cfg: Mapping | None = None) -> dict[str, torch.Tensor]:
    """Disjoint image indices of the ``train``/``val``/``test`` splits (one seeded permutation)."""
    cfg = resolve_config(cfg)
    perm = torch.randperm(_N_IMAGES, generator=torch.Generator().manual_seed(cfg["seed"]))
    n_test, n_val = cfg["n_test"], cfg["n_val"]
    train = perm[n_test + n_val:]
    if cfg["n_train"] is not None:
        train = train[: cfg["n_train"]]
    return {"test": perm[:n_test], "val": perm[n_test:n_test + n_val], "train": train}


# Transforms map (N, 8, 8) images in [0, 1] to (N, 8, 8) images; `gen` is seeded per
# (suite seed, task) and used for one draw over the whole data set.
def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        x[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def _blur(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([1.0, 2.0, 1.0])
    kernel = (k[:, None] * k[None, :] / 16.0).to(x.dtype)[None, None]
    return F.conv2d(x[:, None], kernel, padding=1)[:, 0]


def _crop(x: torch.Tensor) -> torch.Tensor:
    """Centre 6×6 crop, resized back to 8×8 (bilinear): a zoom-in."""
    return F.interpolate(x[:, None, 1:7, 1:7], size=(8, 8), mode="bilinear",
                         align_corners=False)[:, 0].clamp(0.0, 1.0)


def _pixelate(x: torch.Tensor) -> torch.Tensor:
    """2×2 average pooling, upsampled back to 8×8 (nearest)."""
    return F.interpolate(F.avg_pool2d(x[:, None], 2), scale_factor=2, mode="nearest")[:, 0]


def _noise(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return (x + 0.3 * torch.randn(x.shape, generator=gen, dtype=x.dtype)).clamp(0.0, 1.0)


def _permute(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    perm = torch.randperm(64, generator=gen)
    return x.reshape(len(x), 64)[:, perm].reshape(x.shape)


def _occlude(x: torch.Tensor) -> torch.Tensor:
    """The bottom three rows blanked."""
    out = x.clone()
    out[:, 5:] = 0.0
    return out


_DIGITS = tuple(str(d) for d in range(10))
_PRIMES = torch.tensor([0, 0, 1, 1, 0, 1, 0, 1, 0, 0])


@dataclass(frozen=True)
class DigitsTask:
    """One digits task: a label map and/or an input transform; an :class:`EvalTask` once bound.

    ``TASKS[key]`` is unbound (``cfg``/``root`` are ``None``); :meth:`bind` attaches the
    suite config and results root (heads at ``root/heads/{name}.safetensors``), as
    :func:`submerge.data.load_eval_task` does.
    """

    key: str
    classes: tuple[str, ...]
    labels: Callable[[torch.Tensor], torch.Tensor] = lambda d: d
    transform: Callable[..., torch.Tensor] | None = None   # (x) or (x, gen) if random
    random: bool = False
    name: str = ""
    cfg: Mapping | None = field(default=None, compare=False, repr=False)
    root: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.key)

    @property
    def head_meta(self) -> dict:
        """Sidecar of this task's head (a plain linear probe: no normalisation, scale 1)."""
        return {"normalize": False, "logit_scale": 1.0, "classes": list(self.classes)}

    def bind(self, cfg: Mapping | None, root: str | Path, name: str | None = None) -> "DigitsTask":
        """This task evaluated under the ``digits:`` block ``cfg``, heads under ``root``."""
        return replace(self, cfg=resolve_config(cfg), root=Path(root), name=name or self.key)

    def inputs(self, split: str, max_examples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The split's images and labels; ``max_examples``: the first n of a seeded permutation."""
        images, labels = load_split(self.key, split, self.cfg)
        if max_examples is not None and max_examples < len(labels):
            if max_examples < 1:
                raise ValueError(f"max_examples must be positive, got {max_examples}")
            seed = resolve_config(self.cfg)["seed"]
            keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
            keep = keep[:max_examples]
            images, labels = images[keep], labels[keep]
        return images, labels

    def accuracy(self, adapter, module, split: str, *, device="cpu", batch_size: int = 256,
                 max_examples: int | None = None) -> float:
        """Top-1 accuracy of ``adapter.encode(module, ·)`` + this task's frozen head on ``split``."""
        if self.root is None:
            raise ValueError(f"digits task {self.key!r} is not bound to a results root; "
                             f"use TASKS[{self.key!r}].bind(cfg, root)")
        weight, bias, meta = load_head(self.root, self.name)
        if weight.shape[0] != len(self.classes):
            raise ValueError(f"head of {self.name!r} has {weight.shape[0]} classes, "
                             f"task {self.key!r} has {len(self.classes)}")
        images, labels = self.inputs(split, max_examples)
        device = torch.device(device)
        weight = weight.to(device)
        bias = None if bias is None else bias.to(device)
        correct = 0
        with torch.no_grad():
            for start in range(0, len(labels), batch_size):
                feats = adapter.encode(module, images[start:start + batch_size].to(device))
                pred = head_logits(feats, weight, bias, meta).argmax(dim=-1).cpu()
                correct += int((pred == labels[start:start + batch_size]).sum())
        return correct / len(labels)


def _task(key, classes=_DIGITS, labels=lambda d: d, transform=None, random=False) -> DigitsTask:
    return DigitsTask(key=key, classes=tuple(classes), labels=labels, transform=transform,
                      random=random)


# The task order: every group is a prefix of it (like the paper's 8 / 14 / 20 tasks).
TASKS: dict[str, DigitsTask] = {t.key: t for t in [
    _task("rot90", transform=lambda x: torch.rot90(x, 1, dims=(-2, -1))),
    _task("parity", ("even", "odd"), labels=lambda d: d % 2),
    _task("invert", transform=lambda x: 1.0 - x),
    _task("flip_lr", transform=lambda x: torch.flip(x, dims=(-1,))),
    _task("blur", transform=_blur),
    _task("mod3", ("0", "1", "2"), labels=lambda d: d % 3),
    _task("permute", transform=_permute, random=True),
    _task("shift", transform=lambda x: _shift(x, 2, 2)),
    _task("rot180", transform=lambda x: torch.rot90(x, 2, dims=(-2, -1))),
    _task("ge5", ("<5", ">=5"), labels=lambda d: (d >= 5).long()),
    _task("noise", transform=_noise, random=True),
    _task("transpose", transform=lambda x: x.transpose(-2, -1)),
    _task("crop", transform=_crop),
    _task("prime", ("not prime", "prime"), labels=lambda d: _PRIMES[d]),
    _task("rot270", transform=lambda x: torch.rot90(x, 3, dims=(-2, -1))),
    _task("flip_ud", transform=lambda x: torch.flip(x, dims=(-2,))),
    _task("digit"),
    _task("mod4", ("0", "1", "2", "3"), labels=lambda d: d % 4),
    _task("pixelate", transform=_pixelate),
    _task("occlude", transform=_occlude),
]}
_ORDER = list(TASKS)
if _ORDER != list(TASK_NAMES):  # the config layer knows the tasks from digits_config alone
    raise AssertionError(f"digits_config.TASK_NAMES {TASK_NAMES} must list TASKS {_ORDER} in order")


def _get_task(task: str) -> DigitsTask:
    if task not in TASKS:
        raise ConfigError(f"unknown digits task {task!r} (known: {', '.join(TASKS)})")
    return TASKS[task]


@functools.lru_cache(maxsize=256)
def _split_cached(task: str, split: str, seed: int, n_val: int, n_test: int,
                  n_train: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    spec = TASKS[task]
    cfg = {"seed": seed, "n_val": n_val, "n_test": n_test, "n_train": n_train}
    idx = split_indices(cfg)[split]
    images, digits = _dataset()
    if spec.transform is None:
        x = images
    elif spec.random:
        gen = torch.Generator().manual_seed(seed * 1000 + _ORDER.index(task) + 1)
        x = spec.transform(images, gen)
    else:
        x = spec.transform(images)
    x = x[idx].unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    y = spec.labels(digits)[idx].to(torch.int64)
    return x, y


def load_split(task: str, split: str, cfg: Mapping | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, 8, 8) float32 in [0, 1] and labels (N,) int64 of ``task``'s ``split``."""
    _get_task(task)
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    cfg = resolve_config(cfg)
    x, y = _split_cached(task, split, cfg["seed"], cfg["n_val"], cfg["n_test"], cfg["n_train"])
    return x.clone(), y.clone()


# --------------------------------------------------------------------------- model and training

def _tower(arch: Mapping, state_dict: Mapping[str, torch.Tensor] | None = None,
           seed: int = 0) -> torch.nn.Module:
    """A tower initialised from ``seed`` (without touching the global RNG), optionally loaded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = get_adapter("open_clip_vit").build(dict(arch))
    if state_dict is not None:
        try:
            module.load_state_dict(state_dict)
        except RuntimeError as err:
            raise CheckpointError(f"digits: state dict does not fit the tower {dict(arch)}: {err}") from err
    return module


def _state_dict(module: torch.nn.Module) -> StateDict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _task_seed(cfg: Mapping, task: str) -> int:
    return cfg["seed"] * 1000 + 100 + _ORDER.index(task)


def _one_thread(fn: Callable) -> Callable:
    """Run ``fn`` on one torch CPU thread (the caller's setting is restored afterwards).

    Float results depend on the thread count; pinning it makes the suite bitwise
    reproducible whatever the caller (or Snakemake's ``--cores``) sets, and for these tiny
    matrices one thread is as fast as two and far faster on a busy shared CPU.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return wrapper


def _fit(module: torch.nn.Module, head: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *,
         params: list, epochs: int, lr: float, cfg: Mapping, seed: int) -> dict:
    """Minibatch AdamW on the cross-entropy of ``head(module(x))``, updating ``params``."""
    module.train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg["weight_decay"])
    gen = torch.Generator().manual_seed(seed)
    bs = cfg["batch_size"]
    steps, loss = 0, torch.tensor(float("nan"))
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), bs):
            idx = order[start:start + bs]
            loss = F.cross_entropy(head(module(x[idx])), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
    module.eval()
    return {"steps": steps, "final_loss": float(loss.detach())}


def _accuracy(module: torch.nn.Module, head: torch.nn.Module, x: torch.Tensor,
              y: torch.Tensor) -> float:
    module.eval()
    with torch.no_grad():
        return float((head(module(x)).argmax(-1) == y).float().mean())


@_one_thread
def pretrain_base(cfg: Mapping | None = None) -> StateDict:
    """The base tower: a short 10-way pretraining on upright digits (the ``digit`` task)."""
    cfg = resolve_config(cfg)
    start = time.perf_counter()
    module = _tower(cfg["arch"], seed=cfg["seed"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["seed"] + 1)
        head = torch.nn.Linear(cfg["arch"]["output_dim"], 10)
    x, y = load_split("digit", "train", cfg)
    params = [*module.parameters(), *head.parameters()]
    stats = _fit(module, head, x, y, params=params, epochs=cfg["base_epochs"], lr=cfg["base_lr"],
                 cfg=cfg, seed=cfg["seed"] + 2)
    xv, yv = load_split("digit", "val", cfg)
    log.info("digits base: %d steps, loss %.3f, val accuracy %.3f (%.1f s)", stats["steps"],
             stats["final_loss"], _accuracy(module, head, xv, yv), time.perf_counter() - start)
    return _state_dict(module)


def _linear(head_sd: Mapping[str, torch.Tensor]) -> torch.nn.Linear:
    weight = head_sd["weight"]
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in head_sd)
    with torch.no_grad():
        head.weight.copy_(weight)
        if "bias" in head_sd:
            head.bias.copy_(head_sd["bias"])
    head.requires_grad_(False)
    return head


@_one_thread
def train_head(base_sd: Mapping[str, torch.Tensor], task: str, cfg: Mapping | None = None) -> StateDict:
    """Linear probe of ``task`` on the frozen base: ``{"weight": (C, d), "bias": (C,)}``.

    Full-batch Adam (``head_steps``, ``head_lr``) on precomputed features from a zero init,
    with a small L2 penalty (1e-4·‖W‖²); it needs no randomness.
    """
    spec = _get_task(task)
    cfg = resolve_config(cfg)
    module = _tower(cfg["arch"], base_sd)
    x, y = load_split(task, "train", cfg)
    with torch.no_grad():
        module.eval()
        feats = module(x)
    n_classes, dim = len(spec.classes), feats.shape[1]
    weight = torch.zeros(n_classes, dim, requires_grad=True)
    bias = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=cfg["head_lr"])
    for _ in range(cfg["head_steps"]):
        loss = F.cross_entropy(feats @ weight.T + bias, y) + 1e-4 * weight.square().sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {"weight": weight.detach().clone(), "bias": bias.detach().clone()}


@_one_thread
def finetune_expert(base_sd: Mapping[str, torch.Tensor], head_sd: Mapping[str, torch.Tensor],
                    task: str, cfg: Mapping | None = None) -> tuple[StateDict, dict]:
    """Finetune the whole encoder on ``task`` through its frozen head; (state dict, metrics).

    Metrics: task, steps, final training loss, validation accuracy of the base and of the
    expert (both with the same frozen head), seconds.
    """
    spec = _get_task(task)
    cfg = resolve_config(cfg)
    if head_sd["weight"].shape[0] != len(spec.classes):
        raise ValueError(f"head of {task!r} has {head_sd['weight'].shape[0]} classes, "
                         f"expected {len(spec.classes)}")
    start = time.perf_counter()
    module = _tower(cfg["arch"], base_sd)
    head = _linear(head_sd)
    xv, yv = load_split(task, "val", cfg)
    base_acc = _accuracy(module, head, xv, yv)
    x, y = load_split(task, "train", cfg)
    stats = _fit(module, head, x, y, params=list(module.parameters()), epochs=cfg["expert_epochs"],
                 lr=cfg["expert_lr"], cfg=cfg, seed=_task_seed(cfg, task))
    metrics = {"task": task, **stats, "base_val_accuracy": base_acc,
               "val_accuracy": _accuracy(module, head, xv, yv),
               "seconds": round(time.perf_counter() - start, 3)}
    log.info("digits expert %s: val accuracy %.3f (base+head %.3f), %.1f s", task,
             metrics["val_accuracy"], base_acc, metrics["seconds"])
    return _state_dict(module), metrics
