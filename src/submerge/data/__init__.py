"""Evaluation tasks and classification heads.

An evaluation task (:class:`EvalTask`) measures the top-1 accuracy of an encoder on one
expert's task; :func:`submerge.evaluate.load_eval_task` builds the right one from a suite
config:

* ``{"build": "digits", "task": ...}``  → :class:`submerge.suites.digits.DigitsTask`
* ``{"dataset": {...}}``                 → :class:`submerge.data.vision.VisionTask`
* ``{"dataset": {..., "kind": "text"}}`` → :class:`submerge.data.language.LanguageTask`

(``submerge.suites`` imports ``submerge.data``, never the other way round, so the
dispatch lives above both, in :mod:`submerge.evaluate`.)

Classification heads live at ``{root}/heads/{expert}.safetensors`` (tensors ``weight``
(C×d) and optional ``bias`` (C,)) with a JSON sidecar ``{expert}.json`` holding
``{"normalize": bool, "logit_scale": float, "classes": [...]}``; the logits are
``logit_scale · normalize?(features) @ weightᵀ + bias``. Their file I/O lives in
:mod:`submerge.data.heads` (:func:`head_path`, :func:`save_head`, :func:`load_head`,
:func:`head_logits`, re-exported here).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from submerge.data.heads import head_logits, head_path, load_head, save_head


@runtime_checkable
class EvalTask(Protocol):
    """One expert's evaluation task."""

    name: str

    def accuracy(self, adapter, module, split: str, *, device="cpu", batch_size: int = 256,
                 max_examples: int | None = None) -> float:
        """Top-1 accuracy in [0, 1] of ``module`` (encoded through ``adapter``) on ``split``.

        ``max_examples`` evaluates a deterministic subset (the first n of a seeded
        permutation), the same on every call.
        """
        ...


__all__ = ["EvalTask", "head_logits", "head_path", "load_head", "save_head"]
