"""Recipes for the report tests: a config in the recipe's spelling around the given methods and
groups (experts with a ``source``, so nothing is built or downloaded), parsed by parse_config."""

from __future__ import annotations

from typing import Mapping, Sequence

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
