"""Merge rules: pure tensor math on task vectors (no files, no key-name parsing).

Every merge function is ``fn(task_vectors, layer_info, **kwargs) -> Delta_merge`` (without
alpha), where ``task_vectors`` is a list of state dicts or a
:class:`~submerge.merging.source.TaskVectorSource` read one parameter of every task vector at a
time (the merge stage streams from the HDF5 files; same results, bitwise); each rule also has a
per-parameter entry point (``task_arithmetic_key``, ``ties_elect_key``/``ties_disjoint_key``,
``consensus_key``, ``tsv_m_key``, ``iso_c_key``, ``iso_cts_key``); :mod:`submerge.merges` registers each one with its label, paper and hyperparameters,
and :func:`merge` dispatches by registered name. LiNeS (:mod:`.lines`) is a post-processing
step, not a merge function.
"""

from __future__ import annotations

import inspect
import sys
from typing import Callable, Iterator, Mapping, Sequence

from torch import Tensor

from submerge import merges
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
    "merge",
    "merge_items",
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


def _function(name: str, kwargs: Mapping) -> Callable:
    """The merge function registered as ``name``, its keywords checked against ``kwargs``."""
    fn = merges.get(name).function()
    params = list(inspect.signature(fn).parameters.values())[2:]  # after task_vectors, layer_info
    allowed = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ConfigError(f"merge function {name!r} has no keyword(s) {unknown}; allowed: {allowed}")
    return fn


def merge(
    name: str,
    task_vectors: Sequence[StateDict],
    layer_info: Mapping[str, LayerInfo],
    **kwargs,
) -> StateDict:
    """Merge with the merge function registered as ``name`` (:data:`submerge.merges.MERGES`);
    ``kwargs`` are the function's keyword arguments. ``ConfigError`` names an unknown function
    or keyword (bad values raise ``ConfigError`` from the function)."""
    return _function(name, kwargs)(task_vectors, layer_info, **kwargs)


def merge_items(
    name: str,
    task_vectors: Sequence[StateDict],
    layer_info: Mapping[str, LayerInfo],
    **kwargs,
) -> Iterator[tuple[str, Tensor]]:
    """:func:`merge` one key at a time (``(key, Δ_merge[key])`` in sorted key order), so that a
    caller writing each key as it comes holds one parameter of the result, not all of it
    (the merge stage). Uses the function's ``<function>_items`` companion in its module (every
    rule here has one); a function without one is called whole and its result handed out."""
    fn = _function(name, kwargs)
    items = getattr(sys.modules[fn.__module__], fn.__name__ + "_items", None)
    if items is None:
        return iter(fn(task_vectors, layer_info, **kwargs).items())
    return items(task_vectors, layer_info, **kwargs)
