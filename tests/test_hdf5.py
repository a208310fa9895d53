"""HDF5 stores: round trips, atomic writes, per-key reads, errors naming file and key."""

from __future__ import annotations

import json
import re

import h5py
import numpy as np
import pytest
import torch

from submerge.errors import CheckpointError
from submerge.io import hdf5
from submerge.layers import LayerInfo


def _task_vector(dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sd = {
        "conv1.weight": torch.randn(4, 3, 2, 2, generator=g),
        "transformer.resblocks.0.attn.in_proj_weight": torch.randn(12, 4, generator=g),
        "transformer.resblocks.0.attn.in_proj_bias": torch.randn(12, generator=g),
        "transformer.resblocks.1.mlp.c_fc.weight": torch.randn(8, 4, generator=g),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(0.5),
    }
    sd = {k: v.to(dtype) for k, v in sd.items()}
    info = {
        "conv1.weight": LayerInfo(None, "embed"),
        "transformer.resblocks.0.attn.in_proj_weight": LayerInfo(0, "attn", 3),
        "transformer.resblocks.0.attn.in_proj_bias": LayerInfo(0, "other"),
        "transformer.resblocks.1.mlp.c_fc.weight": LayerInfo(1, "mlp"),
        "empty": LayerInfo(None, "other"),
        "scalar": LayerInfo(None, "other"),
    }
    return sd, info


ATTRS = {"suite": "digits", "expert": "parity", "base_sha256": "ab" * 32, "n": 3, "scale": 0.5,
         "flag": True, "experts": ["a", "b"], "extra": {"k": [1, 2]}, "none": None}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_state_dict_round_trip(tmp_path, dtype):
    sd, info = _task_vector(dtype)
    path = tmp_path / "tv.h5"
    hdf5.write_state_dict(path, sd, info, ATTRS)
    sd2, info2, attrs2 = hdf5.read_state_dict(path)
    assert list(sd2) == list(sd)  # order kept
    for key in sd:
        assert sd2[key].dtype == dtype and sd2[key].shape == sd[key].shape
        assert torch.equal(sd2[key], sd[key]), key
    assert info2 == info
    assert attrs2 == ATTRS
    if dtype == torch.bfloat16:  # stored as float32 data with the dtype attribute
        with h5py.File(path, "r") as f:
            assert f["conv1.weight"].dtype == "float32"
            assert f["conv1.weight"].attrs["dtype"] == "bfloat16"


def test_read_subset_and_read_key(tmp_path):
    paths = []
    full = []
    for i in range(3):
        sd, info = _task_vector(torch.float32, seed=i)
        paths.append(tmp_path / f"tv{i}.h5")
        hdf5.write_state_dict(paths[-1], sd, info, {"expert": f"e{i}"})
        full.append(hdf5.read_state_dict(paths[-1])[0])
    key = "transformer.resblocks.1.mlp.c_fc.weight"
    got = hdf5.read_key(paths, key)
    assert len(got) == 3
    for tensor, sd in zip(got, full):
        assert torch.equal(tensor, sd[key])
    assert not torch.equal(got[0], got[1])  # really per file
    sub, sub_info, attrs = hdf5.read_state_dict(paths[1], keys=[key])
    assert list(sub) == [key] and torch.equal(sub[key], full[1][key])
    assert sub_info == {key: LayerInfo(1, "mlp")} and attrs == {"expert": "e1"}


def test_missing_file_and_key_are_named(tmp_path):
    sd, info = _task_vector(torch.float32)
    path = tmp_path / "tv.h5"
    hdf5.write_state_dict(path, sd, info, {})
    with pytest.raises(CheckpointError, match=r"tv\.h5.*'nope'"):
        hdf5.read_state_dict(path, keys=["nope"])
    with pytest.raises(CheckpointError, match=r"tv\.h5.*'nope'"):
        hdf5.read_key([path], "nope")
    with pytest.raises(CheckpointError, match="missing.h5"):
        hdf5.read_key([path, tmp_path / "missing.h5"], "scalar")
    with pytest.raises(CheckpointError, match="not a factored store"):
        hdf5.read_factored(path)


def test_write_is_atomic(tmp_path):
    sd, info = _task_vector(torch.float32)
    path = tmp_path / "tv.h5"

    class Boom(RuntimeError):
        pass

    class Exploding(dict):
        def items(self):
            yield from list(sd.items())[:2]
            raise Boom("killed mid-write")

    with pytest.raises(Boom):
        hdf5.write_state_dict(path, Exploding(), info, {"suite": "x"})
    assert list(tmp_path.iterdir()) == []
    # an existing file is left untouched by a failed rewrite
    hdf5.write_state_dict(path, sd, info, {"suite": "old"})
    with pytest.raises(ValueError, match="'unknown' has no layer_info"):
        hdf5.write_state_dict(path, {**sd, "unknown": torch.ones(2)}, info, {"suite": "new"})
    assert hdf5.read_state_dict(path)[2] == {"suite": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["tv.h5"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_factored_round_trip(tmp_path, dtype):
    g = torch.Generator().manual_seed(1)
    dense = {"conv1.weight": torch.randn(4, 3, 2, 2, generator=g).to(dtype),
             "ln.bias": torch.randn(4, generator=g).to(dtype)}

    def svd_blocks(m, n_blocks):
        return [torch.linalg.svd(b, full_matrices=False) for b in m.chunk(n_blocks, dim=0)]

    attn = torch.randn(12, 4, generator=g, dtype=torch.float64)
    factors = {
        "transformer.resblocks.0.attn.in_proj_weight": svd_blocks(attn, 3),
        "transformer.resblocks.0.mlp.c_fc.weight": svd_blocks(torch.randn(8, 4, generator=g), 1),
        "no_blocks": [],
    }
    factors = {k: [tuple(t.to(dtype) for t in b) for b in v] for k, v in factors.items()}
    info = {"conv1.weight": LayerInfo(None, "embed"), "ln.bias": LayerInfo(0, "norm"),
            "transformer.resblocks.0.attn.in_proj_weight": LayerInfo(0, "attn", 3),
            "transformer.resblocks.0.mlp.c_fc.weight": LayerInfo(0, "mlp"),
            "no_blocks": LayerInfo(2, "mlp")}
    path = tmp_path / "merged.h5"
    hdf5.write_factored(path, dense, factors, info, {"group": "n8", "method": "ta"})
    dense2, factors2, info2, attrs2 = hdf5.read_factored(path)
    assert attrs2 == {"group": "n8", "method": "ta"}
    assert info2 == info
    assert list(dense2) == list(dense) and all(torch.equal(dense2[k], dense[k]) for k in dense)
    assert set(factors2) == set(factors)
    for key, blocks in factors.items():
        assert len(factors2[key]) == len(blocks)
        for got, want in zip(factors2[key], blocks):
            assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(got, want))
    # the stored factors still rebuild the matrix (row blocks stacked)
    key = "transformer.resblocks.0.attn.in_proj_weight"
    rebuilt = torch.cat([(u.double() * s.double()) @ vh.double() for u, s, vh in factors2[key]])
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(rebuilt, attn, atol=tol, rtol=tol)


def test_factored_empty(tmp_path):
    path = tmp_path / "empty.h5"
    hdf5.write_factored(path, {}, {}, {}, {})
    assert hdf5.read_factored(path) == ({}, {}, {}, {})


# --- completeness: manifest, named errors ----------------------------------------------------

TV_ATTRS = {"suite": "digits", "expert": "parity", "adapter": "x", "base_sha256": "ab" * 32,
            "expert_sha256": "cd" * 32}
ATTN = "transformer.resblocks.0.attn.in_proj_weight"
MLP = "transformer.resblocks.1.mlp.c_fc.weight"


def _write_tv(path, attrs=TV_ATTRS):
    sd, info = _task_vector(torch.float32)
    hdf5.write_state_dict(path, sd, info, attrs)
    return sd


def _write_merged(path, attrs=None, dense=True):
    g = torch.Generator().manual_seed(2)
    sd, info = _task_vector(torch.float32)
    factors = {ATTN: [torch.linalg.svd(b, full_matrices=False) for b in sd[ATTN].chunk(3)],
               MLP: [torch.linalg.svd(sd[MLP], full_matrices=False)]}
    dense_sd = {"conv1.weight": torch.randn(4, 3, 2, 2, generator=g)} if dense else {}
    hdf5.write_factored(path, dense_sd, factors, info,
                        {"method": "tsvm", "experts": '["a", "b"]'} if attrs is None else attrs)


def _edit(path, fn):
    with h5py.File(path, "a") as f:
        fn(f)


def _missing(path, key, rule, detail=""):
    advice = f"rerun rule {rule}" if rule else "rerun the rule that wrote it"
    return re.escape(f"{path}: key {key!r} missing{detail} (the file is incomplete): delete it and {advice}")


def test_manifest_is_written_last(tmp_path):
    _write_tv(tmp_path / "tv.h5")
    _write_merged(tmp_path / "merged.h5")
    for name, kind, n in (("tv.h5", "state_dict", 6), ("merged.h5", "factored", 1 + 3 * 4)):
        with h5py.File(tmp_path / name, "r") as f:
            assert list(f.keys())[-1] == hdf5.MANIFEST  # created after every dataset
            manifest = json.loads(f[hdf5.MANIFEST].asstr()[()])
        assert manifest["kind"] == kind and manifest["n_datasets"] == n
    with h5py.File(tmp_path / "tv.h5", "r") as f:
        entries = json.loads(f[hdf5.MANIFEST].asstr()[()])["entries"]
    assert entries["conv1.weight"] == {"shape": [4, 3, 2, 2], "dtype": "float32", "stored": "float32"}
    assert entries["scalar"]["shape"] == []
    with h5py.File(tmp_path / "merged.h5", "r") as f:
        entries = json.loads(f[hdf5.MANIFEST].asstr()[()])["entries"]
    assert entries["factors"][ATTN]["n_blocks"] == 3
    assert entries["factors"][ATTN]["blocks"][0]["U"]["shape"] == [4, 4]
    with pytest.raises(ValueError, match="reserved"):
        hdf5.write_state_dict(tmp_path / "x.h5", {hdf5.MANIFEST: torch.ones(1)},
                              {hdf5.MANIFEST: LayerInfo(None, "other")}, {})


def test_task_vector_with_a_deleted_dataset_is_refused(tmp_path):
    path = tmp_path / "tv.h5"
    _write_tv(path)
    _edit(path, lambda f: f.__delitem__("conv1.weight"))
    message = _missing(path, "conv1.weight", "expert_model")
    with pytest.raises(CheckpointError, match=message):
        hdf5.read_state_dict(path)
    with pytest.raises(CheckpointError, match=message):  # a subset read checks the whole file
        hdf5.read_state_dict(path, keys=[MLP])
    with pytest.raises(CheckpointError, match=message):
        hdf5.read_key([path], MLP)


def test_merged_cache_with_a_deleted_factor_group_is_refused(tmp_path):
    path = tmp_path / "merged.h5"
    _write_merged(path)
    _edit(path, lambda f: f.__delitem__(f"factors/{MLP}"))
    with pytest.raises(CheckpointError, match=_missing(path, MLP, "merged")):
        hdf5.read_factored(path)


@pytest.mark.parametrize("member, detail", [
    (f"factors/{ATTN}/2", " row block 2"),
    (f"factors/{ATTN}/0/U", " factor 'U' of row block 0"),
    (f"factors/{ATTN}/1/Vh", " factor 'Vh' of row block 1"),
])
def test_merged_cache_missing_a_row_block_or_factor_is_named(tmp_path, member, detail):
    path = tmp_path / "merged.h5"
    _write_merged(path)
    _edit(path, lambda f: f.__delitem__(member))
    with pytest.raises(CheckpointError, match=_missing(path, ATTN, "merged", detail)):
        hdf5.read_factored(path)


def test_deleted_dense_entry_and_rule_inference(tmp_path):
    merged = tmp_path / "merged.h5"
    _write_merged(merged)
    _edit(merged, lambda f: f.__delitem__("dense/conv1.weight"))
    with pytest.raises(CheckpointError, match=_missing(merged, "conv1.weight", "merged")):
        hdf5.read_factored(merged)
    spectrum = tmp_path / "spectrum.h5"  # spectra carry the task vector's attributes
    _write_merged(spectrum, attrs=TV_ATTRS, dense=False)
    _edit(spectrum, lambda f: f.__delitem__(f"factors/{ATTN}"))
    with pytest.raises(CheckpointError, match=_missing(spectrum, ATTN, "expert_model")):
        hdf5.read_factored(spectrum)
    plain = tmp_path / "plain.h5"
    _write_tv(plain, attrs={})
    _edit(plain, lambda f: f.__delitem__(MLP))
    with pytest.raises(CheckpointError, match=_missing(plain, MLP, None)):
        hdf5.read_state_dict(plain)


def test_unlisted_changed_and_manifestless_stores_are_refused(tmp_path):
    path = tmp_path / "tv.h5"
    _write_tv(path)
    _edit(path, lambda f: f.create_dataset("extra", data=np.ones(3)))
    with pytest.raises(CheckpointError, match=r"tv\.h5: key 'extra' is not in the manifest.*rule expert_model"):
        hdf5.read_state_dict(path)

    def reshape(f):
        attrs = dict(f[MLP].attrs)
        del f[MLP]
        ds = f.create_dataset(MLP, data=np.ones((2, 4), dtype=np.float32))
        ds.attrs.update(attrs)
        ds.attrs["shape"] = np.asarray([2, 4])
    _write_tv(path)
    _edit(path, reshape)
    with pytest.raises(CheckpointError, match=rf"tv\.h5: key '{re.escape(MLP)}' has shape \(2, 4\).*\(8, 4\)"):
        hdf5.read_key([path], "scalar")

    _write_merged(tmp_path / "merged.h5")
    _edit(tmp_path / "merged.h5", lambda f: f.create_dataset(f"factors/{MLP}/0/W", data=np.ones(2)))
    with pytest.raises(CheckpointError, match="key 'W'.*not in the manifest"):
        hdf5.read_factored(tmp_path / "merged.h5")

    _write_tv(path)
    _edit(path, lambda f: f.__delitem__(hdf5.MANIFEST))
    with pytest.raises(CheckpointError, match=r"tv\.h5: no manifest.*delete it and rerun rule expert_model"):
        hdf5.read_state_dict(path)

    def tamper(f):
        manifest = json.loads(f[hdf5.MANIFEST].asstr()[()])
        del manifest["entries"]["conv1.weight"]
        del f[hdf5.MANIFEST]
        f.create_dataset(hdf5.MANIFEST, data=json.dumps(manifest), dtype=h5py.string_dtype())
    _write_tv(path)
    _edit(path, tamper)
    with pytest.raises(CheckpointError, match=r"tv\.h5: corrupt manifest"):
        hdf5.read_state_dict(path)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_truncated_or_non_hdf5_files_are_named(tmp_path, damage):
    tv, merged = tmp_path / "tv.h5", tmp_path / "merged.h5"
    _write_tv(tv)
    _write_merged(merged)
    for path in (tv, merged):
        data = path.read_bytes()
        path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not an HDF5 file\n" * 10,
                          "empty": b""}[damage])
    message = r"tv\.h5: cannot open as HDF5.*truncated or not an HDF5 file: delete it and rerun"
    with pytest.raises(CheckpointError, match=message):
        hdf5.read_state_dict(tv)
    with pytest.raises(CheckpointError, match=message):
        hdf5.read_key([tv], "scalar")
    with pytest.raises(CheckpointError, match=message.replace("tv", "merged")):
        hdf5.read_factored(merged)
