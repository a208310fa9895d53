"""Subspace Boosting against a literal transcription of Algorithm 1 and its properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from submerge.boosting import (
    boost_cutoff,
    boost_from_factors,
    boost_matrix,
    boost_singular_values,
    boost_targets,
    subspace_boost,
    svd_factors,
)
from submerge.errors import ConfigError
from submerge.layers import LayerInfo
from submerge.spectral import stable_rank

SETTINGS = settings(max_examples=25, deadline=None)
BETAS = [0.0, 0.01, 0.02, 0.5, 0.99]
SHAPES = [(6, 6), (4, 9), (9, 4), (1, 5)]


def algorithm_1(param, beta):
    """Algorithm 1 of the paper, transcribed line by line (float64, no fallback needed for beta < 1)."""
    U, S, Vh = torch.linalg.svd(param, full_matrices=False)
    t_sum = S.sum()
    c_sum = torch.cumsum(S, dim=0)
    n_sum = c_sum / t_sum
    k = (n_sum >= beta).nonzero()
    idx = k[0].item()
    S_new = torch.clamp(S, S[idx])
    return U @ torch.diag(S_new) @ Vh


def rand(shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), shape=st.sampled_from(SHAPES), beta=st.sampled_from(BETAS))
def test_matches_algorithm_1(seed, shape, beta):
    m = rand(shape, seed)
    torch.testing.assert_close(boost_matrix(m, beta), algorithm_1(m, beta), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("beta", BETAS)
def test_matches_algorithm_1_float32(shape, beta):
    m = rand(shape, 1, torch.float32)
    out = boost_matrix(m, beta)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), algorithm_1(m.double(), beta), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_beta_zero_is_sigma_max_times_u_vh(shape):
    m = rand(shape, 2)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    torch.testing.assert_close(boost_matrix(m, 0.0), s[0] * u @ vh)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), shape=st.sampled_from(SHAPES), beta=st.floats(0.0, 0.999))
def test_never_lowers_singular_values_and_raises_stable_rank(seed, shape, beta):
    # a fast-decaying spectrum, as in merged task vectors
    m = rand(shape, seed) @ torch.diag(0.3 ** torch.arange(shape[1], dtype=torch.float64))
    before = torch.linalg.svdvals(m)
    boosted = boost_matrix(m, beta)
    after = torch.linalg.svdvals(boosted)
    assert bool((after >= before - 1e-10).all())
    assert after[0] == pytest.approx(float(before[0]), rel=1e-10)  # the top value is never changed
    assert stable_rank(boosted) >= stable_rank(m) - 1e-9


def test_cutoff_hand_made():
    s = torch.tensor([3.0, 1.0])  # cumulative share 0.75, 1.0
    assert boost_cutoff(s, 0.0) == 0
    assert boost_cutoff(s, 0.75) == 0
    assert boost_cutoff(s, 0.76) == 1
    torch.testing.assert_close(boost_singular_values(s, 0.5), torch.tensor([3.0, 3.0]))
    torch.testing.assert_close(boost_singular_values(s, 0.9), torch.tensor([3.0, 1.0]))
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])  # shares 0.4, 0.7, 0.9, 1.0
    torch.testing.assert_close(boost_singular_values(s, 0.65), torch.tensor([4.0, 3.0, 3.0, 3.0]))
    # no index reaches beta (rounding of a ratio just below 1): the last index, a no-op
    assert boost_cutoff(torch.tensor([1.0, 1e-30]), 0.999999) == 0
    assert boost_cutoff(torch.zeros(3), 0.5) == 2


@pytest.mark.parametrize("beta", BETAS)
def test_zero_matrix_stays_zero(beta):
    assert not boost_matrix(torch.zeros(4, 3), beta).any()
    torch.testing.assert_close(boost_singular_values(torch.zeros(3), beta), torch.zeros(3))
    factors = svd_factors({"w": torch.zeros(4, 3)}, {"w": LayerInfo(0, "mlp")})["w"]
    assert not boost_from_factors(factors, beta=beta).any()


@pytest.mark.parametrize("beta", [-0.1, 1.0, 1.5, math.nan, True, "0.1"])
def test_beta_outside_range(beta):
    with pytest.raises(ValueError, match="beta must be a number in \\[0, 1\\)"):
        boost_matrix(torch.eye(3), beta)
    with pytest.raises(ValueError, match="beta"):
        subspace_boost({"w": torch.eye(3)}, {"w": LayerInfo(0, "mlp")}, beta=beta)
    with pytest.raises(ValueError, match="beta"):
        boost_from_factors([(torch.eye(2), torch.ones(2), torch.eye(2))], beta=beta)
    with pytest.raises(ValueError, match=r"beta\['mlp'\]"):
        subspace_boost({"w": torch.eye(3)}, {"w": LayerInfo(0, "mlp")}, beta={"attn": 0.0, "mlp": beta})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    m = rand((6, 5), 3, dtype)
    out = boost_matrix(m, 0.02)
    assert out.dtype == dtype
    torch.testing.assert_close(out, algorithm_1(m.double(), 0.02).to(dtype))
    u, s, vh = svd_factors({"w": m}, {"w": LayerInfo(0, "mlp")})["w"][0]
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    assert svd_factors({"w": m.double()}, {"w": LayerInfo(0, "mlp")})["w"][0][1].dtype == torch.float64


# ---------------------------------------------------------------- state dicts: targets and modes

D = 4
LAYER_INFO = {
    "blk.0.attn.in_proj_weight": LayerInfo(0, "attn", stacked=3),
    "blk.0.attn.in_proj_bias": LayerInfo(0, "other"),
    "blk.0.attn.out_proj.weight": LayerInfo(0, "attn"),
    "blk.0.mlp.c_fc.weight": LayerInfo(0, "mlp"),
    "blk.0.mlp.c_fc.bias": LayerInfo(0, "mlp"),  # 1-D: never boosted, whatever its kind
    "blk.0.ln_1.weight": LayerInfo(0, "norm"),
    "embed.weight": LayerInfo(None, "embed"),
    "head.weight": LayerInfo(None, "head"),
    "other.weight": LayerInfo(None, "other"),
}


def delta(seed=0, dtype=torch.float64):
    shapes = {
        "blk.0.attn.in_proj_weight": (3 * D, D),
        "blk.0.attn.in_proj_bias": (3 * D,),
        "blk.0.attn.out_proj.weight": (D, D),
        "blk.0.mlp.c_fc.weight": (2 * D, D),
        "blk.0.mlp.c_fc.bias": (2 * D,),
        "blk.0.ln_1.weight": (D,),
        "embed.weight": (5, D),
        "head.weight": (3, D),
        "other.weight": (D, 2),
    }
    return {k: rand(s, seed + i, dtype) for i, (k, s) in enumerate(shapes.items())}


UNTOUCHED = [
    "blk.0.attn.in_proj_bias",
    "blk.0.mlp.c_fc.bias",
    "blk.0.ln_1.weight",
    "embed.weight",
    "head.weight",
    "other.weight",
]
QKV, OUT, FC = "blk.0.attn.in_proj_weight", "blk.0.attn.out_proj.weight", "blk.0.mlp.c_fc.weight"


def test_targets():
    assert boost_targets(LAYER_INFO) == {QKV: 3, OUT: 1, FC: 1, "blk.0.mlp.c_fc.bias": 1}
    assert boost_targets(LAYER_INFO, attn_mode="full") == {QKV: 1, OUT: 1, FC: 1, "blk.0.mlp.c_fc.bias": 1}
    assert boost_targets(LAYER_INFO, attn_mode="none") == {FC: 1, "blk.0.mlp.c_fc.bias": 1}
    assert boost_targets(LAYER_INFO, layers="attn") == {QKV: 3, OUT: 1}
    assert boost_targets(LAYER_INFO, layers="mlp", attn_mode="full") == {FC: 1, "blk.0.mlp.c_fc.bias": 1}


@pytest.mark.parametrize("beta", BETAS)
def test_per_qkv_full_none(beta):
    d = delta()
    per_qkv = subspace_boost(d, LAYER_INFO, beta=beta)
    blocks = d[QKV].split(D, dim=0)
    torch.testing.assert_close(per_qkv[QKV], torch.cat([algorithm_1(b, beta) for b in blocks]))
    torch.testing.assert_close(per_qkv[OUT], algorithm_1(d[OUT], beta))
    torch.testing.assert_close(per_qkv[FC], algorithm_1(d[FC], beta))
    full = subspace_boost(d, LAYER_INFO, beta=beta, attn_mode="full")
    torch.testing.assert_close(full[QKV], algorithm_1(d[QKV], beta))
    torch.testing.assert_close(full[OUT], algorithm_1(d[OUT], beta))
    none = subspace_boost(d, LAYER_INFO, beta=beta, attn_mode="none")
    assert none[QKV] is d[QKV] and none[OUT] is d[OUT]
    torch.testing.assert_close(none[FC], algorithm_1(d[FC], beta))
    for out in (per_qkv, full, none):
        assert set(out) == set(d)
        for key in UNTOUCHED:
            assert out[key] is d[key], key


def test_layer_filter():
    d = delta()
    mlp_only = subspace_boost(d, LAYER_INFO, beta=0.0, layers="mlp")
    assert mlp_only[QKV] is d[QKV] and mlp_only[OUT] is d[OUT]
    torch.testing.assert_close(mlp_only[FC], algorithm_1(d[FC], 0.0))
    attn_only = subspace_boost(d, LAYER_INFO, beta=0.0, layers="attn")
    assert attn_only[FC] is d[FC]
    torch.testing.assert_close(attn_only[OUT], algorithm_1(d[OUT], 0.0))
    for out in (mlp_only, attn_only):
        for key in UNTOUCHED:
            assert out[key] is d[key], key
    assert set(svd_factors(d, LAYER_INFO, layers="mlp")) == {FC}
    assert set(svd_factors(d, LAYER_INFO, layers="attn", attn_mode="none")) == set()


def test_beta_per_layer_type():
    d = delta()
    out = subspace_boost(d, LAYER_INFO, beta={"attn": 0.0, "mlp": 0.5})
    torch.testing.assert_close(out[OUT], algorithm_1(d[OUT], 0.0))
    torch.testing.assert_close(out[FC], algorithm_1(d[FC], 0.5))
    with pytest.raises(ConfigError, match=r"lacks a value for \['attn'\]"):
        subspace_boost(d, LAYER_INFO, beta={"mlp": 0.5})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['embed'\]"):
        subspace_boost(d, LAYER_INFO, beta={"attn": 0.0, "mlp": 0.5, "embed": 0.1})
    # with attention not boosted, an mlp-only mapping is enough
    out = subspace_boost(d, LAYER_INFO, beta={"mlp": 0.5}, attn_mode="none")
    torch.testing.assert_close(out[FC], algorithm_1(d[FC], 0.5))


@pytest.mark.parametrize("attn_mode", ["per_qkv", "full", "none"])
def test_factored_equals_direct(attn_mode):
    d = delta(seed=5)
    factors = svd_factors(d, LAYER_INFO, attn_mode=attn_mode)
    assert set(factors) == ({QKV, OUT, FC} if attn_mode != "none" else {FC})
    if attn_mode == "per_qkv":
        assert len(factors[QKV]) == 3
    for beta in BETAS + [None]:
        direct = d if beta is None else subspace_boost(d, LAYER_INFO, beta=beta, attn_mode=attn_mode)
        for alpha in (0.1, 0.3, 0.7, 1.0, 2.5):
            scaled = (
                subspace_boost({k: alpha * v for k, v in d.items()}, LAYER_INFO, beta=beta, attn_mode=attn_mode)
                if beta is not None
                else None
            )
            for key, f in factors.items():
                rebuilt = boost_from_factors(f, beta=beta, alpha=alpha, dtype=torch.float64)
                torch.testing.assert_close(rebuilt, alpha * direct[key], rtol=1e-10, atol=1e-10)
                if scaled is not None:  # alpha and boosting commute: SB(a W) = a SB(W)
                    torch.testing.assert_close(rebuilt, scaled[key], rtol=1e-10, atol=1e-10)


def test_factored_half_dtype():
    d = delta(seed=2, dtype=torch.bfloat16)
    f = svd_factors(d, LAYER_INFO)[FC]
    out = boost_from_factors(f, beta=0.02, alpha=0.5, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, (0.5 * algorithm_1(d[FC].double(), 0.02)).to(torch.bfloat16))


def test_bad_options():
    d = delta()
    with pytest.raises(ConfigError, match="layers must be one of"):
        subspace_boost(d, LAYER_INFO, beta=0.0, layers="all")
    with pytest.raises(ConfigError, match="attn_mode must be one of"):
        svd_factors(d, LAYER_INFO, attn_mode="per_head")
    with pytest.raises(ValueError, match=r"layer_info has no entry for key\(s\) 'new.weight'"):
        subspace_boost({**d, "new.weight": torch.eye(2)}, LAYER_INFO, beta=0.0)
    with pytest.raises(ValueError, match=r"'q': 5 rows cannot be split into 3"):
        subspace_boost({"q": torch.ones(5, 2)}, {"q": LayerInfo(0, "attn", stacked=3)}, beta=0.0)
    with pytest.raises(ValueError, match="no factors"):
        boost_from_factors([], beta=0.0)


# ---------------------------------------------------------------- the polar form of the factored rebuild

PD = 24  # model width of the polar-form tests: spectra with a few large singular values
POLAR_INFO = {"attn.in_proj_weight": LayerInfo(0, "attn", stacked=3), "attn.out_proj.weight": LayerInfo(0, "attn"),
              "mlp.c_fc.weight": LayerInfo(0, "mlp"), "mlp.c_proj.weight": LayerInfo(0, "mlp")}
POLAR_SHAPES = {"attn.in_proj_weight": (3 * PD, PD), "attn.out_proj.weight": (PD, PD),
                "mlp.c_fc.weight": (4 * PD, PD), "mlp.c_proj.weight": (PD, 4 * PD)}
POLAR_BETAS = [0.0, 0.01, 0.02, 0.1, 0.2, 0.5, 0.9, 0.99]


def structured(seed, dtype):
    """A task-vector-like delta: a rank-4 part plus noise (a few dominant singular values, so
    that small betas cut early and the polar form is used)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, (m, n) in POLAR_SHAPES.items():
        low = torch.randn(m, 4, generator=g, dtype=torch.float64) @ torch.randn(4, n, generator=g, dtype=torch.float64)
        out[key] = (low + 0.1 * torch.randn(m, n, generator=g, dtype=torch.float64)).to(dtype)
    return out


def rel_fro(a, b):
    return float(torch.linalg.norm((a - b).double()) / torch.linalg.norm(b.double()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_polar_form_equals_literal_subspace_boost_within_tolerance(dtype, seed):
    from submerge.boosting import POLAR_MAX_FRACTION, POLAR_RTOL

    d = structured(seed, dtype)
    factors = svd_factors(d, POLAR_INFO)
    assert len(factors["attn.in_proj_weight"]) == 3  # per-row-block attention
    used = {"polar": 0, "full": 0}
    for beta in POLAR_BETAS:
        literal = subspace_boost(d, POLAR_INFO, beta=beta)
        for key, f in factors.items():
            got = boost_from_factors(f, beta=beta, dtype=dtype)
            assert got.dtype == dtype
            assert rel_fro(got, literal[key]) <= POLAR_RTOL[dtype], (key, beta)
            for u, s, vh in f:
                used["polar" if boost_cutoff(s, beta) < POLAR_MAX_FRACTION * s.numel() else "full"] += 1
            if all(boost_cutoff(s, beta) >= POLAR_MAX_FRACTION * s.numel() for _, s, _ in f):
                # the full product: the literal rebuild, bitwise
                assert torch.equal(got, literal[key]), (key, beta)
    assert used["polar"] and used["full"]  # both forms exercised


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_polar_form_against_algorithm_1(dtype):
    d = structured(7, dtype)
    factors = svd_factors(d, POLAR_INFO, attn_mode="full")
    for beta in (0.0, 0.02, 0.2):
        for key, f in factors.items():
            want = algorithm_1(d[key].double(), beta)
            tol = 1e-5 if dtype == torch.float32 else 1e-12
            assert rel_fro(boost_from_factors(f, beta=beta, alpha=0.3, dtype=torch.float64), 0.3 * want) <= tol


def test_polar_form_beta_zero_is_sigma_max_times_the_polar_factor_bitwise():
    f = svd_factors(structured(3, torch.float32), POLAR_INFO)["mlp.c_fc.weight"]
    u, s, vh = f[0]
    assert torch.equal(boost_from_factors(f, beta=0.0), (u @ vh) * s[0])


def test_no_boosting_is_the_plain_product_bitwise():
    for dtype in (torch.float32, torch.float64):
        factors = svd_factors(structured(4, dtype), POLAR_INFO)
        for f in factors.values():
            want = torch.cat([(u * (0.7 * s)) @ vh for u, s, vh in f], dim=0)
            assert torch.equal(boost_from_factors(f, beta=None, alpha=0.7, dtype=dtype), want)


def test_cached_polar_factor_gives_the_same_bits_as_plain_factors():
    from submerge.boosting import BoostFactors

    factors = svd_factors(structured(5, torch.float32), POLAR_INFO)
    for key, f in factors.items():
        assert isinstance(f, BoostFactors)
        plain = [tuple(block) for block in f]
        for beta in POLAR_BETAS + [None]:
            for alpha in (1.0, 0.25):
                assert torch.equal(boost_from_factors(f, beta=beta, alpha=alpha),
                                   boost_from_factors(plain, beta=beta, alpha=alpha)), (key, beta)
    f = factors["attn.in_proj_weight"]
    old = f.polar(1)
    assert f.polar(1) is old  # computed once
    assert f.polar_bytes() == 3 * PD * PD * 4
    u, s, vh = f[1]
    f[1] = (u.flip(1), s.flip(0), vh.flip(0))  # the same matrix from other tensors: recomputed
    assert f.polar(1) is not old
    torch.testing.assert_close(f.polar(1), u @ vh)


def test_boost_factors_rejects_blocks_that_are_not_triples():
    from submerge.boosting import BoostFactors

    with pytest.raises(ValueError, match="block 0 is not"):
        BoostFactors([(torch.eye(2), torch.ones(2))])
