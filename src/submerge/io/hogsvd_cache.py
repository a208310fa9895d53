"""HDF5 cache of one group's per-layer HO-GSVD: ``results/{suite}/hogsvd/{group}.h5``.

Layout: one HDF5 group per (parameter key, row block) named ``"<key>/<block>"`` holding
``V`` (n×n shared basis), ``sigma`` (N×n generalised singular values) and ``eigvals`` (n), with
attributes ``kind``, ``block`` (transformer block, −1 if none), ``transposed`` and ``seconds``;
file attributes ``experts`` (JSON list, the row order of ``sigma``) and whatever the caller adds
(the pipeline: ``pi``, the regularisation the cache was computed with, which
``submerge.hogsvd.hogsvd_merge(..., cache=...)`` requires, and ``layers``).
Written to a temporary name and renamed, in the HDF5 1.8 format or later, whose metadata
(object headers with the attributes, stored as fixed-length strings there) HDF5 checksums;
each entry group's ``sha256`` attribute (JSON) holds the sha256 of its datasets' data, checked
on reading (caches written before it was recorded have none).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import h5py
import numpy as np
import torch

from submerge.errors import CheckpointError

from .atomic import atomic_path

ENTRY_ATTRS = ("kind", "block", "transposed", "seconds")
_REDO = "delete it and rerun (rule hogsvd)"
_LIBVER = ("v108", "latest")  # the oldest file format whose metadata is checksummed
_DATASETS = ("V", "sigma", "eigvals")


def _sha256(data: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()


def _attr(obj, name: str, value: object) -> None:
    """A str attribute as a fixed-length string (kept in the checksummed object header),
    anything else natively."""
    if isinstance(value, str):
        raw = value.encode("utf-8")
        size = max(1, len(raw))
        obj.attrs.create(name, np.array(raw, dtype=f"S{size}"), dtype=h5py.string_dtype("utf-8", size))
    else:
        obj.attrs[name] = value


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


class LazyBasis:
    """The basis ``V`` of one cache entry, read from the file (and checked against its sha256)
    by :meth:`load`, so that a merge holds one layer's basis at a time
    (``read_hogsvd_cache(path, with_basis="lazy")``); ``shape`` and ``numel()`` need no data."""

    def __init__(self, path: str, group: str, shape: tuple[int, ...], digest: str | None):
        self.path, self.group, self.digest = path, group, digest
        self.shape = torch.Size(shape)

    def numel(self) -> int:
        return self.shape.numel()

    def load(self) -> torch.Tensor:
        where = f"HO-GSVD cache {self.path}"
        try:
            with h5py.File(self.path, "r") as f:
                data = np.asarray(f[self.group]["V"])
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as err:
            raise CheckpointError(f"{where}: cannot read V of {self.group!r} ({type(err).__name__}: "
                                  f"{err}): {_REDO}") from err
        if data.shape != tuple(self.shape) or (self.digest is not None and _sha256(data) != self.digest):
            raise CheckpointError(f"{where}: V of {self.group!r} changed since the cache was opened or does "
                                  f"not match its sha256 (the file is damaged): {_REDO}")
        return torch.from_numpy(data)


class HOGSVDCache(tuple):
    """What :func:`read_hogsvd_cache` returns: unpacks as the pair ``(experts, entries)``;
    also ``.experts``, ``.entries``, ``.attrs`` (the file attributes other than ``experts``,
    as Python values, e.g. ``pi`` and ``layers``) and ``.path`` (the file, or None)."""

    def __new__(cls, experts: list[str], entries: list[HOGSVDEntry],
                attrs: Mapping[str, object] | None = None, path: str | os.PathLike | None = None):
        self = super().__new__(cls, (list(experts), list(entries)))
        self.attrs = dict(attrs or {})
        self.path = None if path is None else str(path)
        return self

    def __reduce__(self):
        return (type(self), (self[0], self[1], self.attrs, self.path))

    @property
    def experts(self) -> list[str]:
        return self[0]

    @property
    def entries(self) -> list[HOGSVDEntry]:
        return self[1]


def write_hogsvd_cache(path: str | os.PathLike, experts: list[str], entries: list[HOGSVDEntry],
                       attrs: Mapping[str, object] | None = None) -> None:
    with atomic_path(path) as tmp, h5py.File(tmp, "w", libver=_LIBVER) as f:
        _attr(f, "experts", json.dumps(list(experts)))
        for k, v in (attrs or {}).items():
            _attr(f, k, v)
        for e in entries:
            g = f.create_group(f"{e.key}/{e.row_block}")
            digests = {}
            for name, tensor in zip(_DATASETS, (e.V, e.sigma, e.eigvals)):
                data = tensor.cpu().numpy()
                g.create_dataset(name, data=data)
                digests[name] = _sha256(data)
            _attr(g, "kind", e.kind)
            g.attrs.update(block=-1 if e.block is None else e.block, transposed=e.transposed,
                           seconds=e.seconds)
            _attr(g, "sha256", json.dumps(digests))


def _plain(value: object) -> object:
    """An HDF5 attribute as a Python value."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode()  # strict: damaged text is an error
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_hogsvd_cache(path: str | os.PathLike, *, with_basis: bool | str = False) -> HOGSVDCache:
    """Experts (row order), entries (sorted by key, row block) and file attributes;
    ``V`` is loaded only when ``with_basis``; ``with_basis="lazy"``: each entry's ``V`` is a
    :class:`LazyBasis`, read when loaded.

    The file is checked to be complete: the ``experts`` attribute, and for every
    ``"<key>/<block>"`` group ``sigma`` (N×n, N experts), ``eigvals`` (n), ``V`` (n×n, when
    ``with_basis``) and the attributes ``kind``, ``block``, ``transposed``, ``seconds``.
    ``FileNotFoundError`` if it does not exist; ``CheckpointError`` naming the file (and the
    key) if a piece is missing or malformed, or the HDF5 file is unreadable or truncated.
    """
    if not Path(path).exists():
        raise FileNotFoundError(f"HO-GSVD cache {path} does not exist")
    where = f"HO-GSVD cache {path}"
    entries = []
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: _plain(v) for k, v in f.attrs.items()}
            if "experts" not in attrs:
                raise CheckpointError(f"{where} has no file attribute 'experts': {_REDO}")
            try:
                experts = json.loads(attrs.pop("experts"))
            except (TypeError, ValueError) as err:
                raise CheckpointError(f"{where}: file attribute 'experts' is not a JSON list ({err}): {_REDO}") from None
            if not isinstance(experts, list):
                raise CheckpointError(f"{where}: file attribute 'experts' is not a JSON list: {_REDO}")

            leaves = []

            def visit(name: str, obj: object) -> None:  # entry groups: groups without subgroups
                if isinstance(obj, h5py.Group) and not any(
                        obj.get(child, getclass=True) is h5py.Group for child in obj):
                    leaves.append(name)

            f.visititems(visit)
            for name in leaves:
                key, _, row_block = name.rpartition("/")
                if not key or not row_block.isdigit():
                    raise CheckpointError(f"{where}: group {name!r} is not named '<key>/<row block>': {_REDO}")
                g = f[name]
                lazy = with_basis == "lazy"
                wanted = (["V"] if with_basis else []) + ["sigma", "eigvals"]
                missing = [d for d in wanted if g.get(d, getclass=True) is not h5py.Dataset]
                missing += [f"attribute {a!r}" for a in ENTRY_ATTRS if a not in g.attrs]
                if missing:
                    raise CheckpointError(
                        f"{where}: key {key!r}, row block {row_block} lacks {', '.join(missing)}: {_REDO}")
                arrays = {d: np.asarray(g[d]) for d in wanted if not (lazy and d == "V")}
                digests = json.loads(_plain(g.attrs["sha256"])) if "sha256" in g.attrs else {}
                for d, data in arrays.items():
                    if d in digests and _sha256(data) != digests[d]:
                        raise CheckpointError(
                            f"{where}: key {key!r}, row block {row_block}: the data of {d!r} do not "
                            f"match their sha256 (the file is damaged): {_REDO}")
                sigma = torch.from_numpy(arrays["sigma"])
                eigvals = torch.from_numpy(arrays["eigvals"])
                if lazy:
                    v = LazyBasis(str(path), name, tuple(g["V"].shape), digests.get("V"))
                else:
                    v = torch.from_numpy(arrays["V"]) if with_basis else torch.empty(0)
                n = eigvals.shape[0] if eigvals.ndim == 1 else -1
                if (sigma.shape != (len(experts), n) or (with_basis and v.shape != (n, n))):
                    raise CheckpointError(
                        f"{where}: key {key!r}, row block {row_block} has inconsistent shapes (sigma "
                        f"{tuple(sigma.shape)}, eigvals {tuple(eigvals.shape)}"
                        + (f", V {tuple(v.shape)}" if with_basis else "")
                        + f"; {len(experts)} experts): {_REDO}")
                block = int(g.attrs["block"])
                entries.append(HOGSVDEntry(
                    key=key, row_block=int(row_block), kind=str(_plain(g.attrs["kind"])),
                    block=None if block < 0 else block, V=v, sigma=sigma, eigvals=eigvals,
                    transposed=bool(g.attrs["transposed"]), seconds=float(g.attrs["seconds"])))
    except CheckpointError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError, TypeError, AttributeError) as err:
        # a failed metadata checksum is a RuntimeError; damaged text a UnicodeDecodeError
        raise CheckpointError(f"{where} is unreadable or truncated, or damaged ({type(err).__name__}: "
                              f"{err}): {_REDO}") from err
    entries.sort(key=lambda e: (e.key, e.row_block))
    return HOGSVDCache(experts, entries, attrs, path)
