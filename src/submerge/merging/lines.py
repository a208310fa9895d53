"""LiNeS: post-training layer scaling (Wang et al., "LiNeS: Post-training Layer Scaling
Prevents Forgetting and Enhances Model Merging", ICLR 2025, arXiv:2410.17146).

Block ``l`` of ``L`` is scaled by ``alpha + beta * l / (L - 1)``; parameters outside the
blocks (patch embedding, positional/class embeddings, ``ln_pre``, ``ln_post``, ``proj``)
get ``alpha`` (reference: wang-kee/LiNeS ``src/eval/eval.py::LiNeS_scaling``). For model
merging ``alpha = (||sum_t tau_t||_1 / ||tau_merged||_1) / T`` (``src/eval/aggregation.py``;
the sum is over the untrimmed task vectors, also for TIES) and ``beta`` is tuned.

LiNeS is a post-processing step, not a merge rule: it applies to the output of every rule
and composes with boosting; the merged model is then ``theta_base + 1.0 * scaled``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from submerge.layers import LayerInfo, num_blocks as count_blocks
from submerge.merging.source import TaskVectorSource, as_source
from submerge.merging.task_arithmetic import sum_tensors
from submerge.merging.task_vectors import StateDict, check_layer_info
from submerge.spectral import compute_dtype

__all__ = ["lines_scale", "lines_alpha", "lines_coefficient", "l1_norm"]


def lines_coefficient(block: int | None, *, alpha: float, beta: float, num_blocks: int) -> float:
    """The LiNeS scale of a parameter in ``block`` (``None`` = outside the blocks)."""
    if block is None or num_blocks <= 1:
        return alpha
    if not 0 <= block < num_blocks:
        raise ValueError(f"block index {block} outside 0..{num_blocks - 1}")
    return alpha + beta * block / (num_blocks - 1)


@torch.no_grad()
def lines_scale(
    delta: Mapping[str, Tensor],
    layer_info: Mapping[str, LayerInfo],
    *,
    alpha: float,
    beta: float,
    num_blocks: int | None = None,
) -> StateDict:
    """Scale each key of ``delta`` by its LiNeS coefficient ``alpha + beta * l / (L - 1)``
    (Wang et al. 2025, arXiv:2410.17146).

    ``num_blocks`` defaults to the number of blocks in ``layer_info``.
    """
    check_layer_info(delta.keys(), layer_info)
    if num_blocks is None:
        num_blocks = count_blocks(layer_info)
    out: StateDict = {}
    for key, value in delta.items():
        scale = lines_coefficient(layer_info[key].block, alpha=alpha, beta=beta, num_blocks=num_blocks)
        out[key] = (value.to(compute_dtype(value.dtype)) * scale).to(value.dtype)
    return out


def l1_norm(tensor: Tensor) -> float:
    """``||tensor||_1``, accumulated in float64."""
    return float(tensor.abs().sum(dtype=torch.float64))


@torch.no_grad()
def lines_alpha(task_vectors: Sequence[Mapping[str, Tensor]] | TaskVectorSource,
                merged: Mapping[str, Tensor] | None = None, *, merged_l1: float | None = None) -> float:
    """``(||sum_t tau_t||_1 / ||tau_merged||_1) / T`` over all keys (exactly ``1/T`` for TA).
    ``task_vectors``: state dicts or a source (one pass over the keys, one parameter at a time).
    ``merged``: the merged task vector; or ``merged_l1``, its L1 norm summed key by key in sorted
    key order (:func:`l1_norm`; what a caller that streams the merge accumulates), the same value."""
    src = as_source(task_vectors)
    keys = src.keys
    if (merged is None) == (merged_l1 is None):
        raise ValueError("lines_alpha: give the merged task vector or its L1 norm (merged_l1), not both")
    if merged is not None and set(merged) != set(keys):
        raise ValueError(
            f"merged task vector keys differ from the task vectors' keys: {sorted(set(merged) ^ set(keys))[:5]}"
        )
    summed = sum(l1_norm(sum_tensors(src.read(key))) for key in src.iter_keys("LiNeS norm"))
    norm_merged = sum(l1_norm(merged[key]) for key in keys) if merged is not None else merged_l1
    if norm_merged == 0.0:
        raise ValueError("lines_alpha: the merged task vector is zero (L1 norm 0)")
    return summed / norm_merged / len(src)
