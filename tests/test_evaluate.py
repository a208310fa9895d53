"""submerge.evaluate and submerge.data: accuracy against an independent argmax, heads, dispatch."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from submerge.data import EvalTask, head_logits, load_head
from submerge.data.heads import save_head
from submerge.errors import CheckpointError, ConfigError
from submerge.evaluate import evaluate, load_eval_task, resolve_device
from submerge.models import get_adapter
from submerge.suites import digits

CFG = {"arch": {"width": 32, "layers": 1, "heads": 2, "output_dim": 16}, "n_val": 150, "n_test": 120}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture()
def setup(tmp_path):
    """A random tiny tower and random heads for two digits tasks (one with normalisation)."""
    adapter = get_adapter("open_clip_vit")
    cfg = digits.resolve_config(CFG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = adapter.build(cfg["arch"])
        heads = {"parity": (torch.randn(2, 16), torch.randn(2),
                            {"normalize": True, "logit_scale": 7.5, "classes": ["even", "odd"]}),
                 "rot90": (torch.randn(10, 16), None,
                           {"normalize": False, "logit_scale": 1.0, "classes": list("0123456789")})}
    for name, (w, b, meta) in heads.items():
        save_head(tmp_path / "heads" / f"{name}.safetensors", w, b, meta)
    suite = {"digits": CFG, "experts": {"parity": {"build": "digits", "task": "parity"},
                                        "rot90": {"build": "digits", "task": "rot90"}}}
    tasks = [load_eval_task(suite, name, root=tmp_path) for name in heads]
    return adapter, module, heads, tasks


def _independent_accuracy(module, head, images, labels) -> float:
    """The module on all images at once, float64 logits per example, argmax, count."""
    w, b, meta = head
    with torch.no_grad():
        feats = module(images).double()
    correct = 0
    for f, y in zip(feats, labels):
        if meta["normalize"]:
            f = f / torch.sqrt((f * f).sum())
        logits = meta["logit_scale"] * (w.double() @ f) + (0 if b is None else b.double())
        correct += int(int(torch.argmax(logits)) == int(y))
    return correct / len(labels)


def test_evaluate_matches_independent_argmax(setup):
    adapter, module, heads, tasks = setup
    module.train()
    got = evaluate(adapter, module, tasks, "test", batch_size=64)
    assert module.training                                    # mode restored
    assert list(got) == ["parity", "rot90"]
    for task in tasks:
        images, labels = digits.load_split(task.key, "test", CFG)
        assert len(labels) == 120
        expected = _independent_accuracy(module, heads[task.name], images, labels)
        assert got[task.name] == pytest.approx(expected)
    # batch size does not change the answer, nor does a second call
    assert evaluate(adapter, module, tasks, "test", batch_size=7) == got


def test_max_examples_is_the_first_n_of_a_seeded_permutation(setup):
    adapter, module, heads, tasks = setup
    task = tasks[0]
    images, labels = digits.load_split("parity", "val", CFG)
    keep = torch.randperm(150, generator=torch.Generator().manual_seed(0))[:40]
    sub_x, sub_y = task.inputs("val", max_examples=40)
    assert torch.equal(sub_x, images[keep]) and torch.equal(sub_y, labels[keep])
    got = evaluate(adapter, module, [task], "val", max_examples=40)["parity"]
    assert got == pytest.approx(_independent_accuracy(module, heads["parity"], images[keep], labels[keep]))
    assert evaluate(adapter, module, [task], "val", max_examples=40)["parity"] == got
    # more than there are: the whole split
    assert evaluate(adapter, module, [task], "val", max_examples=10_000) == \
        evaluate(adapter, module, [task], "val")


def test_evaluate_rejects_duplicate_names(setup):
    adapter, module, _, tasks = setup
    with pytest.raises(ValueError, match="duplicate"):
        evaluate(adapter, module, [tasks[0], tasks[0]], "val")


def test_head_logits_against_float64():
    gen = torch.Generator().manual_seed(1)
    feats, w = torch.randn(5, 8, generator=gen), torch.randn(3, 8, generator=gen)
    b = torch.randn(3, generator=gen)
    for normalize in (False, True):
        meta = {"normalize": normalize, "logit_scale": 2.5}
        f = feats.double()
        if normalize:
            f = f / f.norm(dim=1, keepdim=True)
        expected = 2.5 * f @ w.double().T + b.double()
        got = head_logits(feats, w, b, meta)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(head_logits(feats.double(), w, None, meta), expected - b.double())


def test_load_head_roundtrip_and_errors(tmp_path):
    w, b = torch.randn(3, 4), torch.randn(3)
    save_head(tmp_path / "heads" / "a.safetensors", w, b, {"normalize": True, "logit_scale": 2.0,
                                                           "classes": ["x", "y", "z"]})
    w2, b2, meta = load_head(tmp_path, "a")
    assert torch.equal(w, w2) and torch.equal(b, b2)
    assert meta == {"normalize": True, "logit_scale": 2.0, "classes": ["x", "y", "z"]}
    with pytest.raises(CheckpointError, match="missing"):
        load_head(tmp_path, "missing")
    sidecar = tmp_path / "heads" / "a.json"
    sidecar.write_text(json.dumps({"normalize": "yes", "logit_scale": 1.0}))
    with pytest.raises(CheckpointError, match="normalize"):
        load_head(tmp_path, "a")
    sidecar.write_text(json.dumps({"normalize": False, "logit_scale": 1.0, "classes": ["x"]}))
    with pytest.raises(CheckpointError, match="classes"):
        load_head(tmp_path, "a")
    sidecar.unlink()
    with pytest.raises(CheckpointError, match="sidecar"):
        load_head(tmp_path, "a")


def test_digits_task_checks_its_head(tmp_path):
    save_head(tmp_path / "heads" / "parity.safetensors", torch.randn(3, 16), None,
              {"normalize": False, "logit_scale": 1.0})
    task = digits.TASKS["parity"].bind(CFG, tmp_path)
    module = get_adapter("open_clip_vit").build(digits.resolve_config(CFG)["arch"])
    with pytest.raises(ValueError, match="classes"):
        task.accuracy(get_adapter("open_clip_vit"), module, "val")
    with pytest.raises(ValueError, match="not bound"):
        digits.TASKS["parity"].accuracy(None, module, "val")


def test_load_eval_task_dispatch(tmp_path, monkeypatch):
    made = []

    class Fake:
        def __init__(self, suite_cfg, expert, *, root):
            made.append((type(self).__name__, expert, root))
            self.name = expert

        def accuracy(self, adapter, module, split, *, device="cpu", batch_size=256, max_examples=None):
            return 0.0

    vision = types.ModuleType("submerge.data.vision")
    vision.VisionTask = type("VisionTask", (Fake,), {})
    language = types.ModuleType("submerge.data.language")
    language.LanguageTask = type("LanguageTask", (Fake,), {})
    monkeypatch.setitem(sys.modules, "submerge.data.vision", vision)
    monkeypatch.setitem(sys.modules, "submerge.data.language", language)
    suite = {"digits": {"seed": 2},
             "experts": {"mine": {"build": "digits", "task": "flip_lr"},
                         "cars": {"hub": {"repo": "x"}, "dataset": {"hub": "tanganke/cars"}},
                         "qa": {"dataset": {"hub": "some/qa", "kind": "text"}},
                         "bad": {"build": "digits", "task": "flip_diagonal"},
                         "nodata": {"hub": {"repo": "x"}}}}
    task = load_eval_task(suite, "mine", root=tmp_path)
    assert isinstance(task, digits.DigitsTask) and isinstance(task, EvalTask)
    assert (task.name, task.key, task.root, task.cfg["seed"]) == ("mine", "flip_lr", tmp_path, 2)
    assert load_eval_task(suite, "cars", root=tmp_path).name == "cars"
    assert load_eval_task(suite, "qa", root=tmp_path).name == "qa"
    assert made == [("VisionTask", "cars", tmp_path), ("LanguageTask", "qa", tmp_path)]
    with pytest.raises(ConfigError, match=r"experts\.bad\.task"):
        load_eval_task(suite, "bad", root=tmp_path)
    with pytest.raises(ConfigError, match=r"experts\.nodata"):
        load_eval_task(suite, "nodata", root=tmp_path)
    with pytest.raises(ConfigError, match=r"experts\.ghost"):
        load_eval_task(suite, "ghost", root=tmp_path)


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="device"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="device"):
        resolve_device("quantum")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
