"""Checkpoint loading (safe by default), full-pickle opt-in, normalised save/load."""

from __future__ import annotations

import hashlib
import json
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

from submerge.errors import CheckpointError
from submerge.io.checkpoints import load_checkpoint, load_normalized, save_normalized, sha256_file


def _sd():
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(3, 4, generator=g), "a.bias": torch.randn(3, generator=g),
            "half": torch.randn(2, 2, generator=g).half()}


def _assert_sd_equal(got, want):
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


def test_sha256_file(tmp_path):
    path = tmp_path / "x.bin"
    data = bytes(range(256)) * 5000  # > one 1 MiB read chunk
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".pth"])
def test_load_state_dict_pickles(tmp_path, suffix):
    sd = _sd()
    path = tmp_path / f"ckpt{suffix}"
    torch.save(sd, path)
    _assert_sd_equal(load_checkpoint(path), sd)
    nested = tmp_path / f"nested{suffix}"
    torch.save({"state_dict": sd, "epoch": 3}, nested)
    _assert_sd_equal(load_checkpoint(nested), sd)


def test_load_safetensors_and_hash_check(tmp_path):
    sd = _sd()
    path = tmp_path / "ckpt.safetensors"
    save_file(sd, path)
    digest = sha256_file(path)
    _assert_sd_equal(load_checkpoint(path, sha256=digest), sd)
    _assert_sd_equal(load_checkpoint(path, sha256=digest.upper()), sd)
    wrong = "0" * 64
    with pytest.raises(CheckpointError, match=rf"ckpt\.safetensors.*{wrong}.*{digest}"):
        load_checkpoint(path, sha256=wrong)


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(CheckpointError, match="nothere.pt"):
        load_checkpoint(tmp_path / "nothere.pt")
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_checkpoint(bad)
    bad_st = tmp_path / "garbage.safetensors"
    bad_st.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="garbage.safetensors"):
        load_checkpoint(bad_st)
    notsd = tmp_path / "list.pt"
    torch.save([torch.ones(1)], notsd)
    with pytest.raises(CheckpointError, match="list.pt"):
        load_checkpoint(notsd)
    mixed = tmp_path / "mixed.pt"
    torch.save({"w": torch.ones(1), "step": 3}, mixed)
    with pytest.raises(CheckpointError, match="'step'"):
        load_checkpoint(mixed)


@pytest.fixture
def whole_module_file(tmp_path):
    """A whole nn.Module saved by torch.save whose class is later not importable (like TALL-masks heads)."""
    mod = types.ModuleType("submerge_fake_heads")

    class ClassificationHead(torch.nn.Linear):
        pass

    ClassificationHead.__module__ = mod.__name__
    ClassificationHead.__qualname__ = "ClassificationHead"
    mod.ClassificationHead = ClassificationHead
    sys.modules[mod.__name__] = mod
    try:
        torch.manual_seed(0)
        head = ClassificationHead(4, 3)
        path = tmp_path / "head_MNISTVal.pt"
        torch.save(head, path)
        want = {k: v.clone() for k, v in head.state_dict().items()}
    finally:
        del sys.modules[mod.__name__]
    return path, want


def test_full_pickle_needs_opt_in_and_hash(whole_module_file):
    path, want = whole_module_file
    digest = sha256_file(path)
    for kwargs in ({}, {"trust_pickle": True}, {"sha256": digest}):
        with pytest.raises(CheckpointError, match=r"head_MNISTVal\.pt.*trust_pickle.*sha256"):
            load_checkpoint(path, **kwargs)
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_checkpoint(path, trust_pickle=True, sha256="1" * 64)
    got = load_checkpoint(path, trust_pickle=True, sha256=digest)  # class stubbed, weights intact
    _assert_sd_equal(got, want)


def test_full_pickle_importable_module(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    path = tmp_path / "finetuned.pt"
    torch.save(model, path)
    got = load_checkpoint(path, trust_pickle=True, sha256=sha256_file(path))
    _assert_sd_equal(got, model.state_dict())


def test_save_normalized_round_trip(tmp_path):
    shared = torch.randn(5, 3)
    big = torch.randn(4, 6)
    sd = {
        "shared.weight": shared,
        "encoder.embed_tokens.weight": shared,  # tied
        "view": big[:, :3],  # a non-contiguous view of a larger storage
        "bf": torch.randn(2, 2).bfloat16(),
    }
    path = tmp_path / "models" / "base.safetensors"
    save_normalized(sd, path, {"source": {"hub": {"repo": "x/y"}}, "arch": {"model": "ViT-B-32"}})
    got, meta = load_normalized(path)
    _assert_sd_equal(got, {k: v.contiguous() for k, v in sd.items()})
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar == meta
    assert meta["sha256"] == sha256_file(path)
    assert meta["n_params"] == sum(v.numel() for v in sd.values())
    assert meta["dtype"] == "bfloat16,float32"
    assert meta["source"] == {"hub": {"repo": "x/y"}} and meta["arch"] == {"model": "ViT-B-32"}
    assert sorted(p.name for p in path.parent.iterdir()) == ["base.json", "base.safetensors"]
    # corruption is caught against the sidecar's hash
    path.write_bytes(path.read_bytes()[:-1] + b" ")
    with pytest.raises(CheckpointError, match="base.safetensors"):
        load_normalized(path)


def test_save_normalized_checks(tmp_path):
    with pytest.raises(ValueError, match="safetensors"):
        save_normalized(_sd(), tmp_path / "x.pt", {})
    with pytest.raises(ValueError, match="'sha256'"):
        save_normalized(_sd(), tmp_path / "x.safetensors", {"sha256": "abc"})
    with pytest.raises(ValueError, match="JSON"):
        save_normalized(_sd(), tmp_path / "x.safetensors", {"arch": object()})
    path = tmp_path / "y.safetensors"
    save_file(_sd(), path)
    with pytest.raises(CheckpointError, match=r"y\.json"):
        load_normalized(path)
    assert not (tmp_path / "x.safetensors").exists()


# --- unreadable normalised checkpoints name the file and the rule to rerun ------------------

@pytest.mark.parametrize("where, rule", [("models/base.safetensors", "base_model"),
                                         ("models/experts/mnist.safetensors", "expert_model")])
@pytest.mark.parametrize("sidecar", ["{not json", "", "\xff\xfe", "[1, 2]"])
def test_load_normalized_garbage_sidecar(tmp_path, where, rule, sidecar):
    path = tmp_path / where
    save_normalized(_sd(), path, {"suite": "s"})
    path.with_suffix(".json").write_bytes(sidecar.encode("latin-1"))
    with pytest.raises(CheckpointError, match=rf"{path.stem}\.json.*delete .*{path.name} and rerun "
                                              rf"\(rule {rule}\)"):
        load_normalized(path)


@pytest.mark.parametrize("where, rule", [("models/base.safetensors", "base_model"),
                                         ("models/experts/mnist.safetensors", "expert_model")])
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_load_normalized_truncated_or_garbage_safetensors(tmp_path, where, rule, damage):
    path = tmp_path / where
    save_normalized(_sd(), path, {"suite": "s"})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00" * 16)
    message = rf"{path.name}.*delete .*{path.name} and rerun \(rule {rule}\)"
    with pytest.raises(CheckpointError, match=message):  # hash mismatch
        load_normalized(path)
    with pytest.raises(CheckpointError, match=message):  # unreadable
        load_normalized(path, verify=False)
    # a sidecar whose hash matches the damaged file: the reader still names it
    sidecar = json.loads(path.with_suffix(".json").read_text())
    path.with_suffix(".json").write_text(json.dumps({**sidecar, "sha256": sha256_file(path)}))
    with pytest.raises(CheckpointError, match=message):
        load_normalized(path)


def test_load_normalized_rule_from_the_sidecar(tmp_path):
    path = tmp_path / "elsewhere" / "m.safetensors"
    save_normalized(_sd(), path, {"model": "base"})
    path.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match=r"rerun \(rule base_model\)"):
        load_normalized(path)
    save_normalized(_sd(), path, {"group": "n8", "method": "ta"})
    path.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match=r"rerun \(rule sweep\)"):
        load_normalized(path)
    save_normalized(_sd(), path, {})
    path.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="rerun the rule that wrote it"):
        load_normalized(path)


def test_save_safetensors_writes_the_bytes_of_save_file(tmp_path):
    from submerge.io.checkpoints import save_safetensors

    sd = _sd()
    save_file(sd, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    digest = save_safetensors(sd, tmp_path / "ours.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert digest == sha256_file(tmp_path / "ref.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.safetensors", "ref.safetensors"]
