"""Figures render from small synthetic inputs and a recipe: PDF + PNG written, PNG not blank,
byte-identical on re-render; bad inputs raise ValueError."""

from __future__ import annotations

import math

import matplotlib
import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from report_utils import make_recipe
from submerge.report import figures as F

METHODS = {
    "ta": {"merge": "task_arithmetic"},
    "ta_sb": {"merge": "task_arithmetic", "boost": {}},
    "ties": {"merge": "ties"},
}
GROUPS = {f"n{n}": [f"t{i}" for i in range(n)] for n in (2, 4, 8)}
RECIPE = make_recipe(METHODS, GROUPS)


@pytest.fixture(scope="module")
def scores():
    rows = []
    for n in (2, 4):
        tasks = [f"t{i}" for i in range(n)]
        for m, meta in METHODS.items():
            for a in (0.3, 0.6, 1.0):
                for b in ((0.0, 0.01) if meta.get("boost") else (math.nan,)):
                    for t in tasks:
                        acc = (
                            0.8 - 0.03 * n - 0.2 * abs(a - 0.6) + (0.05 if meta.get("boost") else 0)
                        )
                        acc -= 0 if math.isnan(b) else 3 * b
                        rows.append(
                            dict(
                                suite="s",
                                group=f"n{n}",
                                n_experts=n,
                                method=m,
                                alpha=a,
                                beta=b,
                                split="val",
                                task=t,
                                accuracy=acc,
                                expert_accuracy=0.9,
                                zeroshot_accuracy=0.3,
                            )
                        )
                        if a == 0.6 and (math.isnan(b) or b == 0.0):
                            rows.append({**rows[-1], "split": "test", "accuracy": acc - 0.01})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def spectra_frames():
    rng = np.random.default_rng(0)
    summary, sv = [], []
    for n in (2, 4, 8):
        for m in ("ta", "ties"):
            for boosted in (False, True):
                for kind in ("attn", "mlp"):
                    for block in range(2):
                        s = np.sort(rng.gamma(1.0, 1.0, 16))[::-1] * n**0.5
                        if boosted:
                            s = np.maximum(s, s[8])
                        key = f"b{block}.{kind}"
                        summary.append(
                            dict(
                                group=f"n{n}",
                                n_experts=n,
                                method=m,
                                boosted=boosted,
                                key=key,
                                block=block,
                                kind=kind,
                                stable_rank=(s**2).sum() / s[0] ** 2,
                                energy_rank=int(np.searchsorted(np.cumsum(s) / s.sum(), 0.9)) + 1,
                            )
                        )
                        sv += [
                            dict(
                                group=f"n{n}",
                                n_experts=n,
                                method=m,
                                boosted=boosted,
                                kind=kind,
                                key=key,
                                index=i,
                                sigma=float(v),
                            )
                            for i, v in enumerate(s)
                        ]
    return pd.DataFrame(summary), pd.DataFrame(sv)


def _check_rendered(paths):
    pdf, png = paths
    assert pdf.suffix == ".pdf" and png.suffix == ".png"
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 2000
    assert png.stat().st_size > 10_000
    img = mpimg.imread(png)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
    assert float(img[..., :3].std()) > 0.02  # not blank
    rgb = (img[..., :3] * 255).astype(np.uint32)
    colours = np.unique(rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2])
    assert colours.size > 20  # more than a few flat colours


def _render(fn, tmp_path, *args, **kwargs):
    paths = fn(*args, tmp_path / "fig", **kwargs)
    _check_rendered(paths)
    return paths


def _render_twice(fn, tmp_path, *args, **kwargs):
    """Render twice into different files and compare the bytes (determinism)."""
    first = _render(fn, tmp_path, *args, **kwargs)
    second = fn(*args, tmp_path / "again", **kwargs)
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes(), f"{a.name} differs between renders"
    # no timestamps or tool versions (a date would only differ across seconds)
    pdf, png = (p.read_bytes() for p in first)
    for marker in (b"CreationDate", b"Producer", b"matplotlib", matplotlib.__version__.encode()):
        assert marker not in pdf
    assert b"Software" not in png and b"tIME" not in png
    return first


def test_rank_collapse(tmp_path, spectra_frames):
    summary, _ = spectra_frames
    _render(F.rank_collapse, tmp_path, summary, RECIPE, methods=["ta"], kinds=("mlp",))
    _render(F.rank_collapse, tmp_path, summary, RECIPE)  # default: the TA family without LiNeS
    with pytest.raises(ValueError, match="layer kinds"):
        F.rank_collapse(summary, RECIPE, tmp_path / "x", kinds=("embed",))
    with pytest.raises(ValueError, match="stable_rank"):
        F.rank_collapse(summary.drop(columns="stable_rank"), RECIPE, tmp_path / "x")
    only_tsv = make_recipe({"tsv": {"merge": "tsv_m"}}, GROUPS)
    with pytest.raises(ValueError, match="no spectra"):
        F.rank_collapse(summary, only_tsv, tmp_path / "x")


def test_spectra(tmp_path, spectra_frames):
    _, sv = spectra_frames
    _render(F.spectra, tmp_path, sv, RECIPE, method="ta", kinds=("attn",), gammas=(0.5,))
    assert F.default_spectra_method(RECIPE, ["ties", "ta", "ta_sb"]) == "ta_sb"
    unboosted = make_recipe({"ta": METHODS["ta"], "ties": METHODS["ties"]}, GROUPS)
    with pytest.raises(ValueError, match="several methods"):
        F.spectra(sv, unboosted, tmp_path / "x")
    with pytest.raises(ValueError, match="key 'nope'"):
        F.spectra(sv, RECIPE, tmp_path / "x", method="ties", key="nope")


def test_accuracy_vs_experts(tmp_path, scores):
    _render_twice(F.accuracy_vs_experts, tmp_path, scores, RECIPE)
    with pytest.raises(ValueError, match="metric"):
        F.accuracy_vs_experts(scores, RECIPE, tmp_path / "x", metric="f1")


def test_alpha_beta_heatmap(tmp_path, scores):
    _render(F.alpha_beta_heatmap, tmp_path, scores, RECIPE)
    with pytest.raises(ValueError, match="no boosted method"):
        F.alpha_beta_heatmap(scores, make_recipe({"ta": METHODS["ta"]}, GROUPS), tmp_path / "x")


def test_alignment_heatmap(tmp_path):
    rng = np.random.default_rng(1)
    names = ["Cars", "DTD", "EuroSAT", "GTSRB"]
    mats = {k: rng.uniform(0, 1, (4, 4)).tolist() for k in ("attn", "mean")}
    summary = {"group": "n4", "experts": names, "alignment": mats}
    _render_twice(F.alignment_heatmap, tmp_path, summary, RECIPE)
    with pytest.raises(ValueError, match="shape"):
        F.alignment_heatmap({**summary, "alignment": {"attn": np.eye(3).tolist()}}, RECIPE,
                            tmp_path / "x")


def test_subspace_importance(tmp_path):
    rng = np.random.default_rng(2)
    sig = np.exp(rng.normal(0, 1, (3, 40)))
    imp = {"key": "blocks.1.attn.out_proj.weight", "row_block": 0, "sigma": sig.tolist(),
           "merged": (sig.mean(0) / 3).tolist()}
    summary = {"group": "n4", "experts": ["A", "B", "C"], "importance": imp}
    _render(F.subspace_importance, tmp_path, summary, RECIPE)
    with pytest.raises(ValueError, match="expert names"):
        F.subspace_importance({**summary, "experts": ["A", "B"]}, RECIPE, tmp_path / "x")
    with pytest.raises(ValueError, match="merged has"):
        F.subspace_importance({**summary, "importance": {**imp, "merged": [1.0, 1.0, 1.0]}},
                              RECIPE, tmp_path / "x")


# ------------------------------------------------------------- every drawn element readable


def _figure_of(fn, monkeypatch, tmp_path, *args, **kwargs):
    """The matplotlib Figure that ``fn`` saves (rendered as usual, then returned)."""
    saved = []
    real = F.save_figure

    def keep(fig, stem):
        saved.append(fig)
        return real(fig, stem)

    monkeypatch.setattr(F, "save_figure", keep)
    _check_rendered(fn(*args, tmp_path / "fig", **kwargs))
    return saved[0]


def test_alpha_beta_heatmap_draws_only_the_pairs_with_scores(tmp_path, scores, monkeypatch):
    """A boosted method configured for some groups only: no empty panel (the default digits
    config had 8 of 20), one heatmap per (method, group) with validation scores."""
    methods = {**METHODS, "ties_sb": {"merge": "ties", "boost": {}, "groups": ["n4"]}}
    recipe = make_recipe(methods, GROUPS)
    extra = scores.loc[(scores["method"] == "ta_sb") & (scores["group"] == "n4")].assign(
        method="ties_sb")
    frame = pd.concat([scores, extra], ignore_index=True)
    fig = _figure_of(F.alpha_beta_heatmap, monkeypatch, tmp_path, frame, recipe)
    panels = [ax for ax in fig.axes if ax.images]
    titles = sorted(ax.get_title() for ax in panels)
    assert titles == ["TA + SB · n2", "TA + SB · n4", "TIES + SB · n4"]
    # every axes is a panel or its colour bar; none is empty or switched off
    assert all(ax.images or ax.get_label() == "<colorbar>" for ax in fig.axes)
    for ax in panels:
        (image,) = ax.images
        assert np.isfinite(image.get_array()).all()


def test_rank_collapse_separates_equal_curves(tmp_path, spectra_frames, monkeypatch):
    """Boosted methods at the same rank (the digits suite: full rank after boosting): their
    points are drawn side by side, each method with its own marker, and a note names them."""
    summary, _ = spectra_frames
    boosted = summary.loc[summary["boosted"]].copy()
    boosted["stable_rank"] = 16.0  # every boosted curve at the same stable rank
    summary = pd.concat([summary.loc[~summary["boosted"]], boosted], ignore_index=True)
    summary.loc[summary["boosted"], "method"] = summary.loc[summary["boosted"], "method"] + "_sb"
    methods = {**METHODS, "ties_sb": {"merge": "ties", "boost": {}}}
    recipe = make_recipe(methods, GROUPS)
    fig = _figure_of(F.rank_collapse, monkeypatch, tmp_path, summary, recipe, kinds=("attn",))
    ax = fig.axes[0]  # stable rank, attention
    top = [ln for ln in ax.get_lines() if np.allclose(ln.get_ydata(), 16.0)]
    assert len(top) == 2
    xs = [np.asarray(ln.get_xdata(), dtype=float) for ln in top]
    assert np.all(np.abs(xs[0] - xs[1]) > 0.1)  # not on top of each other
    assert top[0].get_marker() != top[1].get_marker()
    note = fig.get_supxlabel()
    assert "TA + SB" in note and "TIES + SB" in note and "stable rank" in note
    # curves that differ are named nowhere
    assert F._coinciding({"a": pd.DataFrame({"n_experts": [2, 4], "v": [1.0, 2.0]}),
                          "b": pd.DataFrame({"n_experts": [2, 4], "v": [1.0, 2.5]}),
                          "c": pd.DataFrame({"n_experts": [4], "v": [2.0]})}, "v") == [["a", "c"]]


def test_subspace_importance_twenty_experts_is_a_heatmap(tmp_path, monkeypatch):
    """Twenty experts: one heatmap row per expert (log colours) instead of twenty lines, and
    the experts' median and quartiles as the only per-expert curves."""
    rng = np.random.default_rng(3)
    names = [f"task{i}" for i in range(20)]
    sig = np.exp(rng.normal(0, 1, (20, 30)))
    summary = {"group": "n20", "experts": names,
               "importance": {"sigma": sig.tolist(), "merged": (sig.mean(0) / 4).tolist()}}
    fig = _figure_of(F.subspace_importance, monkeypatch, tmp_path, summary, RECIPE)
    (heat,) = [ax for ax in fig.axes if ax.images]
    np.testing.assert_allclose(heat.images[0].get_array(), sig)
    assert [t.get_text() for t in heat.get_yticklabels()] == names
    (top,) = [ax for ax in fig.axes if ax.get_legend() is not None]
    medians = [ln for ln in top.get_lines() if ln.get_label() == "experts: median"]
    np.testing.assert_allclose(medians[0].get_ydata(), np.median(sig, axis=0))
    assert len(top.get_lines()) <= 3  # median, merged, threshold
