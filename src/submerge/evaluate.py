"""Accuracy of one (merged) encoder on a list of evaluation tasks.

:func:`load_eval_task` builds an expert's task from the suite config; it lives here, above
both :mod:`submerge.data` (vision and text tasks, heads) and :mod:`submerge.suites` (the
embedded digits suite, which imports :mod:`submerge.data.heads`), so that neither package
imports the other in a cycle.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Mapping, Sequence

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


def load_eval_task(suite_cfg: Mapping, expert: str, *, root: str | Path):
    """The evaluation task (:class:`submerge.data.EvalTask`) of ``expert`` in ``suite_cfg``
    (``suite_cfg["experts"][expert]``):

    * ``{"build": "digits", "task": ...}``  → :class:`submerge.suites.digits.DigitsTask`
    * ``{"dataset": {...}}``                 → :class:`submerge.data.vision.VisionTask`
    * ``{"dataset": {..., "kind": "text"}}`` → :class:`submerge.data.language.LanguageTask`

    ``root`` is the suite's results folder; heads are read from ``root/heads``.
    """
    experts = suite_cfg.get("experts")
    if not isinstance(experts, Mapping) or expert not in experts:
        raise ConfigError(f"experts.{expert}: not in the suite config")
    entry = experts[expert]
    if not isinstance(entry, Mapping):
        raise ConfigError(f"experts.{expert}: expected a mapping, got {type(entry).__name__}")
    if entry.get("build") == "digits":
        from submerge.suites import digits

        task = entry.get("task", expert)
        if task not in digits.TASKS:
            raise ConfigError(f"experts.{expert}.task: unknown digits task {task!r} "
                              f"(known: {', '.join(digits.TASKS)})")
        return digits.TASKS[task].bind(suite_cfg.get("digits"), root, name=expert)
    dataset = entry.get("dataset")
    if isinstance(dataset, Mapping):
        if dataset.get("kind", "image") == "text":
            from submerge.data.language import LanguageTask

            return LanguageTask(suite_cfg, expert, root=Path(root))
        from submerge.data.vision import VisionTask

        return VisionTask(suite_cfg, expert, root=Path(root))
    raise ConfigError(f"experts.{expert}: no evaluation data (need build: digits or a dataset)")


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
