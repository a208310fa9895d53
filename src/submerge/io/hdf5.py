"""HDF5 stores (h5py) for task vectors and factored merged task vectors.

Task-vector store (:func:`write_state_dict`): one dataset per parameter, named by its
state-dict key, with attributes ``block`` (-1 for ``None``), ``kind``, ``stacked``,
``shape`` and ``dtype`` (the torch dtype name; bfloat16 is stored as float32 data and
cast back on reading). File attributes hold the caller's ``attrs`` (suite, expert, hashes).

Factored store (:func:`write_factored`): a merged task vector as dense tensors under
``dense/<key>`` and, per key, a list of SVD row-block factors under
``factors/<key>/<block>/{U,S,Vh}``; the ``factors/<key>`` group carries the key's layer
info and ``n_blocks``.

Both record, LAST (after every dataset), a manifest: the dataset ``__manifest__`` holding
JSON ``{"format", "version", "kind" ("state_dict" | "factored"), "n_datasets",
"entries_sha256", "entries", "data_sha256"}``; ``entries`` lists every key with its ``shape``,
``dtype`` (torch name) and ``stored`` (numpy dtype of the data), and for a factored key its
``n_blocks`` and each row block's U/S/Vh; ``data_sha256`` maps each dataset's path to the
sha256 of its data (absent in stores written before it was recorded). Every reader checks the
file against it first: the manifest is present and intact, every listed key / factor / row
block exists with the recorded shape and dtype, and nothing unlisted is there; every dataset
read is checked against its sha256. Otherwise, and for a truncated, damaged or non-HDF5
file, :class:`CheckpointError` names the file, the key and what to do (delete it and rerun
the workflow rule that wrote it, inferred from the file's attributes: ``task_vector``,
``merged`` or ``expert_spectrum``). Stores are written in the HDF5 1.8 file format or later
(``libver``), whose metadata (superblock, object headers with the attributes, B-trees,
heaps) carries checksums that HDF5 verifies on reading: a damaged header is an error, not
wrong attributes.

Files are written to a temporary name and renamed (:mod:`submerge.io.atomic`), and opened
without HDF5 file locking (they are never modified after the rename; locking fails on
some cluster file systems).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import h5py
import numpy as np
import torch

from submerge.errors import CheckpointError
from submerge.io.atomic import atomic_path
from submerge.layers import LayerInfo
from submerge.merging.source import TaskVectorSource

StateDict = dict[str, torch.Tensor]
Factors = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
_JSON_ATTRS = "__json_attrs__"  # names of file attributes stored as JSON text
MANIFEST = "__manifest__"  # dataset holding the manifest, written last
_MANIFEST_FORMAT = "submerge.hdf5.manifest"
_MANIFEST_VERSION = 1
_FACTOR_NAMES = ("U", "S", "Vh")
_GENERIC_ADVICE = "delete it and rerun the rule that wrote it"
# the oldest file format whose metadata is checksummed (object header v2, superblock v2+)
_LIBVER = ("v108", "latest")
# what h5py raises on a damaged file (a failed metadata checksum is a RuntimeError)
_H5_ERRORS = (OSError, KeyError, RuntimeError, ValueError, TypeError, AttributeError,
              UnicodeDecodeError)


def _open(path: str | os.PathLike, mode: str) -> h5py.File:
    if mode == "r" and not Path(path).is_file():
        raise CheckpointError(f"HDF5 store {path} does not exist")
    extra = {} if mode == "r" else {"libver": _LIBVER}
    try:
        return h5py.File(path, mode, locking=False, track_order=True, **extra)
    except (OSError, RuntimeError, ValueError) as exc:
        if mode != "r":
            raise
        raise CheckpointError(f"{path}: cannot open as HDF5 ({exc}); the file is truncated or not "
                              f"an HDF5 file: {_GENERIC_ADVICE}") from exc


def _set_str(obj: h5py.HLObject, name: str, value: str) -> None:
    """A string attribute of fixed length: it lives in the object header, which HDF5
    checksums (a variable-length string lives in the global heap, which has no checksum)."""
    raw = value.encode("utf-8")
    size = max(1, len(raw))
    obj.attrs.create(name, np.array(raw, dtype=f"S{size}"), dtype=h5py.string_dtype("utf-8", size))


def _str(value) -> str:
    """A string attribute as str (fixed-length ones read back as bytes)."""
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8")  # strict: damaged text is an error
    return str(value)


def _write_attrs(obj: h5py.HLObject, attrs: Mapping) -> None:
    """str/int/float/bool attributes natively, anything else JSON-encoded."""
    json_names = []
    for name, value in attrs.items():
        if isinstance(value, str):
            _set_str(obj, name, value)
        elif isinstance(value, (bool, int, float)):
            obj.attrs[name] = value
        else:
            try:
                _set_str(obj, name, json.dumps(value))
            except TypeError as exc:
                raise ValueError(f"attribute {name!r} is not JSON-serialisable: {exc}") from exc
            json_names.append(name)
    if json_names:
        _set_str(obj, _JSON_ATTRS, json.dumps(json_names))


def _read_attrs(obj: h5py.HLObject) -> dict:
    json_names = set(json.loads(_str(obj.attrs[_JSON_ATTRS]))) if _JSON_ATTRS in obj.attrs else set()
    out = {}
    for name, value in obj.attrs.items():
        if name == _JSON_ATTRS:
            continue
        value = _str(value) if isinstance(value, (str, bytes, np.bytes_)) else value
        value = value.item() if isinstance(value, np.generic) else value
        out[name] = json.loads(value) if name in json_names else value
    return out


def _info_attrs(obj: h5py.HLObject, info: LayerInfo) -> None:
    obj.attrs["block"] = -1 if info.block is None else int(info.block)
    _set_str(obj, "kind", info.kind)
    obj.attrs["stacked"] = int(info.stacked)


def _read_info(obj: h5py.HLObject) -> LayerInfo:
    block = int(obj.attrs["block"])
    return LayerInfo(None if block < 0 else block, _str(obj.attrs["kind"]), int(obj.attrs["stacked"]))


def _data_sha256(data: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()


def _write_tensor(group: h5py.Group, name: str, tensor: torch.Tensor,
                  digests: dict[str, str]) -> tuple[h5py.Dataset, dict]:
    """The dataset and its manifest record; its data's sha256 goes to ``digests``."""
    t = tensor.detach().cpu()
    data = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    ds = group.create_dataset(name, data=data)
    digests[ds.name.lstrip("/")] = _data_sha256(data)
    ds.attrs["shape"] = np.asarray(t.shape, dtype=np.int64)
    ds.attrs["dtype"] = str(t.dtype).removeprefix("torch.")
    return ds, {"shape": [int(n) for n in t.shape], "dtype": str(t.dtype).removeprefix("torch."),
                "stored": data.dtype.name}


def _read_tensor(ds: h5py.Dataset, check: "_Check") -> torch.Tensor:
    dtype = getattr(torch, str(ds.attrs["dtype"]))
    shape = tuple(int(n) for n in ds.attrs["shape"])
    data = np.asarray(ds[()])
    check.data(ds, data)
    return torch.from_numpy(data).reshape(shape).to(dtype)


def _check_key(key: str, layer_info: Mapping[str, LayerInfo], path) -> None:
    if "/" in key:
        raise ValueError(f"{path}: key {key!r} contains '/', which HDF5 reads as a group separator")
    if key == MANIFEST:
        raise ValueError(f"{path}: key {key!r} is reserved for the store's manifest")
    if key not in layer_info:
        raise ValueError(f"{path}: key {key!r} has no layer_info entry")


# --- manifest -----------------------------------------------------------------------------

def _entries_digest(entries: Mapping) -> str:
    return hashlib.sha256(json.dumps(entries, separators=(",", ":")).encode()).hexdigest()


def _count(kind: str, entries: Mapping) -> int:
    if kind == "state_dict":
        return len(entries)
    n_blocks = sum(rec["n_blocks"] for rec in entries["factors"].values())
    return len(entries["dense"]) + len(_FACTOR_NAMES) * n_blocks


def _write_manifest(f: h5py.File, kind: str, entries: Mapping, digests: Mapping[str, str],
                    stats: Mapping | None = None) -> None:
    """Record the manifest; called after every dataset is written."""
    manifest = {"format": _MANIFEST_FORMAT, "version": _MANIFEST_VERSION, "kind": kind,
                "n_datasets": _count(kind, entries), "entries_sha256": _entries_digest(entries),
                "entries": entries, "data_sha256": dict(digests)}
    if stats:
        manifest.update(stats=dict(stats), stats_sha256=_entries_digest(stats))
    f.create_dataset(MANIFEST, data=json.dumps(manifest), dtype=h5py.string_dtype("utf-8"))
    f.flush()


def _advice(f: h5py.File, kind: str) -> str:
    """What to do about a broken store: rerun the rule its attributes say wrote it."""
    try:
        names = set(f.attrs.keys())
    except Exception:  # noqa: BLE001 - a damaged header: no inference
        return _GENERIC_ADVICE
    rule = None
    if kind == "state_dict" and ("expert_sha256" in names or {"expert", "base_sha256"} <= names):
        rule = "expert_model"  # the expert's job extracts its task vector
    elif kind == "factored" and "method" in names:
        rule = "merged"
    elif kind == "factored" and ("expert_sha256" in names or "expert" in names):
        rule = "expert_model"  # spectra carry their task vector's attributes (same job)
    return _GENERIC_ADVICE if rule is None else f"delete it and rerun rule {rule}"


class _Check:
    """Errors of one store, all naming the file and saying what to do."""

    def __init__(self, path, f: h5py.File, kind: str):
        self.path, self.advice = path, _advice(f, kind)
        self.digests: Mapping[str, str] = {}
        self.stats: Mapping = {}

    def error(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {what}: {self.advice}")

    def missing(self, key: str, detail: str = "") -> CheckpointError:
        return self.error(f"key {key!r} missing{detail} (the file is incomplete)")

    def unlisted(self, name: str, where: str = "") -> CheckpointError:
        return self.error(f"key {name!r}{where} is not in the manifest (the file was changed "
                          "after it was written)")

    def dataset(self, obj, key: str, rec: Mapping, detail: str = "") -> None:
        if not isinstance(obj, h5py.Dataset):
            raise self.missing(key, detail)
        shape, dtype, stored = tuple(rec["shape"]), rec["dtype"], rec["stored"]
        try:
            got = (tuple(obj.shape), tuple(int(n) for n in obj.attrs["shape"]), str(obj.attrs["dtype"]),
                   obj.dtype.name)
        except (KeyError, OSError, TypeError) as exc:
            raise self.error(f"key {key!r}{detail} is damaged ({exc})") from exc
        if got != (shape, shape, dtype, stored):
            raise self.error(f"key {key!r}{detail} has shape {got[1]}, dtype {got[2]} (stored "
                             f"{got[0]}, {got[3]}), the manifest records {shape}, {dtype} (stored "
                             f"{stored}) (the file is damaged)")

    def data(self, ds: h5py.Dataset, data: np.ndarray) -> None:
        """The data read from ``ds`` against the sha256 the manifest records for it."""
        name = ds.name.lstrip("/")
        want = self.digests.get(name)
        if want is not None and _data_sha256(data) != want:
            parts = name.split("/")
            what = (f"key {parts[1]!r} factor {parts[3]!r} of row block {parts[2]}"
                    if parts[0] == "factors" and len(parts) == 4 else f"key {parts[-1]!r}")
            raise self.error(f"{what}: the data do not match the sha256 in the manifest (the file "
                             "is damaged)")

    def members(self, group: h5py.Group, listed, where: str = "") -> None:
        listed = set(listed)
        for name in group.keys():
            if name not in listed:
                raise self.unlisted(name, where)


def _verify(f: h5py.File, path, kind: str) -> tuple[dict, _Check]:
    """The manifest's entries after checking the file against them."""
    check = _Check(path, f, kind)
    if MANIFEST not in f:
        raise check.error("no manifest (the file is incomplete, or was written before submerge "
                          "recorded manifests)")
    try:
        manifest = json.loads(f[MANIFEST].asstr()[()])
        entries = manifest["entries"]
        digests = manifest.get("data_sha256", {})
        stats = manifest.get("stats", {})
        ok = (manifest["format"] == _MANIFEST_FORMAT and manifest["version"] == _MANIFEST_VERSION
              and manifest["entries_sha256"] == _entries_digest(entries)
              and manifest["n_datasets"] == _count(manifest["kind"], entries)
              and isinstance(digests, dict) and all(isinstance(v, str) for v in digests.values())
              and ("stats" not in manifest or (isinstance(stats, dict)
                                               and manifest["stats_sha256"] == _entries_digest(stats))))
    except (OSError, KeyError, TypeError, AttributeError, ValueError, RuntimeError) as exc:
        raise check.error(f"unreadable manifest ({type(exc).__name__}: {exc})") from exc
    if not ok:
        raise check.error("corrupt manifest (format, checksum or dataset count does not match)")
    check.digests = digests
    check.stats = stats
    if manifest["kind"] != kind:
        names = {"state_dict": "a task-vector (state dict) store", "factored": "a factored store"}
        raise CheckpointError(f"HDF5 store {path} is {names.get(manifest['kind'], manifest['kind'])}, "
                              f"not {names[kind]}")
    if kind == "state_dict":
        for key, rec in entries.items():
            check.dataset(f.get(key), key, rec)
        check.members(f, [*entries, MANIFEST])
        return entries, check
    for group in ("dense", "factors"):
        if not isinstance(f.get(group), h5py.Group):
            raise check.error(f"group {group!r} missing (the file is incomplete)")
    check.members(f, ["dense", "factors", MANIFEST])
    for key, rec in entries["dense"].items():
        check.dataset(f["dense"].get(key), key, rec)
    check.members(f["dense"], entries["dense"], " (dense)")
    for key, rec in entries["factors"].items():
        group = f["factors"].get(key)
        if not isinstance(group, h5py.Group):
            raise check.missing(key)
        n_blocks = int(rec["n_blocks"])
        try:
            recorded = int(group.attrs["n_blocks"])
        except (KeyError, OSError, TypeError, ValueError) as exc:
            raise check.error(f"key {key!r} is damaged ({exc})") from exc
        if recorded != n_blocks:
            raise check.error(f"key {key!r} has {recorded} row blocks, the manifest records {n_blocks}")
        for i, block_rec in enumerate(rec["blocks"]):
            block = group.get(str(i))
            if not isinstance(block, h5py.Group):
                raise check.missing(key, f" row block {i}")
            for name in _FACTOR_NAMES:
                check.dataset(block.get(name), key, block_rec[name], f" factor {name!r} of row block {i}")
            check.members(block, _FACTOR_NAMES, f" (in row block {i} of key {key!r})")
        check.members(group, [str(i) for i in range(n_blocks)], f" (a row block of key {key!r})")
    check.members(f["factors"], entries["factors"], " (factors)")
    return entries, check


@contextlib.contextmanager
def _reading(path, f: h5py.File, kind: str) -> Iterator[None]:
    """Errors of h5py while checking or reading a store (a damaged file) as CheckpointError."""
    try:
        yield
    except CheckpointError:
        raise
    except _H5_ERRORS as exc:
        raise CheckpointError(f"{path}: cannot read ({type(exc).__name__}: {exc}); the file is "
                              f"damaged: {_advice(f, kind)}") from exc


# --- stores --------------------------------------------------------------------------------

class StoreWriter:
    """A store written one key at a time, for memory flat in the model's size: a task-vector
    store (``kind="state_dict"``: :meth:`dense` only) or a factored store (``kind="factored"``:
    :meth:`dense` and :meth:`factors`). Use as a context manager: the file is written under a
    temporary name, its attributes (:attr:`attrs`, which may be filled while writing) and
    manifest are written on a clean exit, and only then is it renamed to ``path``; on an
    exception nothing is left behind. :func:`write_state_dict` and :func:`write_factored`
    write whole dicts through it."""

    def __init__(self, path: str | os.PathLike, kind: str, layer_info: Mapping[str, LayerInfo],
                 attrs: Mapping | None = None, stats: Mapping | None = None):
        if kind not in ("state_dict", "factored"):
            raise ValueError(f"unknown store kind {kind!r}")
        self.path, self.kind, self.layer_info = path, kind, layer_info
        self.attrs = dict(attrs or {})
        self.stats = stats
        self._digests: dict[str, str] = {}
        self._entries: dict = {} if kind == "state_dict" else {"dense": {}, "factors": {}}
        # where dense parameters go: the file's root and manifest entries of a task-vector store
        self._dense_entries = self._entries if kind == "state_dict" else self._entries["dense"]

    def __enter__(self) -> "StoreWriter":
        self._atomic = atomic_path(self.path)
        tmp = self._atomic.__enter__()
        try:
            self._file = self._dense = _open(tmp, "w")
            if self.kind == "factored":
                self._dense = self._file.create_group("dense", track_order=True)
                self._factors = self._file.create_group("factors", track_order=True)
        except BaseException:
            self._atomic.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            try:
                _write_attrs(self._file, self.attrs)
                _write_manifest(self._file, self.kind, self._entries, self._digests, self.stats)
            except BaseException:
                self._file.close()
                self._atomic.__exit__(*sys.exc_info())
                raise
        self._file.close()
        return bool(self._atomic.__exit__(exc_type, exc, tb))

    def dense(self, key: str, tensor: torch.Tensor) -> None:
        """One parameter as a dense tensor (every parameter of a task-vector store)."""
        _check_key(key, self.layer_info, self.path)
        ds, self._dense_entries[key] = _write_tensor(self._dense, key, tensor, self._digests)
        _info_attrs(ds, self.layer_info[key])

    def factors(self, key: str, blocks: Factors) -> None:
        """One parameter of a factored store as its row blocks' ``(U, S, Vh)``."""
        if self.kind != "factored":
            raise ValueError(f"{self.path}: a task-vector store holds dense parameters only")
        _check_key(key, self.layer_info, self.path)
        group = self._factors.create_group(key)
        _info_attrs(group, self.layer_info[key])
        group.attrs["n_blocks"] = len(blocks)
        records = []
        for i, block in enumerate(blocks):
            if len(block) != 3:
                raise ValueError(f"{self.path}: factors of key {key!r}, block {i}: expected (U, S, Vh)")
            sub = group.create_group(str(i))
            records.append({name: _write_tensor(sub, name, tensor, self._digests)[1]
                            for name, tensor in zip(_FACTOR_NAMES, block)})
        self._entries["factors"][key] = {"n_blocks": len(blocks), "blocks": records}


def write_state_dict(path: str | os.PathLike, sd: Mapping[str, torch.Tensor],
                     layer_info: Mapping[str, LayerInfo], attrs: Mapping,
                     stats: Mapping | None = None) -> None:
    """Write a (task-vector) state dict, one dataset per key, and its manifest, atomically.
    ``stats``: JSON-serialisable summaries kept in the manifest under its checksum (a task
    vector's TIES thresholds, :data:`TIES_THRESHOLDS`)."""
    with StoreWriter(path, "state_dict", layer_info, attrs, stats) as writer:
        for key, tensor in sd.items():
            writer.dense(key, tensor)


def read_state_dict(path: str | os.PathLike, keys: Sequence[str] | None = None
                    ) -> tuple[StateDict, dict[str, LayerInfo], dict]:
    """``(state_dict, layer_info, attrs)`` of a store, all keys or only ``keys``.

    The whole store is checked against its manifest first (any subset read)."""
    with _open(path, "r") as f, _reading(path, f, "state_dict"):
        entries, check = _verify(f, path, "state_dict")
        names = list(entries) if keys is None else list(keys)
        sd, info = {}, {}
        for key in names:
            if key not in entries:
                raise CheckpointError(f"HDF5 store {path} has no parameter {key!r}")
            sd[key] = _read_tensor(f[key], check)
            info[key] = _read_info(f[key])
        return sd, info, _read_attrs(f)


def read_key(paths: Sequence[str | os.PathLike], key: str) -> list[torch.Tensor]:
    """One parameter from each of many stores, reading no other data (each store is checked
    against its manifest)."""
    out = []
    for path in paths:
        with _open(path, "r") as f, _reading(path, f, "state_dict"):
            entries, check = _verify(f, path, "state_dict")
            if key not in entries:
                raise CheckpointError(f"HDF5 store {path} has no parameter {key!r}")
            out.append(_read_tensor(f[key], check))
    return out


TIES_THRESHOLDS = "ties_thresholds"  # stats key: {"<k>": threshold} (merging.ties.threshold_table)


def _ties_table(check: "_Check") -> dict[str, float] | None:
    """A store's recorded TIES thresholds, checked (every percentage of
    ``merging.ties.TABLE_PERCENTS``, finite, >= 0, not increasing in k); None if not recorded."""
    from submerge.merging.ties import TABLE_PERCENTS

    table = check.stats.get(TIES_THRESHOLDS)
    if table is None:
        return None
    try:
        values = [float(table[str(k)]) for k in TABLE_PERCENTS]
    except (KeyError, TypeError, ValueError) as exc:
        raise check.error(f"the recorded TIES thresholds are incomplete ({exc!r})") from exc
    if (len(table) != len(TABLE_PERCENTS) or not all(np.isfinite(v) and v >= 0 for v in values)
            or any(a < b for a, b in zip(values, values[1:]))):
        raise check.error("the recorded TIES thresholds are not finite, non-negative and "
                          "non-increasing in k (the file is damaged)")
    return dict(zip((str(k) for k in TABLE_PERCENTS), values))


_MALLOC_TRIM: object = None  # glibc's malloc_trim, False where there is none


def trim_heap() -> None:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim(0)``; a no-op elsewhere).

    A merge streaming parameters allocates and frees tensors of a few MiB per key. glibc serves
    them from its heap once freed blocks of that size exist (its mmap threshold adapts upwards)
    and keeps freed pages mapped, so without this the merge stage's RSS grows key by key with
    fragmentation: 1.92 GiB instead of 0.76 GiB peak RSS for Consensus on ViT-B/32 at N = 20
    (``bench/real_shape.md``)."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


class TaskVectorFiles(TaskVectorSource):
    """Task-vector stores opened once, each checked against its manifest, and read one
    parameter at a time (a :class:`submerge.merging.source.TaskVectorSource` the merge rules
    stream from: :meth:`read` gives a key as a sequence read one store at a time on access).
    Every dataset read is checked against its sha256. Use as a
    context manager (or call :meth:`close`).

    The stores must hold the same float keys with the same shapes and dtypes
    (:class:`CheckpointError` naming the files otherwise); ``layer_info`` is the first store's.
    ``reads`` counts the tensors read (what a test of the streaming looks at)."""

    progress = True

    def __init__(self, paths: Sequence[str | os.PathLike], device: torch.device | str = "cpu"):
        if len(paths) == 0:
            raise ValueError("no task vectors given: need at least one expert")
        self.paths = [str(p) for p in paths]
        self.device = torch.device(device)
        self.reads = 0
        self._files: list[h5py.File] = []
        self._checks: list[_Check] = []
        self._tables: list[dict[str, float] | None] = []
        try:
            entries = []
            for path in self.paths:
                f = _open(path, "r")
                self._files.append(f)
                with _reading(path, f, "state_dict"):
                    ent, check = _verify(f, path, "state_dict")
                    self._tables.append(_ties_table(check))
                entries.append(ent)
                self._checks.append(check)
            self._entries = entries[0]
            self.keys = sorted(self._entries)
            for path, ent in zip(self.paths, entries):
                self._check_same(path, ent)
            with _reading(self.paths[0], self._files[0], "state_dict"):
                self.layer_info = {key: _read_info(self._files[0][key]) for key in self.keys}
        except BaseException:
            self.close()
            raise

    def _check_same(self, path: str, ent: Mapping) -> None:
        first = self.paths[0]
        if set(ent) != set(self._entries):
            diff = sorted(set(ent) ^ set(self._entries))[:5]
            raise CheckpointError(f"task vectors {path} and {first} differ in key(s) {diff}")
        for key in self.keys:
            a, b = ent[key], self._entries[key]
            if (a["shape"], a["dtype"]) != (b["shape"], b["dtype"]):
                raise CheckpointError(f"{path}, key {key!r}: {tuple(a['shape'])}/{a['dtype']} differs "
                                      f"from {first} ({tuple(b['shape'])}/{b['dtype']})")
            if not getattr(torch, a["dtype"]).is_floating_point:
                raise CheckpointError(f"{path}, key {key!r}: dtype {a['dtype']} is not a float dtype")

    def __len__(self) -> int:
        return len(self.paths)

    def meta(self, key: str) -> tuple[torch.Size, torch.dtype]:
        rec = self._entries[key]
        return torch.Size(rec["shape"]), getattr(torch, rec["dtype"])

    def iter_keys(self, desc: str) -> Iterator[str]:
        """The keys in sorted order (progress bar); after each key, the memory its tensors used is
        given back to the OS (:func:`trim_heap`)."""
        for key in super().iter_keys(desc):
            yield key
            trim_heap()

    def read_one(self, index: int, key: str) -> torch.Tensor:
        path, f = self.paths[index], self._files[index]
        if key not in self._entries:
            raise CheckpointError(f"HDF5 store {path} has no parameter {key!r}")
        with _reading(path, f, "state_dict"):
            tensor = _read_tensor(f[key], self._checks[index])
        self.reads += 1
        return tensor.to(self.device)

    def attrs(self, index: int) -> dict:
        """The file attributes of store ``index``."""
        with _reading(self.paths[index], self._files[index], "state_dict"):
            return _read_attrs(self._files[index])

    def ties_thresholds(self, k: float) -> list[torch.Tensor | None] | None:
        """The recorded thresholds when every store has them and ``k`` is tabulated."""
        from submerge.merging.ties import _flat_dtype, threshold_from_table

        if any(t is None for t in self._tables):
            return None
        dtype = _flat_dtype(self.meta(key)[1] for key in self.keys)
        try:
            return [threshold_from_table(t, k, dtype, self.device) for t in self._tables]
        except KeyError:
            return None

    def close(self) -> None:
        for f in self._files:
            try:
                f.close()
            except Exception:  # noqa: BLE001 - closing a damaged file
                pass
        self._files = []

    def __enter__(self) -> "TaskVectorFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_factored(path: str | os.PathLike, dense: Mapping[str, torch.Tensor], factors: Mapping[str, Factors],
                   layer_info: Mapping[str, LayerInfo], attrs: Mapping) -> None:
    """Write a merged task vector as dense tensors plus per-key SVD row-block factors, and its
    manifest, atomically (the merge stage writes key by key through :class:`StoreWriter`)."""
    with StoreWriter(path, "factored", layer_info, attrs) as writer:
        for key, tensor in dense.items():
            writer.dense(key, tensor)
        for key, blocks in factors.items():
            writer.factors(key, blocks)


def read_factored(path: str | os.PathLike
                  ) -> tuple[StateDict, dict[str, Factors], dict[str, LayerInfo], dict]:
    """``(dense, factors, layer_info, attrs)`` of a factored store, checked against its manifest."""
    with _open(path, "r") as f, _reading(path, f, "factored"):
        entries, check = _verify(f, path, "factored")
        dense, factors, info = {}, {}, {}
        for key in entries["dense"]:
            ds = f["dense"][key]
            dense[key] = _read_tensor(ds, check)
            info[key] = _read_info(ds)
        for key, rec in entries["factors"].items():
            group = f["factors"][key]
            info[key] = _read_info(group)
            factors[key] = [tuple(_read_tensor(group[str(i)][name], check) for name in _FACTOR_NAMES)
                            for i in range(int(rec["n_blocks"]))]
        return dense, factors, info, _read_attrs(f)
