"""Proposition 1 of Skorobogat et al. (arXiv 2506.16506, Sec. 3 and Supp.): in the average of
N task vectors the task-specific (unique) part decays as O(1/√N) against the common part,
which stays O(1). Checked here on a suite's own task vectors through the HO-GSVD split (Eq. 6).

For one matrix with the shared HO-GSVD basis ``V`` (``A_i = B_i V^T``, ``B_i = A_i V^{-T}``,
the columns of ``B_i`` being ``σ_ik u_ik``), the common part of ``A_i`` is
``B_i[:, c] V[:, c]^T`` over the common directions ``c`` and the unique part the same over the
others. Both are linear in ``A_i``, so the parts of the mean of the first N task vectors are
``mean_{i≤N}(B_i)[:, c] V[:, c]^T`` and ``mean_{i≤N}(B_i)[:, ~c] V[:, ~c]^T``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["averaged_split"]


@torch.no_grad()
def averaged_split(mats: Sequence[Tensor], V: Tensor, common: Tensor) -> dict[str, Tensor]:
    """The common and unique parts of the mean of the first N of ``mats`` (oriented as the
    HO-GSVD decomposed them, ``m x n``), for N = 1 … len(mats), in the shared basis ``V``
    (``n x n``) with ``common`` (``(n,)`` bool) the common directions.

    Returns ``{"common_fro", "unique_fro": (N,), "common_sv", "unique_sv": (N, min(m, n))}``:
    the Frobenius norms and the singular values (descending) of each part of each mean, in
    float64."""
    if len(mats) == 0:
        raise ValueError("averaged_split needs at least one matrix")
    if V.ndim != 2 or V.shape[0] != V.shape[1]:
        raise ValueError(f"V must be square, got shape {tuple(V.shape)}")
    if common.shape != (V.shape[0],) or common.dtype != torch.bool:
        raise ValueError(f"common must be a bool mask of shape ({V.shape[0]},)")
    v = V.to(torch.float64)
    lu, pivots = torch.linalg.lu_factor(v)
    total = None
    out: dict[str, list[Tensor]] = {k: [] for k in ("common_fro", "unique_fro", "common_sv",
                                                    "unique_sv")}
    mask = common.to(v.device)
    for n, a in enumerate(mats, start=1):
        a = a.to(torch.float64)
        if a.shape[1] != v.shape[0]:
            raise ValueError(f"matrix {n - 1} has {a.shape[1]} columns, V is {v.shape[0]} wide")
        b = torch.linalg.lu_solve(lu, pivots, a.T).T  # V B^T = A^T
        total = b if total is None else total + b
        mean = total / n
        for name, m in (("common", mask), ("unique", ~mask)):
            part = (mean * m) @ v.T
            out[f"{name}_fro"].append(torch.linalg.matrix_norm(part))
            out[f"{name}_sv"].append(torch.linalg.svdvals(part))
    return {k: torch.stack(v_) for k, v_ in out.items()}
