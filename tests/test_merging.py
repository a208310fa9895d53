"""Merge rules against straightforward numpy transcriptions (float64) and known properties."""

import sys
import types

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from submerge.errors import ConfigError
from submerge.layers import LayerInfo
from submerge.merging import (
    apply_task_vector,
    consensus,
    iso_c,
    iso_cts,
    lines_alpha,
    lines_scale,
    merge,
    tall_masks,
    task_arithmetic,
    task_vectors,
    ties,
    tsv_m,
)
from submerge.merging.iso import iso_cts_sizes

SETTINGS = settings(max_examples=25, deadline=None)
SHAPES = [(5, 5), (3, 7), (8, 4), (1, 6)]
LAYER_INFO = {
    "w": LayerInfo(0, "mlp"),
    "b": LayerInfo(0, "norm"),
    "conv": LayerInfo(None, "embed"),
}


def make_tvs(seed, n_tasks, shape, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "w": torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype),
            "b": torch.randn(shape[1], generator=g, dtype=torch.float64).to(dtype),
            "conv": torch.randn(2, 1, 2, 2, generator=g, dtype=torch.float64).to(dtype),
        }
        for _ in range(n_tasks)
    ]


def np_tvs(tvs):
    return [{k: v.double().numpy() for k, v in tv.items()} for tv in tvs]


def assert_close_dict(got, expected, atol=1e-9, rtol=1e-9):
    assert set(got) == set(expected)
    for key in expected:
        np.testing.assert_allclose(got[key].double().numpy(), expected[key], atol=atol, rtol=rtol, err_msg=key)


# ---------------------------------------------------------------- oracles (numpy, loops)


def oracle_ta(tvs):
    return {k: sum(tv[k] for tv in tvs) for k in tvs[0]}


def _flatten(tvs):
    keys = sorted(tvs[0])
    flat = np.stack([np.concatenate([tv[k].ravel() for k in keys]) for tv in tvs])
    return keys, flat


def _unflatten(keys, vec, like):
    out, offset = {}, 0
    for k in keys:
        n = like[k].size
        out[k] = vec[offset : offset + n].reshape(like[k].shape)
        offset += n
    return out


def oracle_ties(tvs, k=20, merge_func="dis-mean"):
    keys, flat = _flatten(tvs)
    n_tasks, d = flat.shape
    trimmed = flat.copy()
    if k != 100:
        for t in range(n_tasks):
            magnitudes = sorted(abs(x) for x in flat[t])
            threshold = magnitudes[d - int(d * (k / 100)) - 1]  # the reference's kthvalue rank
            for j in range(d):
                if abs(flat[t, j]) < threshold:
                    trimmed[t, j] = 0.0
    elected = [np.sign(sum(trimmed[t, j] for t in range(n_tasks))) for j in range(d)]
    majority = np.sign(sum(elected))
    out = np.zeros(d)
    for j in range(d):
        sign = elected[j] if elected[j] != 0 else majority
        agreeing = [trimmed[t, j] for t in range(n_tasks) if (trimmed[t, j] > 0 if sign > 0 else trimmed[t, j] < 0)]
        out[j] = sum(agreeing) / max(len(agreeing), 1) if merge_func == "dis-mean" else sum(agreeing)
    return _unflatten(keys, out, tvs[0])


def oracle_consensus(tvs, lambdas, k, base):
    mtl = oracle_ta(tvs) if base == "ta" else oracle_ties(tvs, 20, "dis-sum")
    out = {}
    for key in tvs[0]:
        count = np.zeros(tvs[0][key].shape)
        for tv, lam in zip(tvs, lambdas):
            count += np.abs(tv[key]) > lam * np.abs(mtl[key] - tv[key])
        out[key] = mtl[key] * (count >= k)
    return out


def _polar(x):
    p, _, q = np.linalg.svd(x, full_matrices=False)
    return p @ q


def oracle_tsv(tvs):
    n_tasks, out = len(tvs), {}
    for key in tvs[0]:
        if tvs[0][key].ndim != 2:
            out[key] = sum(tv[key] for tv in tvs) / n_tasks
            continue
        m, n = tvs[0][key].shape
        kk = min(m, n)
        r = int(kk / n_tasks)
        big_u, big_s, big_v = np.zeros((m, kk)), np.zeros(kk), np.zeros((kk, n))
        for i, tv in enumerate(tvs):
            u, s, vh = np.linalg.svd(tv[key], full_matrices=False)
            big_u[:, i * r : (i + 1) * r] = u[:, :r]
            big_s[i * r : (i + 1) * r] = s[:r]
            big_v[i * r : (i + 1) * r] = vh[:r]
        out[key] = _polar(big_u) @ np.diag(big_s) @ _polar(big_v)
    return out


def oracle_iso_c(tvs):
    out = {}
    for key in tvs[0]:
        total = sum(tv[key] for tv in tvs)
        if total.ndim != 2:
            out[key] = total / len(tvs)
            continue
        u, s, vh = np.linalg.svd(total, full_matrices=False)
        out[key] = u @ np.diag(np.full(len(s), s.mean())) @ vh
    return out


def oracle_iso_cts(tvs, fraction=0.8):
    n_tasks, out = len(tvs), {}
    for key in tvs[0]:
        total = sum(tv[key] for tv in tvs)
        if total.ndim != 2:
            out[key] = total / n_tasks
            continue
        kk = min(total.shape)
        k_c = int(kk * fraction)
        k_c = kk - round((kk - k_c) / n_tasks) * n_tasks
        n = int((kk - k_c) / n_tasks)
        u, s, vh = np.linalg.svd(total, full_matrices=False)
        us, ss, vs = [], [], []
        for tv in tvs:
            residual = tv[key] - u[:, :k_c] @ u[:, :k_c].T @ tv[key]
            u_t, s_t, vh_t = np.linalg.svd(residual, full_matrices=False)
            us.append(u_t[:, :n]), ss.append(s_t[:n]), vs.append(vh_t[:n])
        big_u = np.concatenate(us + [u[:, :k_c]], axis=1)
        big_s = np.concatenate(ss + [s[:k_c]])
        big_v = np.concatenate(vs + [vh[:k_c]], axis=0)
        out[key] = _polar(big_u) @ np.diag(np.full(kk, big_s.mean())) @ _polar(big_v)
    return out


# ---------------------------------------------------------------- random inputs vs oracles

tv_inputs = st.tuples(st.integers(0, 2**31 - 1), st.integers(1, 4), st.sampled_from(SHAPES))


@SETTINGS
@given(tv_inputs)
def test_task_arithmetic_oracle(args):
    tvs = make_tvs(*args)
    assert_close_dict(task_arithmetic(tvs, LAYER_INFO), oracle_ta(np_tvs(tvs)))


@SETTINGS
@given(tv_inputs, st.sampled_from([5, 20, 50, 100]), st.sampled_from(["dis-mean", "dis-sum", "sum"]))
def test_ties_oracle(args, k, merge_func):
    tvs = make_tvs(*args)
    expected = oracle_ties(np_tvs(tvs), k, merge_func)
    assert_close_dict(ties(tvs, LAYER_INFO, k=k, merge=merge_func), expected)


@SETTINGS
@given(
    tv_inputs,
    st.lists(st.sampled_from([0.2, 0.3, 0.4, 0.5, 0.6]), min_size=4, max_size=4),
    st.integers(0, 3),
    st.sampled_from(["ta", "ties"]),
)
def test_consensus_oracle(args, lambdas, k, base):
    tvs = make_tvs(*args)
    lambdas = lambdas[: len(tvs)]
    expected = oracle_consensus(np_tvs(tvs), lambdas, k, base)
    assert_close_dict(consensus(tvs, LAYER_INFO, lambdas=lambdas, k=k, base=base), expected)


@SETTINGS
@given(tv_inputs)
def test_tsv_m_oracle(args):
    tvs = make_tvs(*args)
    assert_close_dict(tsv_m(tvs, LAYER_INFO), oracle_tsv(np_tvs(tvs)))


@SETTINGS
@given(tv_inputs)
def test_iso_c_oracle(args):
    tvs = make_tvs(*args)
    assert_close_dict(iso_c(tvs, LAYER_INFO), oracle_iso_c(np_tvs(tvs)))


@SETTINGS
@given(tv_inputs, st.sampled_from([0.5, 0.8, 1.0]))
def test_iso_cts_oracle(args, fraction):
    tvs = make_tvs(*args)
    got = iso_cts(tvs, LAYER_INFO, common_space_fraction=fraction)
    assert_close_dict(got, oracle_iso_cts(np_tvs(tvs), fraction))


@pytest.mark.parametrize("n_tasks", [3, 4])
@pytest.mark.parametrize("shape", [(12, 12), (16, 12), (12, 20)])
def test_iso_cts_has_task_specific_part(n_tasks, shape):
    """Shapes where Iso-CTS really has a task-specific block (n >= 1) still match the oracle."""
    assert iso_cts_sizes(min(shape), n_tasks, 0.8)[1] >= 1
    tvs = make_tvs(7, n_tasks, shape)
    assert_close_dict(iso_cts(tvs, LAYER_INFO), oracle_iso_cts(np_tvs(tvs)))


def test_iso_cts_sizes_reference_values():
    # anchors.md, convention 4: 768-wide matrices, T = 8/14/20
    assert iso_cts_sizes(768, 8, 0.8) == (616, 19)
    assert iso_cts_sizes(768, 14, 0.8) == (614, 11)
    assert iso_cts_sizes(768, 20, 0.8) == (608, 8)
    # Python round() is half-to-even: (10 - 8) / 4 = 0.5 -> 0, no task-specific part
    assert iso_cts_sizes(10, 4, 0.8) == (10, 0)


# ---------------------------------------------------------------- hand-made cases


def test_ties_hand_made():
    # column sums 3, -2, 0, 0, 3 -> elected +, -, (0 -> majority +), (0 -> +), +
    tvs = [
        {"a": torch.tensor([3.0, -1.0, 0.0, 2.0, 1.0])},
        {"a": torch.tensor([-1.0, -2.0, 0.0, 2.0, 1.0])},
        {"a": torch.tensor([1.0, 1.0, 0.0, -4.0, 1.0])},
    ]
    torch.testing.assert_close(ties(tvs, {}, k=100)["a"], torch.tensor([2.0, -1.5, 0.0, 2.0, 1.0]))
    torch.testing.assert_close(ties(tvs, {}, k=100, merge="dis-sum")["a"], torch.tensor([4.0, -3.0, 0.0, 4.0, 3.0]))


def test_ties_trim_keeps_ties_over_whole_vector():
    # d = 5 over two keys, k = 20 -> keep |x| >= 4th smallest magnitude (= 2): all three 2s
    tv = {"x": torch.tensor([1.0, -2.0]), "y": torch.tensor([2.0, 0.5, 2.0])}
    out = ties([tv], {}, k=20)
    torch.testing.assert_close(out["x"], torch.tensor([0.0, -2.0]))
    torch.testing.assert_close(out["y"], torch.tensor([2.0, 0.0, 2.0]))


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.integers(1, 5), st.sampled_from(SHAPES))
def test_ties_k100_agreeing_signs_is_disjoint_mean(seed, n_tasks, shape):
    g = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.rand(*shape, generator=g) > 0.5, 1.0, -1.0).double()
    tvs = [{"w": sign * (0.1 + torch.rand(*shape, generator=g, dtype=torch.float64))} for _ in range(n_tasks)]
    total = sum(tv["w"] for tv in tvs)
    torch.testing.assert_close(ties(tvs, {}, k=100)["w"], total / n_tasks)
    torch.testing.assert_close(ties(tvs, {}, k=100, merge="dis-sum")["w"], total)


def test_one_expert():
    tv = make_tvs(3, 1, (6, 4))
    # one expert: TA is the identity, TSV-M keeps every triplet, Iso-CTS stacks the full
    # singular basis of the expert (common top-3 + residual top-1) and so equals Iso-C
    assert_close_dict(task_arithmetic(tv, LAYER_INFO), np_tvs(tv)[0])
    assert_close_dict(tsv_m(tv, LAYER_INFO), np_tvs(tv)[0])
    assert iso_cts_sizes(4, 1, 0.8) == (3, 1)
    assert_close_dict(iso_cts(tv, LAYER_INFO), {k: v.numpy() for k, v in iso_c(tv, LAYER_INFO).items()})
    out = ties(tv, LAYER_INFO, k=100)
    assert_close_dict(out, np_tvs(tv)[0])
    # consensus with one expert: no weight is active in >= 2 tasks
    assert all(not v.any() for v in consensus(tv, LAYER_INFO, k=2).values())
    assert_close_dict(consensus(tv, LAYER_INFO, k=1), np_tvs(tv)[0])


def test_identical_experts():
    one = make_tvs(4, 1, (5, 5))[0]
    tvs = [one, {k: v.clone() for k, v in one.items()}, {k: v.clone() for k, v in one.items()}]
    ref = np_tvs([one])[0]
    assert_close_dict(task_arithmetic(tvs, LAYER_INFO), {k: 3 * v for k, v in ref.items()})
    assert_close_dict(ties(tvs, LAYER_INFO, k=100), ref)
    assert_close_dict(ties(tvs, LAYER_INFO, k=20), oracle_ties([ref], 20))
    # every entry is active for every task (|x| > lambda * 2|x|) -> consensus = TA
    assert_close_dict(consensus(tvs, LAYER_INFO, lambdas=0.4), {k: 3 * v for k, v in ref.items()})
    assert_close_dict(iso_c(tvs, LAYER_INFO), oracle_iso_c(np_tvs(tvs)))
    # TSV-M: each task contributes its top r = 5 // 3 = 1 triplet: singular values (s1, s1, s1, 0, 0)
    s = np.linalg.svd(ref["w"], compute_uv=False)
    np.testing.assert_allclose(
        torch.linalg.svdvals(tsv_m(tvs, LAYER_INFO)["w"]).numpy(), [s[0]] * 3 + [0, 0], atol=1e-9
    )
    np.testing.assert_allclose(tsv_m(tvs, LAYER_INFO)["b"].numpy(), ref["b"], atol=1e-12)
    s_cts = torch.linalg.svdvals(iso_cts(tvs, LAYER_INFO)["w"]).numpy()
    np.testing.assert_allclose(s_cts, np.full(5, s_cts.mean()), atol=1e-9)


@pytest.mark.parametrize("rule", ["task_arithmetic", "ties", "consensus", "tsv_m", "iso_c", "iso_cts"])
@pytest.mark.parametrize("hyper", [{}, {"k": 100}])
def test_inputs_not_modified(rule, hyper):
    tvs = make_tvs(6, 3, (4, 5))
    before = [{k: v.clone() for k, v in tv.items()} for tv in tvs]
    if rule != "ties":
        hyper = {}
    merge(rule, tvs, LAYER_INFO, **hyper)
    for tv, old in zip(tvs, before):
        assert all(torch.equal(tv[k], old[k]) for k in old)


def test_zero_task_vectors():
    zero = [{k: torch.zeros_like(v) for k, v in tv.items()} for tv in make_tvs(0, 3, (4, 6))]
    for rule in ("task_arithmetic", "ties", "consensus", "tsv_m", "iso_c", "iso_cts"):
        out = merge(rule, zero, LAYER_INFO)
        assert all(not v.any() for v in out.values()), rule
    # a zero task vector among others: TA/TIES/Consensus still match their oracles
    tvs = make_tvs(1, 3, (4, 6))
    tvs[1] = {k: torch.zeros_like(v) for k, v in tvs[1].items()}
    ref = np_tvs(tvs)
    assert_close_dict(task_arithmetic(tvs, LAYER_INFO), oracle_ta(ref))
    assert_close_dict(ties(tvs, LAYER_INFO), oracle_ties(ref))
    assert_close_dict(consensus(tvs, LAYER_INFO), oracle_consensus(ref, [0.4] * 3, 2, "ta"))


def rank_deficient_tvs(seed, n_tasks, shape, rank):
    g = torch.Generator().manual_seed(seed)
    tvs = make_tvs(seed, n_tasks, shape)
    for tv in tvs:
        tv["w"] = torch.randn(shape[0], rank, generator=g, dtype=torch.float64) @ torch.randn(
            rank, shape[1], generator=g, dtype=torch.float64
        )
    return tvs


@pytest.mark.parametrize("shape", [(6, 6), (5, 9), (9, 5)])
def test_rank_deficient(shape):
    tvs = rank_deficient_tvs(11, 3, shape, rank=1)
    ref = np_tvs(tvs)
    assert_close_dict(task_arithmetic(tvs, LAYER_INFO), oracle_ta(ref))
    assert_close_dict(ties(tvs, LAYER_INFO), oracle_ties(ref))
    assert_close_dict(consensus(tvs, LAYER_INFO), oracle_consensus(ref, [0.4] * 3, 2, "ta"))
    # TSV-M: the result is an SVD with the stacked top-r singular values (r = min_dim // T)
    r = min(shape) // 3
    stacked = np.concatenate([np.linalg.svd(tv["w"], compute_uv=False)[:r] for tv in ref])
    stacked = np.sort(np.concatenate([stacked, np.zeros(min(shape) - len(stacked))]))[::-1]
    np.testing.assert_allclose(torch.linalg.svdvals(tsv_m(tvs, LAYER_INFO)["w"]).numpy(), stacked, atol=1e-9)
    # Iso-C / Iso-CTS: a flat spectrum at the mean singular value
    total_s = np.linalg.svd(sum(tv["w"] for tv in ref), compute_uv=False)
    np.testing.assert_allclose(
        torch.linalg.svdvals(iso_c(tvs, LAYER_INFO)["w"]).numpy(), np.full(min(shape), total_s.mean()), atol=1e-9
    )
    s_cts = torch.linalg.svdvals(iso_cts(tvs, LAYER_INFO)["w"]).numpy()
    np.testing.assert_allclose(s_cts, np.full(min(shape), s_cts.mean()), atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rule", ["task_arithmetic", "ties", "consensus", "tsv_m", "iso_c", "iso_cts"])
def test_half_precision_dtype_preserved(rule, dtype):
    tvs = make_tvs(5, 3, (8, 6), dtype)
    out = merge(rule, tvs, LAYER_INFO)
    # same math on the (exactly representable) float64 copies, rounded once to the half dtype
    expected = merge(rule, [{k: v.double() for k, v in tv.items()} for tv in tvs], LAYER_INFO)
    for key, value in out.items():
        assert value.dtype == dtype, key
        tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
        torch.testing.assert_close(
            value.double(), expected[key], atol=tol * float(expected[key].abs().max() + 1), rtol=0
        )


def test_task_arithmetic_through_apply():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(4, 4, generator=g, dtype=torch.float64), "ids": torch.arange(3)}
    experts = {
        f"e{i}": {"w": torch.randn(4, 4, generator=g, dtype=torch.float64), "ids": torch.arange(3)} for i in range(3)
    }
    tvs = task_vectors(base, experts)
    merged = merge("task_arithmetic", list(tvs.values()), {"w": LayerInfo(0, "mlp")})
    theta = apply_task_vector(base, merged, 0.3)
    expected = base["w"] + 0.3 * sum(e["w"] - base["w"] for e in experts.values())
    torch.testing.assert_close(theta["w"], expected)
    assert torch.equal(theta["ids"], base["ids"])


# ---------------------------------------------------------------- TALL masks, LiNeS


def test_tall_masks_oracle():
    tvs = make_tvs(9, 3, (4, 4))
    lambdas = [0.2, 0.4, 0.6]
    masks = tall_masks(tvs, lambdas)
    ref = np_tvs(tvs)
    ta = oracle_ta(ref)
    for t, (mask, lam) in enumerate(zip(masks, lambdas)):
        for key in ref[0]:
            assert mask[key].dtype == torch.bool
            np.testing.assert_array_equal(mask[key].numpy(), np.abs(ref[t][key]) > lam * np.abs(ta[key] - ref[t][key]))
    # a larger lambda never activates more weights
    loose, strict = tall_masks(tvs, 0.2), tall_masks(tvs, 0.6)
    for a, b in zip(loose, strict):
        assert all(bool((b[k] <= a[k]).all()) for k in a)


def test_consensus_k_limits():
    tvs = make_tvs(2, 3, (5, 5))
    assert_close_dict(consensus(tvs, LAYER_INFO, k=0), oracle_ta(np_tvs(tvs)))
    assert all(not v.any() for v in consensus(tvs, LAYER_INFO, k=4).values())


BLOCK_INFO = {
    "emb": LayerInfo(None, "embed"),
    "blocks.0.w": LayerInfo(0, "attn"),
    "blocks.1.w": LayerInfo(1, "mlp"),
    "blocks.2.b": LayerInfo(2, "norm"),
    "proj": LayerInfo(None, "head"),
}


def test_lines_scale_coefficients():
    delta = {k: torch.ones(2, 3) for k in BLOCK_INFO}
    out = lines_scale(delta, BLOCK_INFO, alpha=0.25, beta=0.5)
    expected = {"emb": 0.25, "blocks.0.w": 0.25, "blocks.1.w": 0.5, "blocks.2.b": 0.75, "proj": 0.25}
    for key, scale in expected.items():
        torch.testing.assert_close(out[key], torch.full((2, 3), scale))
    out = lines_scale(delta, BLOCK_INFO, alpha=0.25, beta=0.5, num_blocks=5)
    torch.testing.assert_close(out["blocks.2.b"], torch.full((2, 3), 0.25 + 0.5 * 2 / 4))
    one_block = {"a": LayerInfo(0, "mlp"), "e": LayerInfo(None, "embed")}
    out = lines_scale({"a": torch.ones(2), "e": torch.ones(2)}, one_block, alpha=0.3, beta=0.9)
    torch.testing.assert_close(out["a"], torch.full((2,), 0.3))
    half = lines_scale({"emb": torch.ones(2, dtype=torch.bfloat16)}, BLOCK_INFO, alpha=0.5, beta=0.1)
    assert half["emb"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="'missing'"):
        lines_scale({"missing": torch.ones(1)}, BLOCK_INFO, alpha=1.0, beta=0.0)


@SETTINGS
@given(tv_inputs)
def test_lines_alpha(args):
    tvs = make_tvs(*args)
    assert lines_alpha(tvs, task_arithmetic(tvs, LAYER_INFO)) == pytest.approx(1 / len(tvs), rel=1e-12)
    ref = np_tvs(tvs)
    merged = ties(tvs, LAYER_INFO)
    summed = sum(np.abs(v).sum() for v in oracle_ta(ref).values())
    norm_merged = sum(np.abs(v).sum() for v in oracle_ties(ref).values())
    assert lines_alpha(tvs, merged) == pytest.approx(summed / norm_merged / len(tvs), rel=1e-10)


def test_lines_alpha_zero_merge():
    tvs = make_tvs(0, 2, (3, 3))
    with pytest.raises(ValueError, match="zero"):
        lines_alpha(tvs, {k: torch.zeros_like(v) for k, v in tvs[0].items()})


# ---------------------------------------------------------------- registry and bad input


def test_registry_names():
    from submerge.merges import MERGES

    assert set(MERGES) == {"task_arithmetic", "ties", "consensus", "tsv_m", "iso_c", "iso_cts", "hogsvd"}
    for spec in MERGES.values():  # every registered implementation imports
        assert callable(spec.function())


def test_unknown_rule_and_hyperparameter():
    tvs = make_tvs(0, 2, (3, 3))
    with pytest.raises(ConfigError, match="unknown merge function 'dare'"):
        merge("dare", tvs, LAYER_INFO)
    with pytest.raises(ConfigError, match=r"'ties' has no keyword\(s\) \['density'\]"):
        merge("ties", tvs, LAYER_INFO, density=0.2)
    with pytest.raises(ConfigError, match=r"'task_arithmetic' has no keyword\(s\) \['alpha'\]"):
        merge("task_arithmetic", tvs, LAYER_INFO, alpha=0.3)


def test_bad_hyperparameter_values():
    tvs = make_tvs(0, 2, (3, 3))
    with pytest.raises(ConfigError, match="k must be a percentage"):
        merge("ties", tvs, LAYER_INFO, k=0)
    with pytest.raises(ConfigError, match="k must be a percentage"):
        merge("ties", tvs, LAYER_INFO, k=120)
    with pytest.raises(ConfigError, match="merge must be one of"):
        merge("ties", tvs, LAYER_INFO, merge="mean")
    with pytest.raises(ConfigError, match="base must be one of"):
        merge("consensus", tvs, LAYER_INFO, base="tsv")
    with pytest.raises(ConfigError, match="lambdas: got 3 values for 2"):
        merge("consensus", tvs, LAYER_INFO, lambdas=[0.2, 0.3, 0.4])
    with pytest.raises(ConfigError, match="consensus: k"):
        merge("consensus", tvs, LAYER_INFO, k=1.5)
    with pytest.raises(ConfigError, match="common_space_fraction"):
        merge("iso_cts", tvs, LAYER_INFO, common_space_fraction=1.5)
    with pytest.raises(ValueError, match="no task vectors"):
        merge("tsv_m", [], LAYER_INFO)
    bad = make_tvs(1, 2, (3, 3))
    bad[1]["w"] = torch.zeros(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"task vector 1, key 'w'"):
        merge("iso_c", bad, LAYER_INFO)


def test_hogsvd_is_registered_lazily(monkeypatch):
    tvs = make_tvs(0, 2, (3, 3))
    fake = types.ModuleType("submerge.hogsvd")

    def hogsvd_merge(task_vectors, layer_info, *, pi=1e-2, layers="both", attn_mode="per_qkv"):
        return {"pi": torch.tensor(pi), "n": torch.tensor(len(task_vectors))}

    fake.hogsvd_merge = hogsvd_merge
    monkeypatch.setitem(sys.modules, "submerge.hogsvd", fake)
    out = merge("hogsvd", tvs, LAYER_INFO, pi=0.5)
    assert float(out["pi"]) == 0.5 and int(out["n"]) == 2
    with pytest.raises(ConfigError, match=r"'hogsvd' has no keyword\(s\) \['beta'\]"):
        merge("hogsvd", tvs, LAYER_INFO, beta=0.1)
    monkeypatch.setitem(sys.modules, "submerge.hogsvd", None)  # module absent
    with pytest.raises(ConfigError, match="submerge.hogsvd:hogsvd_merge"):
        merge("hogsvd", tvs, LAYER_INFO)
