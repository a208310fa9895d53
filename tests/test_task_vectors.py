"""Task vectors, their application, and the input checks."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from submerge.errors import CheckpointError
from submerge.merging import apply_task_vector, task_vectors, validate_state_dicts
from submerge.merging.task_vectors import check_layer_info, check_task_vectors

SETTINGS = settings(max_examples=25, deadline=None)


def model(seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(4, 3, generator=g).to(dtype),
        "b": torch.randn(3, generator=g).to(dtype),
        "ids": torch.arange(5),  # int64 buffer
        "flag": torch.ones(2, dtype=torch.uint8),
    }


def test_task_vectors_are_differences_and_skip_non_float():
    base, e1, e2 = model(0), model(1), model(2)
    e2["ids"] = e2["ids"] + 7  # non-float entries may differ: they never enter a task vector
    tvs = task_vectors(base, {"one": e1, "two": e2})
    assert list(tvs) == ["one", "two"]
    for name, expert in (("one", e1), ("two", e2)):
        assert set(tvs[name]) == {"w", "b"}
        for key in ("w", "b"):
            assert torch.equal(tvs[name][key], expert[key] - base[key])


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), alpha=st.floats(-2.0, 2.0))
def test_apply_task_vector(seed, alpha):
    base, expert = model(seed), model(seed + 1)
    delta = task_vectors(base, {"e": expert})["e"]
    merged = apply_task_vector(base, delta, alpha)
    for key in ("w", "b"):
        torch.testing.assert_close(merged[key], base[key] + alpha * (expert[key] - base[key]))
    assert merged["ids"] is base["ids"] and merged["flag"] is base["flag"]
    # alpha = 1 recovers the expert
    recovered = apply_task_vector(base, delta, 1.0)
    for key in ("w", "b"):
        torch.testing.assert_close(recovered[key], expert[key], rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtype_preserved(dtype):
    base, expert = model(0, dtype), model(1, dtype)
    delta = task_vectors(base, {"e": expert})["e"]
    assert delta["w"].dtype == dtype
    # difference taken in float32, then rounded once to the weights' dtype
    torch.testing.assert_close(delta["w"], (expert["w"].float() - base["w"].float()).to(dtype))
    merged = apply_task_vector(base, delta, 0.5)
    assert merged["w"].dtype == dtype
    torch.testing.assert_close(merged["w"], (base["w"].float() + 0.5 * delta["w"].float()).to(dtype))


def test_empty_experts():
    with pytest.raises(ValueError, match="no experts"):
        validate_state_dicts(model(0), {})
    with pytest.raises(ValueError, match="no task vectors"):
        check_task_vectors([])


def test_missing_and_extra_keys_name_expert_and_key():
    base = model(0)
    bad = model(1)
    del bad["b"]
    with pytest.raises(CheckpointError, match=r"expert 'mnist' is missing.*'b'"):
        validate_state_dicts(base, {"ok": model(2), "mnist": bad})
    bad = model(1)
    bad["extra.weight"] = torch.zeros(1, dtype=torch.float64)
    with pytest.raises(CheckpointError, match=r"expert 'dtd' has key.*'extra.weight'"):
        task_vectors(base, {"dtd": bad})


def test_shape_and_dtype_mismatch():
    base = model(0)
    bad = model(1)
    bad["w"] = torch.zeros(3, 4, dtype=torch.float64)
    with pytest.raises(CheckpointError, match=r"expert 'svhn', key 'w': shape \(3, 4\) != base shape \(4, 3\)"):
        validate_state_dicts(base, {"svhn": bad})
    bad = model(1)
    bad["b"] = bad["b"].float()
    with pytest.raises(
        CheckpointError, match=r"expert 'svhn', key 'b': dtype torch.float32 != base dtype torch.float64"
    ):
        validate_state_dicts(base, {"svhn": bad})


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_inf(value):
    base = model(0)
    bad = model(1)
    bad["w"][1, 2] = value
    with pytest.raises(CheckpointError, match=r"expert 'gtsrb': key 'w' contains NaN or Inf"):
        task_vectors(base, {"fine": model(2), "gtsrb": bad})
    base["b"][0] = value
    with pytest.raises(CheckpointError, match=r"base: key 'b' contains NaN or Inf"):
        validate_state_dicts(base, {"fine": model(2)})


def test_apply_task_vector_bad_keys():
    base = model(0)
    with pytest.raises(CheckpointError, match="'nope'"):
        apply_task_vector(base, {"nope": torch.zeros(1)}, 1.0)
    with pytest.raises(CheckpointError, match=r"key 'w'.*shape"):
        apply_task_vector(base, {"w": torch.zeros(3)}, 1.0)


def test_check_task_vectors_and_layer_info():
    a = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"task vector 1 differs .*'b'"):
        check_task_vectors([a, {"w": torch.zeros(2, 2)}])
    with pytest.raises(ValueError, match=r"task vector 1, key 'w'"):
        check_task_vectors([a, {"w": torch.zeros(2, 3), "b": torch.zeros(2)}])
    with pytest.raises(ValueError, match=r"task vector 0, key 'i'.*not a float"):
        check_task_vectors([{"i": torch.zeros(2, dtype=torch.int64)}])
    assert check_task_vectors([a, a]) == ["b", "w"]
    with pytest.raises(ValueError, match=r"layer_info has no entry for key\(s\) 'w'"):
        check_layer_info(["w"], {})
