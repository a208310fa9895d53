"""LiNeS' reference protocol (wang-kee/LiNeS src/eval/eval.py, multi-task merging): the scale
α = ‖Σ_t τ_t‖₁ / ‖τ_merged‖₁ / T fixed from the norms, LiNeS' β tuned over the method's alpha
list, merge coefficient 1.0; the previous behaviour kept as protocol ``fixed_slope``."""

import pytest
import torch

from submerge.errors import ConfigError
from submerge.layers import LayerInfo
from submerge.recipe import DEFAULT_LINES_SLOPES, Method, parse_method
from submerge.stages.merge import merged_task_vector, point_delta

GRID = {"alpha": [0.1, 0.2], "beta": [0.0]}
INFO = {"blocks.0.w": LayerInfo(0, "mlp"), "blocks.1.w": LayerInfo(1, "mlp"),
        "blocks.2.w": LayerInfo(2, "mlp"), "emb": LayerInfo(None, "embed")}


def _tvs():
    return [
        {"blocks.0.w": torch.tensor([[1.0, -2.0]]), "blocks.1.w": torch.tensor([[0.0, 3.0]]),
         "blocks.2.w": torch.tensor([[2.0, 2.0]]), "emb": torch.tensor([1.0])},
        {"blocks.0.w": torch.tensor([[-1.0, 2.0]]), "blocks.1.w": torch.tensor([[4.0, 0.0]]),
         "blocks.2.w": torch.tensor([[0.0, -1.0]]), "emb": torch.tensor([-3.0])},
    ]


def test_reference_is_the_default_protocol_and_fixed_slope_stays_an_option():
    ref = parse_method("m", {"merge": "task_arithmetic", "lines": {}}, GRID, ["g"])
    assert ref.lines.protocol == "reference" and ref.lines.tunes_slope
    assert ref.alphas == DEFAULT_LINES_SLOPES  # the reference's β list, not grid.alpha
    old = parse_method("m", {"merge": "task_arithmetic",
                             "lines": {"protocol": "fixed_slope", "slope": 0.5}}, GRID, ["g"])
    assert not old.lines.tunes_slope and old.lines.slope == 0.5 and old.alphas == (0.1, 0.2)
    assert Method.from_params(ref.to_params()).lines == ref.lines
    assert Method.from_params(old.to_params()).lines == old.lines
    with pytest.raises(ConfigError, match=r"methods\.m\.lines\.slope"):
        parse_method("m", {"merge": "task_arithmetic", "lines": {"slope": 0.5}}, GRID, ["g"])
    with pytest.raises(ConfigError, match=r"methods\.m\.lines\.protocol"):
        parse_method("m", {"merge": "task_arithmetic", "lines": {"protocol": "x"}}, GRID, ["g"])


def test_reference_alpha_equals_the_formula_by_hand():
    """TIES-like merged vector that is not the sum: α computed by hand from the numbers."""
    tvs = _tvs()
    # Σ_t τ_t = [0, 0], [4, 3], [2, 1], [-2]  ->  ‖·‖₁ = 0 + 7 + 3 + 2 = 12
    merged = {"blocks.0.w": torch.tensor([[0.5, 0.0]]), "blocks.1.w": torch.tensor([[1.0, 1.0]]),
              "blocks.2.w": torch.tensor([[0.0, 1.0]]), "emb": torch.tensor([-0.5])}
    # ‖τ_merged‖₁ = 0.5 + 2 + 1 + 0.5 = 4, T = 2  ->  α = 12 / 4 / 2 = 1.5
    method = parse_method("m", {"merge": "task_arithmetic", "lines": {}}, GRID, ["g"])
    from submerge.merging.lines import lines_alpha

    assert lines_alpha(tvs, merged) == pytest.approx(1.5, rel=1e-12)
    # TA: Δ = Σ τ, so α = 1/T; the merged cache keeps Δ unscaled and records the scale
    delta, attrs = merged_task_vector(method, tvs, INFO)
    assert attrs["lines_scale"] == pytest.approx(0.5, rel=1e-12)
    for k in delta:
        torch.testing.assert_close(delta[k], tvs[0][k] + tvs[1][k])


def test_point_delta_applies_lines_with_coefficient_one():
    method = parse_method("m", {"merge": "task_arithmetic", "lines": {}}, GRID, ["g"])
    delta = {k: torch.ones(1, 2) if k != "emb" else torch.ones(1) for k in INFO}
    scaled, coefficient = point_delta(delta, INFO, method, 0.4, 0.25)
    assert coefficient == 1.0
    # block l of L = 3: 0.25 + 0.4 * l / 2; outside the blocks: 0.25
    for key, expect in (("blocks.0.w", 0.25), ("blocks.1.w", 0.45), ("blocks.2.w", 0.65),
                        ("emb", 0.25)):
        assert torch.allclose(scaled[key], torch.full_like(delta[key], expect))
    fixed = parse_method("m", {"merge": "task_arithmetic", "lines": {"protocol": "fixed_slope"}},
                         GRID, ["g"])
    same, coefficient = point_delta(delta, INFO, fixed, 0.4, None)
    assert coefficient == 0.4 and all(torch.equal(same[k], delta[k]) for k in delta)
    with pytest.raises(ValueError, match="lines_scale"):
        point_delta(delta, INFO, method, 0.4, None)


def test_fixed_slope_output_unchanged():
    """The fixed-slope protocol applies LiNeS in the merge exactly as before."""
    from submerge.merging.lines import lines_scale

    tvs = _tvs()
    method = parse_method("m", {"merge": "task_arithmetic",
                                "lines": {"protocol": "fixed_slope", "slope": 0.5}}, GRID, ["g"])
    delta, attrs = merged_task_vector(method, tvs, INFO)
    summed = {k: tvs[0][k] + tvs[1][k] for k in INFO}
    expect = lines_scale(summed, INFO, alpha=0.5, beta=0.5)
    assert attrs["lines_slope"] == 0.5
    for k in INFO:
        assert torch.equal(delta[k], expect[k])
