"""Safe checkpoint loading and normalised checkpoint storage.

* :func:`load_checkpoint` reads safetensors, or pickled checkpoints with
  ``torch.load(weights_only=True)``. A file that needs full pickle (a whole ``nn.Module``
  saved with ``torch.save``, like the TALL-masks heads or the task_vectors experts) can run
  arbitrary code when loaded; it loads only with ``trust_pickle=True`` **and** a pinned
  ``sha256``.
* :func:`save_normalized` / :func:`load_normalized`: the normalised form of a checkpoint,
  a safetensors file plus a JSON sidecar (``path.with_suffix(".json")``) holding the
  caller's metadata and the written file's sha256, dtype and parameter count, and
  ``sidecar_sha256``, the sha256 of the sidecar's other fields (a changed digit in it is
  caught; sidecars written before it was recorded have none).
* :func:`save_safetensors`: every ``.safetensors`` result is written through it (serialised
  in memory, then written by :mod:`submerge.io.atomic`: no temporary file of the
  safetensors library, and the umask's file mode).

A normalised checkpoint that cannot be read (a garbage or changed sidecar, a truncated or
garbage safetensors file, a hash mismatch) raises :class:`CheckpointError` naming the file and
the workflow rule to rerun.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import types
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as _safetensors_bytes

from submerge.errors import CheckpointError
from submerge.io.atomic import sha256_file, write_bytes_atomic, write_text_atomic

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
_RESERVED_META = ("sha256", "dtype", "n_params", "sidecar_sha256")


def sidecar_digest(sidecar: Mapping) -> str:
    """sha256 of a sidecar's fields other than ``sidecar_sha256`` (canonical JSON)."""
    body = {k: v for k, v in sidecar.items() if k != "sidecar_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str, what: str | None = None) -> None:
    """CheckpointError naming the file (or ``what``) and both hashes unless its sha256 is ``expected``."""
    actual = sha256_file(path)
    if actual != str(expected).strip().lower():
        raise CheckpointError(f"sha256 mismatch for {what or path}: expected {expected}, got {actual}")


def _stub_pickle_module() -> types.ModuleType:
    """A ``pickle`` stand-in whose Unpickler replaces classes it cannot import by stub modules.

    Whole-module checkpoints refer to their authors' classes (e.g. ``src.models.heads.
    ClassificationHead``); a stub ``nn.Module`` subclass receives the pickled ``__dict__``,
    which is all ``state_dict()`` needs.
    """

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            try:
                return super().find_class(module, name)
            except (ImportError, AttributeError):
                log.warning("class %s.%s is not importable; loading it as a stub nn.Module", module, name)
                return type(name, (torch.nn.Module,), {"__module__": module})

    shim = types.ModuleType("submerge_stub_pickle")
    shim.Unpickler = Unpickler
    shim.load = lambda file, **kwargs: Unpickler(file, **kwargs).load()
    return shim


def _as_state_dict(obj, path: Path) -> StateDict:
    """State dict of a loaded object: a module's ``state_dict()``, a nested ``state_dict``, or itself."""
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), (Mapping, torch.nn.Module)):
        return _as_state_dict(obj["state_dict"], path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict or an nn.Module, got {type(obj).__name__}")
    out: StateDict = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        out[key] = value
    return out


def load_checkpoint(path: str | os.PathLike, *, trust_pickle: bool = False, sha256: str | None = None) -> StateDict:
    """Load a checkpoint file as a state dict on CPU.

    ``.safetensors`` files are read directly; anything else with
    ``torch.load(weights_only=True)``. If the file needs full pickle, it is loaded only when
    ``trust_pickle`` is true and ``sha256`` is pinned (and matches). A loaded ``nn.Module``
    gives its ``state_dict()``; ``{"state_dict": ...}`` is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if sha256 is not None:
        verify_sha256(path, sha256)
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"cannot read safetensors checkpoint {path}: {exc}") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
        if not (trust_pickle and sha256):
            raise CheckpointError(
                f"checkpoint {path} needs full pickle to load (it is not a plain state dict; "
                f"{str(exc).splitlines()[0]}). Full pickle can execute arbitrary code, so it is off "
                "by default: to load this file, opt in for its source with trust_pickle: true AND "
                "pin its sha256."
            ) from None
        log.warning("loading %s with full pickle (trust_pickle, sha256 %s verified)", path, sha256)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_stub_pickle_module())
        except Exception as exc:  # anything the pickled code raises
            raise CheckpointError(f"cannot unpickle checkpoint {path}: {exc}") from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    return _as_state_dict(obj, path)


def _safetensors_ready(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Contiguous CPU tensors, each owning its storage (tied or shared tensors are cloned)."""
    seen: set[int] = set()
    out: StateDict = {}
    for key, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"state dict entry {key!r} is a {type(tensor).__name__}, not a tensor")
        t = tensor.detach().cpu()
        storage = t.untyped_storage()
        owns_storage = t.is_contiguous() and t.numel() * t.element_size() == storage.nbytes()
        if not owns_storage or storage.data_ptr() in seen:
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> str:
    """Write ``tensors`` (contiguous CPU tensors) to ``path`` as safetensors, atomically; its sha256.

    The bytes are those of ``safetensors.torch.save_file`` (same serialiser), built in
    memory and written through :func:`submerge.io.atomic.write_bytes_atomic`: the file gets
    the umask's mode (``save_file`` writes a 0600 temporary of its own and renames it), and
    a killed job leaves only temporaries that :func:`~submerge.io.atomic.clean_stale_temporaries`
    recognises. Needs memory for one serialised copy.
    """
    data = _safetensors_bytes(dict(tensors), metadata=None if metadata is None else dict(metadata))
    write_bytes_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def save_normalized(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, meta: dict) -> None:
    """Write ``state_dict`` to ``path`` (safetensors) and ``meta`` to its JSON sidecar, atomically.

    The sidecar holds ``meta`` plus ``sha256`` (of the written file), ``dtype`` (the tensors'
    dtype names, comma-joined when mixed), ``n_params`` and ``sidecar_sha256`` (of the
    sidecar's other fields); those names may not be in ``meta``.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_normalized writes .safetensors files, got {path}")
    clash = [k for k in _RESERVED_META if k in meta]
    if clash:
        raise ValueError(f"meta field {clash[0]!r} is reserved for the written file's own {clash[0]}")
    try:
        json.dumps(meta)
    except TypeError as exc:
        raise ValueError(f"meta for {path} is not JSON-serialisable: {exc}") from exc
    tensors = _safetensors_ready(state_dict)
    digest = save_safetensors(tensors, path, metadata={"format": "pt"})
    sidecar = {
        **meta,
        "sha256": digest,
        "dtype": ",".join(sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})),
        "n_params": sum(t.numel() for t in tensors.values()),
    }
    sidecar["sidecar_sha256"] = sidecar_digest(sidecar)
    write_text_atomic(path.with_suffix(".json"), json.dumps(sidecar, indent=2, sort_keys=True) + "\n")


def _normalized_rule(path: Path, meta: object = None) -> str:
    """What to do about a broken normalised checkpoint: the rule that wrote it, from its
    sidecar's fields or else from where it lies (``models/base``, ``models/experts/*``)."""
    rule = None
    if isinstance(meta, Mapping):
        if meta.get("model") == "base":
            rule = "base_model"
        elif isinstance(meta.get("model"), str):
            rule = "expert_model"
        elif "method" in meta and "group" in meta:
            rule = "sweep"
    if rule is None:
        if path.name == "base.safetensors" and path.parent.name == "models":
            rule = "base_model"
        elif path.parent.name == "experts" and path.parent.parent.name == "models":
            rule = "expert_model"
    if rule is None:
        return f"delete {path} and rerun the rule that wrote it"
    return f"delete {path} and rerun (rule {rule})"


def load_normalized(path: str | os.PathLike, *, verify: bool = True) -> tuple[StateDict, dict]:
    """Read a checkpoint written by :func:`save_normalized`: ``(state_dict, sidecar)``.

    With ``verify`` the file's sha256 is checked against the sidecar. Any unreadable part
    raises :class:`CheckpointError` naming the file and the rule to rerun.
    """
    path = Path(path)
    sidecar_path = path.with_suffix(".json")
    if not path.is_file():
        raise CheckpointError(f"normalised checkpoint {path} does not exist")
    if not sidecar_path.is_file():
        raise CheckpointError(f"normalised checkpoint {path} has no sidecar {sidecar_path}: "
                              f"{_normalized_rule(path)}")
    try:
        meta = json.loads(sidecar_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{sidecar_path}: cannot read the sidecar of {path} ({exc}): "
                              f"{_normalized_rule(path)}") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{sidecar_path}: the sidecar of {path} is not a JSON object: "
                              f"{_normalized_rule(path)}")
    if "sidecar_sha256" in meta and meta["sidecar_sha256"] != sidecar_digest(meta):
        raise CheckpointError(f"{sidecar_path}: the sidecar of {path} was changed after it was "
                              f"written (its sidecar_sha256 does not match): {_normalized_rule(path)}")
    advice = _normalized_rule(path, meta)
    if verify:
        if "sha256" not in meta:
            raise CheckpointError(f"sidecar {sidecar_path} has no field 'sha256': {advice}")
        try:
            verify_sha256(path, meta["sha256"])
        except CheckpointError as exc:
            raise CheckpointError(f"{exc} (the file is truncated or corrupt): {advice}") from exc
    try:
        return load_file(path), meta
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read safetensors checkpoint {path} ({exc}): {advice}") from exc
