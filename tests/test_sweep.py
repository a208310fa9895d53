"""The sweep's per-point path (:class:`submerge.stages.evaluate.Sweep`): Δ rebuilt per β from
factors that keep their polar factors, one β's Δ held at a time, points grouped by β, and the
tower built once and reloaded per point — each point's model equal, bitwise, to one built
from scratch the way the export does (plain factors, a fresh module)."""

from __future__ import annotations

import torch

from submerge.boosting import BoostFactors
from submerge.models import get_adapter
from submerge.recipe import GridPoint, parse_config
from submerge.stages.common import merged_module
from submerge.stages.evaluate import Sweep, by_beta
from submerge.stages.merge import boost_factors, point_delta, reconstruct
from workflow_utils import load_tiny


def test_by_beta_groups_points_by_beta_and_keeps_their_order_within_a_beta():
    points = [GridPoint(a, b) for a in (0.1, 0.5, 1.0) for b in (0.2, None, 0.0)]  # α outer
    order = by_beta(points)
    assert sorted(order) == list(range(len(points)))
    assert [points[i].beta for i in order] == [None] * 3 + [0.0] * 3 + [0.2] * 3
    assert [points[i].alpha for i in order] == [0.1, 0.5, 1.0] * 3


def _sweep(tmp_path):
    recipe = parse_config(load_tiny())
    method = recipe.methods["ta_sb"]
    files = {}
    for name in ("base", "merged", "head_rot90", "head_parity"):  # hashed for the cache identity only
        files[name] = tmp_path / name
        files[name].write_bytes(name.encode())
    sweep = Sweep(recipe.suite, ["rot90", "parity"], method, "g2", files["base"], files["merged"],
                  [files["head_rot90"], files["head_parity"]], recipe.eval, tmp_path / "cache")
    adapter = get_adapter(recipe.suite.adapter)
    torch.manual_seed(0)
    base = {k: v.detach().clone() for k, v in adapter.build(recipe.suite.arch).state_dict().items()}
    layer_info = adapter.layer_infos(base)
    delta = {k: 0.05 * torch.randn_like(v) for k, v in base.items() if v.is_floating_point()}
    factors = boost_factors(method, delta, layer_info)
    assert factors and all(isinstance(f, BoostFactors) for f in factors.values())
    dense = {k: v for k, v in delta.items() if k not in factors}
    sweep._loaded = (torch.device("cpu"), base, dense, factors, layer_info, [])  # as _load() leaves it
    plain = {k: [tuple(block) for block in f] for k, f in factors.items()}  # as the export reads them
    return recipe, method, sweep, base, dense, plain, layer_info


def test_sweep_models_equal_models_built_from_scratch(tmp_path):
    recipe, method, sweep, base, dense, plain, layer_info = _sweep(tmp_path)
    points = [GridPoint(0.5, 0.0), GridPoint(1.0, 0.0), GridPoint(0.5, 0.2), GridPoint(1.0, None),
              GridPoint(0.3, 0.0)]
    x = torch.randn(2, 3, *sweep.model(points[0])[1].image_size, generator=torch.Generator().manual_seed(1))
    first = None
    for point in points:
        _, module, theta = sweep.model(point)
        first = first or module
        assert module is first  # built once, reloaded
        assert len(sweep._shared["deltas"]) == 1  # one β's Δ held
        delta, coefficient = point_delta(reconstruct(dense, plain, layer_info, method, point.beta),
                                         layer_info, method, point.alpha, None)
        _, fresh, want = merged_module(recipe.suite, base, delta, coefficient, torch.device("cpu"))
        assert theta.keys() == want.keys() and all(torch.equal(theta[k], want[k]) for k in want)
        got_sd, want_sd = module.state_dict(), fresh.state_dict()
        assert got_sd.keys() == want_sd.keys() and all(torch.equal(got_sd[k], want_sd[k]) for k in want_sd)
        with torch.no_grad():
            assert torch.equal(module(x), fresh(x))


def test_run_sweep_evaluates_by_beta_and_keeps_each_points_record_next_to_its_saved_model(tmp_path, monkeypatch):
    """run_sweep evaluates the points grouped by β (each β's Δ built once), writes one record per
    point with its accuracy, chooses on validation over the points in their given order, and with
    ``save_merged`` keeps each point's model beside its record (its sidecar does not replace
    the record)."""
    from safetensors.torch import load_file

    from submerge.io.jsonio import read_json, write_json
    from submerge.stages import evaluate

    recipe, method, prepared, base, dense, plain, layer_info = _sweep(tmp_path)
    built, evaluated = [], []

    class Prepared(Sweep):
        def _load(self):
            self.lines_scale = None
            return prepared._loaded

        def accuracy(self, point, split):
            self.model(point)
            evaluated.append((point, split))
            score = 1.0 - abs(point.alpha - 0.5) - (point.beta or 0.0)  # best: α 0.5, β 0
            return {"accuracy": {"rot90": score, "parity": score}, "device": "cpu"}

    monkeypatch.setattr(evaluate, "Sweep", Prepared)
    monkeypatch.setattr(evaluate, "reconstruct", lambda *a: built.append(a[-1]) or reconstruct(*a))
    refs = []
    for e in ("rot90", "parity"):
        refs.append(tmp_path / f"{e}.json")
        write_json(refs[-1], {"expert": e, "val": {"expert": 1.0, "zeroshot": 0.1},
                              "test": {"expert": 1.0, "zeroshot": 0.1}})
    points = [GridPoint(a, b) for a in (0.3, 0.5, 1.0) for b in (0.0, 0.2)]  # α outer
    grid, test = tmp_path / "grid", tmp_path / "test.json"
    evaluate.run_sweep(recipe.suite, ["rot90", "parity"], method, "g2", points, prepared.base_path,
                       prepared.merged_path, [], refs, grid, test, recipe.eval, tmp_path / "cache",
                       save_merged=True)
    assert built == [0.0, 0.2, 0.0]  # each β once, then the test point's
    assert [p.beta for p, split in evaluated if split == "val"] == [0.0] * 3 + [0.2] * 3
    assert read_json(test)["alpha"] == 0.5 and read_json(test)["beta"] == 0.0
    for point in points:
        record = read_json(grid / f"{point.name}.json")
        assert (record["alpha"], record["beta"]) == (point.alpha, point.beta) and "accuracy" in record
        saved = load_file(grid / f"{point.name}.model.safetensors")
        _, _, want = merged_module(recipe.suite, base, *point_delta(
            reconstruct(dense, plain, layer_info, method, point.beta), layer_info, method, point.alpha, None),
            torch.device("cpu"))
        assert saved.keys() == want.keys() and all(torch.equal(saved[k], want[k]) for k in want)


def test_sweeps_that_share_a_load_share_one_delta_and_one_module(tmp_path):
    """Table 8's per-kind β sweeps (share_loaded): each point's model still equals one built from
    scratch, while the sweeps hold one Δ and one tower between them."""
    from submerge.stages.beta_grid import kind_beta_method

    recipe, method, first, base, dense, plain, layer_info = _sweep(tmp_path)
    sweeps = []
    for pair in ((0.0, 0.2), (0.2, 0.0), (0.2, 0.2)):
        sweep = Sweep(recipe.suite, first.experts, kind_beta_method(method, *pair), "g2", first.base_path,
                      first.merged_path, [], recipe.eval, tmp_path / "cache")
        sweep.share_loaded(first)
        sweeps.append(sweep)
    modules, thetas = set(), []
    for sweep in sweeps + sweeps[:1]:
        for point in (GridPoint(0.5, 0.0), GridPoint(1.0, 0.0)):
            _, module, theta = sweep.model(point)
            modules.add(id(module))
            thetas.append(theta)
            assert len(first._shared["deltas"]) == 1 and sweep._shared is first._shared
            delta, coefficient = point_delta(reconstruct(dense, plain, layer_info, sweep.method, point.beta),
                                             layer_info, sweep.method, point.alpha, None)
            _, fresh, want = merged_module(recipe.suite, base, delta, coefficient, torch.device("cpu"))
            assert all(torch.equal(theta[k], want[k]) for k in want)
            got_sd = module.state_dict()
            assert all(torch.equal(got_sd[k], v) for k, v in fresh.state_dict().items())
    assert len(modules) == 1
    assert not all(torch.equal(thetas[0][k], thetas[2][k]) for k in thetas[0])  # the pairs' Δ differ
