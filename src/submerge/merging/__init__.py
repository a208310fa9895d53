"""Merge rules: pure tensor math on task vectors (no files, no key-name parsing).

Every rule is ``fn(task_vectors, layer_info, **hyper) -> Delta_merge`` (without alpha);
:data:`MERGE_RULES` maps the rule names used in configs to the functions and
:func:`merge` dispatches with checked hyperparameters. LiNeS (:mod:`.lines`) is a
post-processing step, not a rule.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable, Mapping, Sequence

from submerge.errors import ConfigError
from submerge.layers import LayerInfo
from submerge.merging.consensus import consensus, tall_masks
from submerge.merging.iso import iso_c, iso_cts
from submerge.merging.lines import lines_alpha, lines_scale
from submerge.merging.task_arithmetic import task_arithmetic
from submerge.merging.task_vectors import StateDict, apply_task_vector, task_vectors, validate_state_dicts
from submerge.merging.ties import ties
from submerge.merging.tsv import tsv_m

__all__ = [
    "MERGE_RULES",
    "merge",
    "StateDict",
    "validate_state_dicts",
    "task_vectors",
    "apply_task_vector",
    "task_arithmetic",
    "ties",
    "consensus",
    "tall_masks",
    "tsv_m",
    "iso_c",
    "iso_cts",
    "lines_scale",
    "lines_alpha",
]


def _lazy(module: str, name: str) -> Callable:
    """A rule whose implementation is imported on first use (``rule.resolve()`` returns it)."""

    def resolve() -> Callable:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"merge rule needs {module}.{name}, which cannot be imported: {err}") from err

    def rule(task_vectors, layer_info, **hyper):
        return resolve()(task_vectors, layer_info, **hyper)

    rule.resolve = resolve
    rule.__name__ = name
    rule.__doc__ = f"Lazily imported {module}.{name}."
    return rule


MERGE_RULES: dict[str, Callable] = {
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "consensus": consensus,
    "tsv_m": tsv_m,
    "iso_c": iso_c,
    "iso_cts": iso_cts,
    "hogsvd": _lazy("submerge.hogsvd", "hogsvd_merge"),
}


def merge(
    rule: str,
    task_vectors: Sequence[StateDict],
    layer_info: Mapping[str, LayerInfo],
    **hyper,
) -> StateDict:
    """Merge with the rule named ``rule``; ``ConfigError`` names an unknown rule or
    hyperparameter (bad hyperparameter values raise ``ConfigError`` from the rule)."""
    if rule not in MERGE_RULES:
        raise ConfigError(f"unknown merge rule {rule!r}; known rules: {sorted(MERGE_RULES)}")
    fn = MERGE_RULES[rule]
    target = fn.resolve() if hasattr(fn, "resolve") else fn
    params = list(inspect.signature(target).parameters.values())[2:]  # after task_vectors, layer_info
    allowed = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(hyper) - set(allowed))
    if unknown:
        raise ConfigError(f"merge rule {rule!r} has no hyperparameter(s) {unknown}; allowed: {allowed}")
    return target(task_vectors, layer_info, **hyper)
