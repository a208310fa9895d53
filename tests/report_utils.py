"""Recipes for the report tests: a config in the recipe's spelling around the given methods and
groups (experts with a ``source``, so nothing is built or downloaded), parsed by parse_config;
and synthetic files of every report input."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from submerge.recipe import Recipe, parse_config


def report_config(methods: Mapping, groups: Mapping[str, Sequence[str]], *,
                  metric: str = "normalized", alpha: Sequence[float] = (0.5, 1.0),
                  beta: Sequence[float] = (0.0, 0.01), selection: Mapping | None = None) -> dict:
    experts = list(dict.fromkeys(e for members in groups.values() for e in members))
    cfg = {
        "suite": "s",
        "adapter": "open_clip_vit",
        "base": {"source": {"url": "https://example.org/base.pt"}},
        "experts": {e: {"source": {"url": f"https://example.org/{e}.pt"},
                        "head": {"source": {"url": f"https://example.org/head_{e}.pt"}},
                        "dataset": {"hub": f"example/{e}"}} for e in experts},
        "groups": {g: list(m) for g, m in groups.items()},
        "methods": {name: dict(m) for name, m in methods.items()},
        "grid": {"alpha": list(alpha), "beta": list(beta)},
        "eval": {"selection_metric": metric},
    }
    if selection:
        cfg["experiments"] = {"selection": dict(selection)}
    return cfg


def make_recipe(methods: Mapping, groups: Mapping[str, Sequence[str]], **kwargs) -> Recipe:
    return parse_config(report_config(methods, groups, **kwargs))


def report_inputs(root: Path, methods: Mapping, groups: Mapping[str, Sequence[str]],
                  expert_accuracy: Mapping[str, float], *, with_selection: bool = False,
                  seed: int = 0) -> dict[str, list[str]]:
    """Synthetic files of every report input (submerge.report.registry.INPUTS) in ``root``:
    input name -> its files ([] for an absent selection experiment). Scores for each (group,
    method) on a 2 × (1 or 2) grid, the first point chosen for test; benchmark files; spectra
    summaries of ta/ta_sb (when configured); the HO-GSVD summary of the largest group."""
    rng = np.random.default_rng(seed)
    rows = []
    for g, tasks in groups.items():
        for m in methods:
            betas = [0.0, 0.01] if "boost" in methods[m] else [math.nan]
            for a in (0.5, 1.0):
                for b in betas:
                    chosen = a == 0.5 and (math.isnan(b) or b == 0.0)  # the test point
                    for split in ("val", "test") if chosen else ("val",):
                        for t in tasks:
                            rows.append(dict(suite="s", group=g, n_experts=len(tasks), method=m,
                                             alpha=a, beta=b, split=split, task=t,
                                             accuracy=float(rng.uniform(0.3, 0.7)),
                                             expert_accuracy=expert_accuracy[t], zeroshot_accuracy=0.2))
    files: dict[str, list[str]] = {}
    scores = root / "scores.csv"
    pd.DataFrame(rows).to_csv(scores, index=False, float_format="%.6g")
    files["scores"] = [str(scores)]
    files["selection"] = []
    if with_selection:
        sel = root / "selection.csv"
        pd.DataFrame([dict(setting=s, draw=d, split="test", task=t, task_set=ts, accuracy=0.5 + 0.01 * d)
                      for s, draws in (("random", (0, 1)), ("hogsvd", (0,)))
                      for d in draws for t, ts in (("a", "pool"), ("c", "ext"))]).to_csv(sel, index=False)
        files["selection"] = [str(sel)]
    files["benchmarks"] = []
    for g in groups:
        for m in methods:
            path = root / "benchmarks" / g / f"{m}.tsv"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("s\th:m:s\tmax_rss\n1.25\t0:00:01\t100.0\n")
            files["benchmarks"].append(str(path))
    summary, sigma = [], []
    for g, tasks in groups.items():
        for m in [m for m in ("ta", "ta_sb") if m in methods]:
            for kind in ("attn", "mlp"):
                s = np.sort(rng.gamma(1.0, 1.0, 12))[::-1] * len(tasks)
                key = f"blocks.0.{kind}.weight"
                summary.append(dict(group=g, n_experts=len(tasks), method=m, boosted=m == "ta_sb",
                                    key=key, block=0, kind=kind, stable_rank=float((s**2).sum() / s[0]**2),
                                    energy_rank=5))
                for state in {m == "ta_sb", False}:
                    sigma += [dict(group=g, n_experts=len(tasks), method=m, boosted=state, kind=kind,
                                   key=key, index=i, sigma=float(v)) for i, v in enumerate(s)]
    for name, frame in (("spectra_summary", summary), ("singular_values", sigma)):
        path = root / f"{name}.csv"
        pd.DataFrame(frame).to_csv(path, index=False)
        files[name] = [str(path)]
    hog = root / "hogsvd_summary.json"
    largest = max(groups, key=lambda g: len(groups[g]))
    n = len(groups[largest])
    hog.write_text(json.dumps({
        "group": largest, "experts": list(groups[largest]),
        "alignment": {k: rng.uniform(0, 1, (n, n)).tolist() for k in ("attn", "mlp", "mean")},
        "importance": {"key": "blocks.0.attn.out_proj.weight", "row_block": 0,
                       "sigma": np.exp(rng.normal(0, 1, (n, 16))).tolist(),
                       "merged": np.exp(rng.normal(0, 1, 16)).tolist()}}))
    files["hogsvd_summary"] = [str(hog)]
    return files
