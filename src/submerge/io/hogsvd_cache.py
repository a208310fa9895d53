"""HDF5 cache of one group's per-layer HO-GSVD: ``results/{suite}/hogsvd/{group}.h5``.

Layout: one HDF5 group per (parameter key, row block) named ``"<key>/<block>"`` holding
``V`` (n×n shared basis), ``sigma`` (N×n generalised singular values) and ``eigvals`` (n), with
attributes ``kind``, ``block`` (transformer block, −1 if none), ``transposed`` and ``seconds``;
file attributes ``experts`` (JSON list, the row order of ``sigma``) and whatever the caller adds.
Written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import h5py
import numpy as np
import torch

from .atomic import atomic_path


@dataclass(frozen=True)
class HOGSVDEntry:
    key: str
    row_block: int
    kind: str
    block: int | None
    V: torch.Tensor
    sigma: torch.Tensor
    eigvals: torch.Tensor
    transposed: bool
    seconds: float


def write_hogsvd_cache(path: str | os.PathLike, experts: list[str], entries: list[HOGSVDEntry],
                       attrs: Mapping[str, object] | None = None) -> None:
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["experts"] = json.dumps(list(experts))
        for k, v in (attrs or {}).items():
            f.attrs[k] = v
        for e in entries:
            g = f.create_group(f"{e.key}/{e.row_block}")
            g.create_dataset("V", data=e.V.cpu().numpy())
            g.create_dataset("sigma", data=e.sigma.cpu().numpy())
            g.create_dataset("eigvals", data=e.eigvals.cpu().numpy())
            g.attrs.update(kind=e.kind, block=-1 if e.block is None else e.block,
                           transposed=e.transposed, seconds=e.seconds)


def read_hogsvd_cache(path: str | os.PathLike, *, with_basis: bool = False
                      ) -> tuple[list[str], list[HOGSVDEntry]]:
    """Experts (row order) and entries; ``V`` is loaded only when ``with_basis``."""
    if not Path(path).exists():
        raise FileNotFoundError(f"HO-GSVD cache {path} does not exist")
    entries = []
    with h5py.File(path, "r") as f:
        experts = json.loads(f.attrs["experts"])

        def visit(name, obj):
            if isinstance(obj, h5py.Group) and "sigma" in obj:
                key, row_block = name.rsplit("/", 1)
                block = int(obj.attrs["block"])
                entries.append(HOGSVDEntry(
                    key=key, row_block=int(row_block), kind=str(obj.attrs["kind"]),
                    block=None if block < 0 else block,
                    V=torch.from_numpy(np.asarray(obj["V"])) if with_basis else torch.empty(0),
                    sigma=torch.from_numpy(np.asarray(obj["sigma"])),
                    eigvals=torch.from_numpy(np.asarray(obj["eigvals"])),
                    transposed=bool(obj.attrs["transposed"]), seconds=float(obj.attrs["seconds"])))

        f.visititems(visit)
    entries.sort(key=lambda e: (e.key, e.row_block))
    return experts, entries
