"""Per-parameter layer information, the one piece of architecture knowledge the pure math needs.

Model adapters (:mod:`submerge.models`) map each state-dict key to a :class:`LayerInfo`;
merge methods, boosting, LiNeS and HO-GSVD take ``layer_info: Mapping[str, LayerInfo]``
and never look at key names themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

KINDS = ("attn", "mlp", "embed", "norm", "head", "other")


@dataclass(frozen=True)
class LayerInfo:
    """Where a parameter sits in the network.

    block:   index of the transformer block (0-based), ``None`` outside the blocks
             (embeddings, final norms, projections).
    kind:    one of :data:`KINDS`; ``attn`` and ``mlp`` mark the 2-D weights that
             Subspace Boosting may touch (biases and norms are ``norm``/``other``).
    stacked: number of equal row blocks fused in the matrix (3 for open_clip's
             ``attn.in_proj_weight`` = [W_q; W_k; W_v]), 1 otherwise.
    """

    block: int | None
    kind: str
    stacked: int = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"LayerInfo.kind must be one of {KINDS}, got {self.kind!r}")
        if self.stacked < 1:
            raise ValueError(f"LayerInfo.stacked must be >= 1, got {self.stacked}")


def num_blocks(layer_info: Mapping[str, LayerInfo]) -> int:
    """Number of transformer blocks: 1 + the largest block index (0 if there is none)."""
    blocks = [info.block for info in layer_info.values() if info.block is not None]
    return max(blocks) + 1 if blocks else 0
