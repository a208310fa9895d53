"""Vision evaluation data: validation split, preprocessing, class-name table, VisionTask."""

from __future__ import annotations

import datasets
import numpy as np
import open_clip
import PIL.Image
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from submerge.data import vision
from submerge.data.heads import save_head, zero_shot_head
from submerge.data.vision import (
    VisionTask, image_transform, prompts, subset_indices, val_split_indices, vision_task_entry, vision_tasks,
)
from submerge.errors import CheckpointError, ConfigError

MEAN = torch.tensor(open_clip.constants.OPENAI_DATASET_MEAN).view(3, 1, 1)
STD = torch.tensor(open_clip.constants.OPENAI_DATASET_STD).view(3, 1, 1)
SIZE = 16
OC_ARCH = dict(image_size=SIZE, patch_size=8, width=16, layers=1, heads=2, mlp_ratio=4.0, output_dim=8)


# ----------------------------------------------------------------------------- validation split

def test_val_split_matches_tall_masks_mnist():
    # tall_masks src/datasets/registry.py asserts trainset.indices[0] == 36044 for MNISTVal
    train, val = val_split_indices(60000)
    assert len(val) == 5000 and len(train) == 55000 and train[0] == 36044


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 3000), fraction=st.floats(0.05, 0.95), max_size=st.sampled_from([None, 1, 7, 5000]),
       seed=st.integers(0, 3))
def test_val_split_is_torch_random_split(n, fraction, max_size, seed):
    n_val = int(n * fraction) if max_size is None else min(int(n * fraction), max_size)
    if n_val < 1 or n_val == n:
        with pytest.raises(ValueError, match="no validation or no train"):
            val_split_indices(n, fraction, max_size, seed)
        return
    train, val = val_split_indices(n, fraction, max_size, seed)
    ref_train, ref_val = torch.utils.data.random_split(
        range(n), [n - n_val, n_val], generator=torch.Generator().manual_seed(seed))
    assert train == list(ref_train.indices) and val == list(ref_val.indices)
    assert len(val) == n_val and set(train).isdisjoint(val) and sorted(train + val) == list(range(n))
    assert (train, val) == val_split_indices(n, fraction, max_size, seed)  # deterministic


def test_val_split_depends_on_seed_and_rejects_bad_fraction():
    assert val_split_indices(100, seed=0) != val_split_indices(100, seed=1)
    with pytest.raises(ValueError, match="val_fraction"):
        val_split_indices(100, fraction=1.0)


def test_subset_indices():
    assert subset_indices(5, None) == [0, 1, 2, 3, 4] == subset_indices(5, 9)
    sub = subset_indices(50, 10)
    assert sub == subset_indices(50, 10) and len(set(sub)) == 10 and sub != list(range(10))
    assert sub == torch.randperm(50, generator=torch.Generator().manual_seed(0))[:10].tolist()


# ----------------------------------------------------------------------------- preprocessing

def _square_rgb(seed, size=SIZE):
    return np.random.RandomState(seed).randint(0, 256, (size, size, 3)).astype(np.uint8)


@pytest.mark.parametrize("suite_cfg", [
    {"adapter": "open_clip_vit", "arch": OC_ARCH},
    {"adapter": "hf_clip_vision", "arch": {"image_size": SIZE, "patch_size": 8, "hidden_size": 16,
                                           "num_attention_heads": 2}},
])
def test_image_transform_on_an_image_of_the_model_size_is_rescale_and_normalise(suite_cfg):
    x = _square_rgb(0)
    out = image_transform(suite_cfg)(PIL.Image.fromarray(x))
    expected = (torch.from_numpy(x).permute(2, 0, 1).float() / 255 - MEAN) / STD
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    gray = PIL.Image.fromarray(np.random.RandomState(1).randint(0, 256, (20, 31)).astype(np.uint8)).convert("RGB")
    assert image_transform(suite_cfg)(gray).shape == (3, SIZE, SIZE)


@pytest.mark.parametrize("suite_cfg", [
    {"adapter": "open_clip_vit", "arch": OC_ARCH},
    {"adapter": "hf_clip_vision", "arch": {"image_size": SIZE, "patch_size": 8, "hidden_size": 16,
                                           "num_attention_heads": 2}},
])
def test_image_transform_is_geometry_then_tensor(suite_cfg):
    rs = np.random.RandomState(2)
    images = [PIL.Image.fromarray(rs.randint(0, 256, (h, w, 3)).astype(np.uint8)) for h, w in ((9, 30), (41, 17))]
    arrays = [vision.image_geometry(suite_cfg)(im) for im in images]
    assert all(a.dtype == np.uint8 and a.shape == (SIZE, SIZE, 3) for a in arrays)
    batch = vision.image_tensor(suite_cfg)(torch.from_numpy(np.stack(arrays)))
    assert torch.equal(batch, torch.stack([image_transform(suite_cfg)(im) for im in images]))


def test_image_size_from_named_configs():
    img = PIL.Image.fromarray(_square_rgb(0))
    assert image_transform({"adapter": "open_clip_vit", "arch": {"model": "ViT-B-32"}})(img).shape == (3, 224, 224)
    assert image_transform({"adapter": "hf_clip_vision", "arch": {"vision_config": {"image_size": 32}}})(img).shape \
        == (3, 32, 32)
    with pytest.raises(ConfigError, match="adapter"):
        image_transform({"adapter": "hf_t5", "arch": {}})
    with pytest.raises(ConfigError, match="image_size"):
        image_transform({"adapter": "open_clip_vit", "arch": {"patch_size": 8}})
    with pytest.raises(ConfigError, match="not an open_clip model"):
        image_transform({"adapter": "open_clip_vit", "arch": {"model": "ViT-Nope"}})


# ----------------------------------------------------------------------------- class names

# class counts of the datasets themselves (independent of the table)
N_CLASSES = {"cars": 196, "dtd": 47, "eurosat": 10, "gtsrb": 43, "mnist": 10, "resisc45": 45, "svhn": 10,
             "sun397": 397, "stl10": 10, "oxfordiiitpet": 37, "flowers102": 102, "cifar100": 100, "pcam": 2,
             "fer2013": 7, "cifar10": 10, "food101": 101, "fashionmnist": 10, "renderedsst2": 2, "emnist": 10,
             "kmnist": 10}


def test_vision_tasks_table_has_the_20_tasks():
    import json

    doc = json.loads(vision.VISION_TASKS_FILE.read_text())
    assert doc["order"] == list(N_CLASSES)  # tall_masks ALL_DATASETS order
    for key, n in N_CLASSES.items():
        entry = vision_tasks()[key]
        assert len(entry["classnames"]) == n, key
        assert len(set(entry["classnames"])) == n, key
        assert entry["complete"] is True and entry["templates"], key
        assert all("{c}" in t for t in entry["templates"]), key
    assert vision_tasks()["cifar10"]["classnames"][:3] == ["airplane", "automobile", "bird"]
    assert vision_tasks()["mnist"]["templates"] == ['a photo of the number: "{c}".']


def test_vision_task_lookup_and_prompts():
    assert vision_task_entry("Cars") is vision_task_entry("stanford_cars") is vision_tasks()["cars"]
    assert vision_task_entry("OxfordIIITPet") is vision_tasks()["oxfordiiitpet"]
    assert prompts({"classes": "MNIST"}, "e") == ([str(i) for i in range(10)], ['a photo of the number: "{c}".'])
    assert prompts({"classes": "mnist", "templates": ["{c}!"]}, "e")[1] == ["{c}!"]
    assert prompts({"classes": ["x", "y"], "templates": ["a {c}"]}, "e") == (["x", "y"], ["a {c}"])
    with pytest.raises(ConfigError, match=r"dataset\.classes 'mnist2' is not an entry of .*vision_tasks\.json"):
        prompts({"classes": "mnist2"}, "e")
    with pytest.raises(ConfigError, match="templates is required"):
        prompts({"classes": ["x", "y"]}, "e")
    with pytest.raises(ConfigError, match="containing"):
        prompts({"classes": ["x"], "templates": ["no placeholder"]}, "e")


# ----------------------------------------------------------------------------- VisionTask

@pytest.fixture(scope="module")
def clip_model():
    torch.manual_seed(0)
    return open_clip.CLIP(
        embed_dim=8, vision_cfg=dict(image_size=SIZE, patch_size=8, width=16, layers=1, head_width=8),
        text_cfg=dict(context_length=16, vocab_size=49408, width=16, heads=2, layers=1)).eval()


class Adapter:
    """The open_clip_vit adapter's encode (docs/contracts.md): images -> projected features."""

    def encode(self, module, inputs):
        return module(inputs)


def _images(seed, n):
    rs = np.random.RandomState(seed)
    return [rs.randint(0, 256, (SIZE + 4 * (i % 3), SIZE, 3) if i % 2 else (SIZE, SIZE + 5)).astype(np.uint8)
            for i in range(n)]  # RGB and grayscale, square and not


def _independent_predictions(model, arrays, weight, logit_scale):
    preprocess = open_clip.image_transform(SIZE, is_train=False)
    preds = []
    with torch.no_grad():
        for a in arrays:
            f = model.visual(preprocess(PIL.Image.fromarray(a).convert("RGB"))[None])[0].double()
            preds.append(int((logit_scale * (f / f.norm()) @ weight.double().T).argmax()))
    return preds


@pytest.fixture(scope="module")
def suite(tmp_path_factory, clip_model):
    """A saved DatasetDict (train 40, test 12) + a zero-shot head; labels built from independent predictions."""
    root = tmp_path_factory.mktemp("suite")
    classes, templates = prompts({"classes": "mnist"}, "digits")
    weight, meta = zero_shot_head(clip_model, lambda t: open_clip.tokenize(t, context_length=16), classes, templates)
    save_head(root / "heads" / "mnist.safetensors", weight, None, meta)
    train, test = _images(0, 40), _images(1, 12)
    p_train = _independent_predictions(clip_model, train, weight, meta["logit_scale"])
    p_test = _independent_predictions(clip_model, test, weight, meta["logit_scale"])
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64"),
                                  "idx": datasets.Value("int64")})

    def split(arrays, labels):
        return datasets.Dataset.from_dict(
            {"image": [PIL.Image.fromarray(a) for a in arrays], "label": labels, "idx": list(range(len(arrays)))},
            features=features)

    test_labels = [p if i % 3 else (p + 1) % 10 for i, p in enumerate(p_test)]  # every third one wrong
    path = root / "data"
    datasets.DatasetDict({"train": split(train, p_train), "test": split(test, test_labels)}).save_to_disk(str(path))
    cfg = {"adapter": "open_clip_vit", "arch": OC_ARCH,
           "experts": {"mnist": {"dataset": {"path": str(path), "classes": "mnist"}}}}
    return dict(root=root, cfg=cfg, path=path, p_test=p_test, test_labels=test_labels)


def test_vision_task_accuracy_equals_independent_argmax(suite, clip_model):
    task = VisionTask(suite["cfg"], "mnist", root=suite["root"])
    expected = np.mean(np.array(suite["p_test"]) == np.array(suite["test_labels"]))
    assert expected == 8 / 12
    for batch_size in (5, 256):
        assert task.accuracy(Adapter(), clip_model.visual, "test", batch_size=batch_size) == pytest.approx(expected)
    # the validation part of train: labels there are the model's own predictions
    assert task.accuracy(Adapter(), clip_model.visual, "val") == 1.0
    # max_examples: the seeded subset of the split
    sub = subset_indices(12, 5)
    expected_sub = np.mean([suite["p_test"][i] == suite["test_labels"][i] for i in sub])
    assert task.accuracy(Adapter(), clip_model.visual, "test", max_examples=5) == pytest.approx(expected_sub)


def test_prepared_split_with_dataloader_workers(suite, clip_model, tmp_path):
    """prepare_split and the on-the-fly path with num_workers > 0 (the transforms are picklable)."""
    cfg = {**suite["cfg"], "num_workers": 2}
    images, labels, meta = vision.prepare_split(cfg, "mnist", "test", 7)
    assert images.shape == (7, SIZE, SIZE, 3) and labels.tolist() == [suite["test_labels"][i]
                                                                       for i in subset_indices(12, 7)]
    vision.save_prepared(tmp_path / "test.safetensors", images, labels, meta)
    plain = VisionTask(cfg, "mnist", root=suite["root"])
    fast = VisionTask(cfg, "mnist", root=suite["root"], prepared={"test": tmp_path / "test.safetensors"})
    assert fast.accuracy(Adapter(), clip_model.visual, "test", batch_size=3, max_examples=7) \
        == plain.accuracy(Adapter(), clip_model.visual, "test", batch_size=3, max_examples=7)


def test_vision_task_splits(suite):
    task = VisionTask(suite["cfg"], "mnist", root=suite["root"])
    _, val = val_split_indices(40)
    assert task.split("val")["idx"] == val and len(val) == 4
    assert task.split("test")["idx"] == list(range(12))
    with pytest.raises(ValueError, match="unknown split 'train'"):
        task.split("train")
    cfg = {**suite["cfg"], "experts": {"mnist": {"dataset": {"path": str(suite["path"]), "val_split": "test"}}}}
    assert VisionTask(cfg, "mnist", root=suite["root"]).split("val")["idx"] == list(range(12))


def test_vision_task_hub_path_uses_load_dataset(suite, monkeypatch):
    local = datasets.load_from_disk(str(suite["path"]))
    calls = []

    def fake_load_dataset(path, name=None, *, split, revision=None):
        calls.append((path, name, split, revision))
        if split not in local:
            raise ValueError(f'Unknown split "{split}". Should be one of {list(local)}.')
        return local[split]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dcfg = {"hub": "ufldl-stanford/svhn", "config_name": "cropped_digits", "revision": "abc123",
            "test_split": "test"}
    task = VisionTask({**suite["cfg"], "experts": {"svhn": {"dataset": dcfg}}}, "svhn", root=suite["root"])
    assert task.split("test")["idx"] == list(range(12))
    assert len(task.split("val")) == 4
    assert calls == [("ufldl-stanford/svhn", "cropped_digits", "test", "abc123"),
                     ("ufldl-stanford/svhn", "cropped_digits", "train", "abc123")]
    bad = VisionTask({**suite["cfg"], "experts": {"svhn": {"dataset": {**dcfg, "test_split": "extra"}}}},
                     "svhn", root=suite["root"])
    with pytest.raises(ConfigError, match=r"dataset\.test_split = 'extra' could not be loaded from hub dataset"):
        bad.split("test")


@pytest.mark.parametrize("dataset_cfg, message", [
    ({"image_key": "img"}, r"dataset\.image_key = 'img' is not a column .* \(columns: \['image', 'label', 'idx'\]\)"),
    ({"label_key": "fine_label"}, r"dataset\.label_key = 'fine_label' is not a column"),
    ({"test_split": "validation"}, r"dataset\.test_split = 'validation' is not a split of .*data \(splits"),
    ({"train_split": "training"}, r"dataset\.train_split = 'training' is not a split"),
])
def test_vision_task_bad_dataset_fields(suite, clip_model, dataset_cfg, message):
    cfg = {**suite["cfg"], "experts": {"mnist": {"dataset": {"path": str(suite["path"]), **dataset_cfg}}}}
    task = VisionTask(cfg, "mnist", root=suite["root"])
    with pytest.raises(ConfigError, match=message):
        task.accuracy(Adapter(), clip_model.visual, "val" if "train_split" in dataset_cfg else "test")


def test_vision_task_bad_config(suite, tmp_path, clip_model):
    def task(dcfg, expert="mnist"):
        return VisionTask({**suite["cfg"], "experts": {"mnist": {"dataset": dcfg}}}, expert, root=suite["root"])

    with pytest.raises(ConfigError, match="'cifar' is not in the suite"):
        task({"path": str(suite["path"])}, expert="cifar")
    with pytest.raises(ConfigError, match="exactly one of 'hub' and 'path'"):
        task({"path": str(suite["path"]), "hub": "x/y"})
    with pytest.raises(ConfigError, match=r"unknown dataset field\(s\) \['label'\]"):
        task({"path": str(suite["path"]), "label": "label"})
    with pytest.raises(ConfigError, match="does not exist"):
        task({"path": str(tmp_path / "missing")}).split("test")
    with pytest.raises(ConfigError, match="not an entry of"):
        task({"path": str(suite["path"]), "classes": "mnist_v2"}).accuracy(Adapter(), clip_model.visual, "test")
    with pytest.raises(CheckpointError, match="has 10 classes, dataset.classes has 3"):
        task({"path": str(suite["path"]), "classes": ["a", "b", "c"], "templates": ["{c}"]}).head()
    single = tmp_path / "single"
    datasets.Dataset.from_dict({"image": [np.zeros((2, 2), np.uint8)], "label": [0]}).save_to_disk(str(single))
    with pytest.raises(ConfigError, match="single Dataset"):
        task({"path": str(single)}).split("test")


def test_vision_task_rejects_features_of_another_width(suite, clip_model):
    class Unprojected:  # e.g. a CLIP vision tower's pooled output before the visual projection
        def encode(self, module, inputs):
            return module(inputs)[:, :5]

    task = VisionTask(suite["cfg"], "mnist", root=suite["root"])
    with pytest.raises(CheckpointError, match="gives 5-d features, the head .*mnist.safetensors expects 8-d"):
        task.accuracy(Unprojected(), clip_model.visual, "test")
