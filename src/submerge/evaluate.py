"""Accuracy of one (merged) encoder on a list of evaluation tasks."""

from __future__ import annotations

import logging
import sys
from typing import Sequence

import torch
from tqdm.auto import tqdm

from submerge.errors import ConfigError

log = logging.getLogger(__name__)

_TINY = 2000   # below this many examples in all, no progress bar


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → CUDA if available, else CPU; otherwise the named device (checked)."""
    if isinstance(spec, torch.device):
        device = spec
    elif spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(spec)
        except (RuntimeError, TypeError) as err:
            raise ConfigError(f"device: not a device name: {spec!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {spec!r} requested but CUDA is not available")
    return device


def evaluate(adapter, module: torch.nn.Module, tasks: Sequence, split: str, *, device="cpu",
             batch_size: int = 256, max_examples: int | None = None) -> dict[str, float]:
    """Top-1 accuracy of ``module`` on each task of ``tasks``: ``{task.name: accuracy}``.

    The module is moved to ``device`` and run in eval mode under ``torch.no_grad``; its
    training flag is restored afterwards. ``max_examples`` caps each task at a fixed,
    seeded subset (see :class:`submerge.data.EvalTask`), so results are deterministic.
    """
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"evaluate: duplicate task names in {names}")
    if batch_size < 1:
        raise ValueError(f"evaluate: batch_size must be positive, got {batch_size}")
    device = resolve_device(device)
    module.to(device)
    was_training = module.training
    module.eval()
    tiny = max_examples is not None and max_examples * len(tasks) < _TINY
    bar = tqdm(tasks, desc=f"evaluate {split}", unit="task", leave=False,
               disable=tiny or len(tasks) < 2 or not sys.stderr.isatty())
    results: dict[str, float] = {}
    try:
        with torch.no_grad():
            for task in bar:
                bar.set_postfix_str(task.name)
                acc = float(task.accuracy(adapter, module, split, device=device,
                                          batch_size=batch_size, max_examples=max_examples))
                results[task.name] = acc
                log.debug("%s accuracy on %s: %.4f", split, task.name, acc)
    finally:
        bar.close()
        module.train(was_training)
    if results:
        log.info("%s accuracy: mean %.4f over %d tasks", split,
                 sum(results.values()) / len(results), len(results))
    return results
