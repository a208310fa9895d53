"""Task Arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023,
arXiv:2212.04089): ``Delta_merge = sum_t Delta_t``; the merged model is
``theta_base + alpha * Delta_merge`` (Sec. 3 "Background" of arXiv 2506.16506), alpha applied later."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from submerge.layers import LayerInfo
from submerge.merging.task_vectors import StateDict, check_task_vectors
from submerge.spectral import compute_dtype

__all__ = ["task_arithmetic", "sum_key"]


def sum_key(task_vectors: Sequence[Mapping[str, Tensor]], key: str) -> Tensor:
    """``sum_t Delta_t[key]`` in float32 (float64 for float64 input)."""
    work = compute_dtype(task_vectors[0][key].dtype)
    total = task_vectors[0][key].to(work, copy=True)
    for tv in task_vectors[1:]:
        total += tv[key].to(work)
    return total


@torch.no_grad()
def task_arithmetic(task_vectors: Sequence[StateDict], layer_info: Mapping[str, LayerInfo]) -> StateDict:
    """Task Arithmetic (arXiv:2212.04089): ``sum_t Delta_t`` key by key, in the task vectors' dtype.

    ``layer_info`` is unused (uniform merge-rule signature).
    """
    keys = check_task_vectors(task_vectors)
    return {key: sum_key(task_vectors, key).to(task_vectors[0][key].dtype) for key in keys}
