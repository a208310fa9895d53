"""HDF5 stores (h5py) for task vectors and factored merged task vectors.

Task-vector store (:func:`write_state_dict`): one dataset per parameter, named by its
state-dict key, with attributes ``block`` (-1 for ``None``), ``kind``, ``stacked``,
``shape`` and ``dtype`` (the torch dtype name; bfloat16 is stored as float32 data and
cast back on reading). File attributes hold the caller's ``attrs`` (suite, expert, hashes).

Factored store (:func:`write_factored`): a merged task vector as dense tensors under
``dense/<key>`` and, per key, a list of SVD row-block factors under
``factors/<key>/<block>/{U,S,Vh}``; the ``factors/<key>`` group carries the key's layer
info and ``n_blocks``.

Files are written to a temporary name and renamed (:mod:`submerge.io.atomic`), and opened
without HDF5 file locking (they are never modified after the rename; locking fails on
some cluster file systems).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import h5py
import numpy as np
import torch

from submerge.errors import CheckpointError
from submerge.io.atomic import atomic_path
from submerge.layers import LayerInfo

StateDict = dict[str, torch.Tensor]
Factors = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
_JSON_ATTRS = "__json_attrs__"  # names of file attributes stored as JSON text


def _open(path: str | os.PathLike, mode: str) -> h5py.File:
    if mode == "r" and not Path(path).is_file():
        raise CheckpointError(f"HDF5 store {path} does not exist")
    return h5py.File(path, mode, locking=False, track_order=True)


def _write_attrs(obj: h5py.HLObject, attrs: Mapping) -> None:
    """str/int/float/bool attributes natively, anything else JSON-encoded."""
    json_names = []
    for name, value in attrs.items():
        if isinstance(value, (str, bool, int, float)):
            obj.attrs[name] = value
        else:
            try:
                obj.attrs[name] = json.dumps(value)
            except TypeError as exc:
                raise ValueError(f"attribute {name!r} is not JSON-serialisable: {exc}") from exc
            json_names.append(name)
    if json_names:
        obj.attrs[_JSON_ATTRS] = json.dumps(json_names)


def _read_attrs(obj: h5py.HLObject) -> dict:
    json_names = set(json.loads(obj.attrs[_JSON_ATTRS])) if _JSON_ATTRS in obj.attrs else set()
    out = {}
    for name, value in obj.attrs.items():
        if name == _JSON_ATTRS:
            continue
        value = value.item() if isinstance(value, np.generic) else value
        out[name] = json.loads(value) if name in json_names else value
    return out


def _info_attrs(obj: h5py.HLObject, info: LayerInfo) -> None:
    obj.attrs["block"] = -1 if info.block is None else int(info.block)
    obj.attrs["kind"] = info.kind
    obj.attrs["stacked"] = int(info.stacked)


def _read_info(obj: h5py.HLObject) -> LayerInfo:
    block = int(obj.attrs["block"])
    return LayerInfo(None if block < 0 else block, str(obj.attrs["kind"]), int(obj.attrs["stacked"]))


def _write_tensor(group: h5py.Group, name: str, tensor: torch.Tensor) -> h5py.Dataset:
    t = tensor.detach().cpu()
    data = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    ds = group.create_dataset(name, data=data)
    ds.attrs["shape"] = np.asarray(t.shape, dtype=np.int64)
    ds.attrs["dtype"] = str(t.dtype).removeprefix("torch.")
    return ds


def _read_tensor(ds: h5py.Dataset) -> torch.Tensor:
    dtype = getattr(torch, str(ds.attrs["dtype"]))
    shape = tuple(int(n) for n in ds.attrs["shape"])
    return torch.from_numpy(np.asarray(ds[()])).reshape(shape).to(dtype)


def _check_key(key: str, layer_info: Mapping[str, LayerInfo], path) -> None:
    if "/" in key:
        raise ValueError(f"{path}: key {key!r} contains '/', which HDF5 reads as a group separator")
    if key not in layer_info:
        raise ValueError(f"{path}: key {key!r} has no layer_info entry")


def write_state_dict(path: str | os.PathLike, sd: Mapping[str, torch.Tensor],
                     layer_info: Mapping[str, LayerInfo], attrs: Mapping) -> None:
    """Write a (task-vector) state dict, one dataset per key, atomically."""
    with atomic_path(path) as tmp, _open(tmp, "w") as f:
        _write_attrs(f, attrs)
        for key, tensor in sd.items():
            _check_key(key, layer_info, path)
            _info_attrs(_write_tensor(f, key, tensor), layer_info[key])


def read_state_dict(path: str | os.PathLike, keys: Sequence[str] | None = None
                    ) -> tuple[StateDict, dict[str, LayerInfo], dict]:
    """``(state_dict, layer_info, attrs)`` of a store, all keys or only ``keys``."""
    with _open(path, "r") as f:
        names = list(f.keys()) if keys is None else list(keys)
        sd, info = {}, {}
        for key in names:
            if key not in f or not isinstance(f[key], h5py.Dataset):
                raise CheckpointError(f"HDF5 store {path} has no parameter {key!r}")
            sd[key] = _read_tensor(f[key])
            info[key] = _read_info(f[key])
        return sd, info, _read_attrs(f)


def read_key(paths: Sequence[str | os.PathLike], key: str) -> list[torch.Tensor]:
    """One parameter from each of many stores, reading nothing else."""
    out = []
    for path in paths:
        with _open(path, "r") as f:
            if key not in f or not isinstance(f[key], h5py.Dataset):
                raise CheckpointError(f"HDF5 store {path} has no parameter {key!r}")
            out.append(_read_tensor(f[key]))
    return out


def write_factored(path: str | os.PathLike, dense: Mapping[str, torch.Tensor], factors: Mapping[str, Factors],
                   layer_info: Mapping[str, LayerInfo], attrs: Mapping) -> None:
    """Write a merged task vector as dense tensors plus per-key SVD row-block factors, atomically."""
    with atomic_path(path) as tmp, _open(tmp, "w") as f:
        _write_attrs(f, attrs)
        dense_group = f.create_group("dense", track_order=True)
        for key, tensor in dense.items():
            _check_key(key, layer_info, path)
            _info_attrs(_write_tensor(dense_group, key, tensor), layer_info[key])
        factor_group = f.create_group("factors", track_order=True)
        for key, blocks in factors.items():
            _check_key(key, layer_info, path)
            group = factor_group.create_group(key)
            _info_attrs(group, layer_info[key])
            group.attrs["n_blocks"] = len(blocks)
            for i, block in enumerate(blocks):
                if len(block) != 3:
                    raise ValueError(f"{path}: factors of key {key!r}, block {i}: expected (U, S, Vh)")
                sub = group.create_group(str(i))
                for name, tensor in zip(("U", "S", "Vh"), block):
                    _write_tensor(sub, name, tensor)


def read_factored(path: str | os.PathLike
                  ) -> tuple[StateDict, dict[str, Factors], dict[str, LayerInfo], dict]:
    """``(dense, factors, layer_info, attrs)`` of a factored store."""
    with _open(path, "r") as f:
        for group in ("dense", "factors"):
            if group not in f:
                raise CheckpointError(f"HDF5 store {path} has no group {group!r}; not a factored store")
        dense, factors, info = {}, {}, {}
        for key, ds in f["dense"].items():
            dense[key] = _read_tensor(ds)
            info[key] = _read_info(ds)
        for key, group in f["factors"].items():
            info[key] = _read_info(group)
            factors[key] = [tuple(_read_tensor(group[str(i)][name]) for name in ("U", "S", "Vh"))
                            for i in range(int(group.attrs["n_blocks"]))]
        return dense, factors, info, _read_attrs(f)
