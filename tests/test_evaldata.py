"""Prepared evaluation data (rule eval_data): the stored subset, bit-identical accuracies and
model inputs, refusal of broken or foreign files."""

from __future__ import annotations

import json

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from submerge.data import vision
from submerge.data.heads import save_head
from submerge.data.vision import VisionTask, image_geometry, read_prepared_meta, subset_indices, to_pil
from submerge.errors import CheckpointError, ConfigError
from submerge.models import get_adapter
from submerge.stages.evaldata import attach_eval_data, eval_data_path, needs_eval_data, prepare_eval_data

SIZE = 16
N_CLASSES = 5
ARCHS = {
    "open_clip_vit": dict(image_size=SIZE, patch_size=8, width=16, layers=1, heads=2, mlp_ratio=4.0, output_dim=8),
    "hf_clip_vision": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": SIZE, "patch_size": 8, "projection_dim": 8},
}


def _images(seed: int, n: int) -> list[PIL.Image.Image]:
    """Non-square images of varied sizes, RGB and grayscale (smaller and larger than SIZE)."""
    rs = np.random.RandomState(seed)
    out = []
    for i in range(n):
        h, w = rs.randint(9, 60, 2)
        shape = (h, w, 3) if i % 3 else (h, w)
        out.append(PIL.Image.fromarray(rs.randint(0, 256, shape).astype(np.uint8)))
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "ds"
    rs = np.random.RandomState(7)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64"),
                                  "idx": datasets.Value("int64")})

    def split(images):
        return datasets.Dataset.from_dict({"image": images, "label": rs.randint(0, N_CLASSES, len(images)).tolist(),
                                           "idx": list(range(len(images)))}, features=features)

    datasets.DatasetDict({"train": split(_images(0, 60)), "test": split(_images(1, 23))}).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module", params=sorted(ARCHS))
def setup(request, tmp_path_factory, data_dir):
    """(suite config, results root, adapter, tower with random weights) of one adapter, with a random head."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    adapter = get_adapter(name)
    torch.manual_seed(0)
    module = adapter.build(ARCHS[name]).eval()
    save_head(root / "heads" / "task.safetensors", torch.randn(N_CLASSES, 8), torch.randn(N_CLASSES) * 0.1,
              {"normalize": True, "logit_scale": 100.0, "classes": None})
    cfg = {"suite": "tiny", "adapter": name, "arch": ARCHS[name],
           "experts": {"task": {"dataset": {"path": str(data_dir)}},
                       "other": {"dataset": {"path": str(data_dir), "label_key": "idx"}}}}
    return cfg, root, adapter, module


class Recording:
    """An adapter whose encode records the model inputs."""

    def __init__(self, adapter):
        self.adapter, self.inputs = adapter, []

    def encode(self, module, inputs):
        self.inputs.append(inputs.clone())
        return self.adapter.encode(module, inputs)


def _prepare(cfg, root, split, max_examples, expert="task"):
    out = eval_data_path(root, expert, split)
    prepare_eval_data(cfg, expert, split, max_examples, out)
    return out


@pytest.mark.parametrize("split, max_examples, batch_size", [("test", None, 256), ("test", 10, 4),
                                                             ("val", None, 5), ("test", 500, 7)])
def test_prepared_accuracy_and_inputs_equal_the_dataset_path(setup, split, max_examples, batch_size):
    cfg, root, adapter, module = setup
    path = _prepare(cfg, root, split, max_examples)
    direct, prepared = Recording(adapter), Recording(adapter)
    plain = VisionTask(cfg, "task", root=root)
    fast = VisionTask(cfg, "task", root=root, prepared={split: path})
    acc = plain.accuracy(direct, module, split, batch_size=batch_size, max_examples=max_examples)
    assert fast.accuracy(prepared, module, split, batch_size=batch_size, max_examples=max_examples) == acc
    assert len(direct.inputs) == len(prepared.inputs) > 0
    for a, b in zip(direct.inputs, prepared.inputs):
        assert a.dtype == b.dtype == torch.float32 and a.is_contiguous() and b.is_contiguous()
        assert torch.equal(a, b)
    # evaluated again from the same task: the same (the file is checked once per process)
    assert fast.accuracy(adapter, module, split, batch_size=batch_size, max_examples=max_examples) == acc


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prepared_inputs_equal_the_dataset_path_on_cuda(setup):
    """On the GPU the lookup runs on the device: still the same model inputs, bit for bit."""
    cfg, root, adapter, module = setup
    path = _prepare(cfg, root, "test", None)
    direct, prepared = Recording(adapter), Recording(adapter)
    module = module.to("cuda")
    try:
        acc = VisionTask(cfg, "task", root=root).accuracy(direct, module, "test", device="cuda", batch_size=8)
        fast = VisionTask(cfg, "task", root=root, prepared={"test": path})
        assert fast.accuracy(prepared, module, "test", device="cuda", batch_size=8) == acc
    finally:
        module.to("cpu")
    assert all(a.is_cuda and torch.equal(a, b) for a, b in zip(direct.inputs, prepared.inputs, strict=True))


def test_prepared_path_does_not_open_the_dataset(setup, monkeypatch):
    cfg, root, adapter, module = setup
    path = _prepare(cfg, root, "test", 10)
    expected = VisionTask(cfg, "task", root=root).accuracy(adapter, module, "test", max_examples=10)
    task = VisionTask(cfg, "task", root=root)
    attach_eval_data([task], [path])

    def no_dataset(split):
        raise AssertionError("the dataset was opened")

    monkeypatch.setattr(task, "split", no_dataset)
    assert task.accuracy(adapter, module, "test", max_examples=10) == expected
    with pytest.raises(AssertionError, match="opened"):  # the split without a file still reads the dataset
        task.accuracy(adapter, module, "val")


def test_file_holds_exactly_the_subset(setup, data_dir):
    cfg, root, _, _ = setup
    path = _prepare(cfg, root, "test", 10)
    meta = read_prepared_meta(path)
    sub = subset_indices(23, 10)
    assert meta["n"] == 10 and meta["n_split"] == 23 and meta["max_examples"] == 10
    assert meta["expert"] == "task" and meta["split"] == "test" and meta["image_size"] == SIZE
    assert meta["dataset"] == json.loads(json.dumps(VisionTask(cfg, "task", root=root).cfg))
    assert meta["adapter"] == cfg["adapter"]
    from safetensors.torch import load_file

    data = load_file(path)
    assert set(data) == {"images", "labels"}
    assert data["images"].dtype == torch.uint8 and data["images"].shape == (10, SIZE, SIZE, 3)
    test = datasets.load_from_disk(str(data_dir))["test"]
    assert data["labels"].dtype == torch.int64 and data["labels"].tolist() == [test[i]["label"] for i in sub]
    geometry = image_geometry(cfg)
    for k, i in enumerate(sub):
        assert np.array_equal(data["images"][k].numpy(), geometry(to_pil(test[i]["image"])))
    # max_examples at or above the split size: the whole split, in order, recorded as None
    whole = read_prepared_meta(_prepare(cfg, root, "test", 500))
    assert whole["n"] == 23 and whole["max_examples"] is None
    val = read_prepared_meta(_prepare(cfg, root, "val", None))
    assert val["n"] == val["n_split"] == 6


def test_truncated_or_garbage_file_is_refused(setup, tmp_path):
    cfg, root, adapter, module = setup
    good = _prepare(cfg, root, "test", 10)
    path = tmp_path / "evaldata" / "task" / "test.safetensors"
    path.parent.mkdir(parents=True)
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    path.with_suffix(".json").write_text(good.with_suffix(".json").read_text())
    task = VisionTask(cfg, "task", root=root, prepared={"test": path})
    with pytest.raises(CheckpointError, match=rf"{path}.*truncated or corrupt.*rule eval_data"):
        task.accuracy(adapter, module, "test", max_examples=10)
    path.write_bytes(data)  # intact again: accepted
    assert task.accuracy(adapter, module, "test", max_examples=10) == \
        VisionTask(cfg, "task", root=root).accuracy(adapter, module, "test", max_examples=10)
    path.with_suffix(".json").write_text("{not json")
    with pytest.raises(CheckpointError, match=rf"{path}: cannot read its sidecar"):
        VisionTask(cfg, "task", root=root, prepared={"test": path})
    path.with_suffix(".json").unlink()
    with pytest.raises(CheckpointError, match=rf"{path}: cannot read its sidecar"):
        attach_eval_data([VisionTask(cfg, "task", root=root)], [path])
    with pytest.raises(CheckpointError, match="does not exist"):
        VisionTask(cfg, "task", root=root, prepared={"test": tmp_path / "missing.safetensors"})


def test_foreign_or_mismatched_file_is_refused(setup):
    cfg, root, adapter, module = setup
    path = _prepare(cfg, root, "test", 10)
    with pytest.raises(CheckpointError, match=rf"{path} was made for another split"):
        VisionTask(cfg, "task", root=root, prepared={"val": path})
    with pytest.raises(CheckpointError, match=r"another dataset, expert"):
        VisionTask(cfg, "other", root=root, prepared={"test": path})
    bigger = {**cfg, "arch": {**cfg["arch"], "image_size": 2 * SIZE}}
    with pytest.raises(CheckpointError, match="another image_size"):
        VisionTask(bigger, "task", root=root, prepared={"test": path})
    task = VisionTask(cfg, "task", root=root, prepared={"test": path})
    with pytest.raises(ConfigError, match=r"max_examples=11, but the prepared file .* holds max_examples=10"):
        task.accuracy(adapter, module, "test", max_examples=11)
    with pytest.raises(ConfigError, match="max_examples=None"):
        task.accuracy(adapter, module, "test")


def test_attach_eval_data_wiring(setup):
    cfg, root, adapter, module = setup
    paths = [_prepare(cfg, root, "test", 10), _prepare(cfg, root, "val", None)]
    task = VisionTask(cfg, "task", root=root)
    attach_eval_data([task], [])  # nothing to attach
    attach_eval_data([task], paths)
    assert {s: p for s, (p, _) in task._prepared.items()} == {"test": paths[0], "val": paths[1]}
    other = VisionTask(cfg, "other", root=root)
    attach_eval_data([other], paths)  # files of other experts: ignored
    assert other._prepared == {}

    class Digits:
        name = "task"

    with pytest.raises(ValueError, match="does not read prepared files"):
        attach_eval_data([Digits()], paths)


def test_stage_helpers(tmp_path, setup):
    cfg, root, _, _ = setup
    assert needs_eval_data({"dataset": {"path": "x"}}) and needs_eval_data({"dataset": {"kind": "image"}})
    assert not needs_eval_data({"dataset": {"kind": "text"}}) and not needs_eval_data({"build": "digits"})
    assert eval_data_path("results/s", "mnist", "val").as_posix() == "results/s/evaldata/mnist/val.safetensors"
    with pytest.raises(ConfigError, match="unknown split 'train'"):
        prepare_eval_data(cfg, "task", "train", None, tmp_path / "x.safetensors")
    text = {**cfg, "experts": {"t": {"dataset": {"path": "x", "kind": "text"}}}}
    with pytest.raises(ConfigError, match="no image dataset block"):
        prepare_eval_data(text, "t", "val", None, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_save_prepared_checks_its_tensors(tmp_path):
    images = torch.zeros((2, 4, 4, 3), dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8"):
        vision.save_prepared(tmp_path / "a.safetensors", images.float(), torch.zeros(2, dtype=torch.int64), {"n": 2})
    with pytest.raises(ValueError, match="int64"):
        vision.save_prepared(tmp_path / "a.safetensors", images, torch.zeros(3, dtype=torch.int64), {"n": 3})
