"""Task Arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023,
arXiv:2212.04089): ``Delta_merge = sum_t Delta_t``; the merged model is
``theta_base + alpha * Delta_merge`` (Sec. 3 "Background" of arXiv 2506.16506), alpha applied later."""

from __future__ import annotations

from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor

from submerge.layers import LayerInfo
from submerge.merging.source import TaskVectorSource, map_keys
from submerge.merging.task_vectors import StateDict
from submerge.spectral import compute_dtype

__all__ = ["task_arithmetic", "task_arithmetic_items", "task_arithmetic_key", "sum_key", "sum_tensors"]


def sum_tensors(tensors: Sequence[Tensor]) -> Tensor:
    """``sum_t tensors[t]`` in float32 (float64 for float64 input), in task order."""
    work = compute_dtype(tensors[0].dtype)
    total = tensors[0].to(work, copy=True)
    for t in tensors[1:]:
        total += t.to(work)
    return total


def sum_key(task_vectors: Sequence[Mapping[str, Tensor]], key: str) -> Tensor:
    """``sum_t Delta_t[key]`` in float32 (float64 for float64 input)."""
    return sum_tensors([tv[key] for tv in task_vectors])


@torch.no_grad()
def task_arithmetic_key(tensors: Sequence[Tensor]) -> Tensor:
    """Task Arithmetic of one parameter: ``sum_t Delta_t`` in the task vectors' dtype."""
    return sum_tensors(tensors).to(tensors[0].dtype)


@torch.no_grad()
def task_arithmetic(task_vectors: Sequence[StateDict] | TaskVectorSource,
                    layer_info: Mapping[str, LayerInfo]) -> StateDict:
    """Task Arithmetic (arXiv:2212.04089): ``sum_t Delta_t`` key by key, in the task vectors' dtype.

    ``task_vectors``: state dicts or a :class:`~submerge.merging.source.TaskVectorSource` (read
    one parameter at a time). ``layer_info`` is unused (uniform merge-rule signature).
    """
    return dict(task_arithmetic_items(task_vectors, layer_info))


def task_arithmetic_items(task_vectors: Sequence[StateDict] | TaskVectorSource,
                          layer_info: Mapping[str, LayerInfo]) -> Iterator[tuple[str, Tensor]]:
    """:func:`task_arithmetic` one key at a time, in sorted order."""
    return map_keys(task_vectors, "TA", task_arithmetic_key)
