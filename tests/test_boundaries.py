"""Code boundaries: architecture knowledge stays in submerge.models; no import cycles between
the packages data, suites, models and the evaluate module.

Both checks read the source (regexes, and ``ast`` through submerge.fingerprint, the parser that
also decides which jobs a code change reruns), so they also see imports inside functions.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from submerge.fingerprint import imported_modules
from submerge.models import _ADAPTERS

SRC = Path(__file__).resolve().parents[1] / "src" / "submerge"
NAMES = "|".join(map(re.escape, sorted(_ADAPTERS)))
COMPARISONS = [
    # adapter == "...", suite["adapter"] != '...', cfg.get("adapter") in (...), adapter not in [...]
    re.compile(r"adapter[\"']?[\])]?\s*(==|!=|(not\s+)?in)\s*[(\[{\"']"),
    # == "hf_t5", "open_clip_vit" != x, in ("open_clip_vit", ...), case "hf_t5":
    re.compile(rf"(==|!=)\s*[\"']({NAMES})[\"']|[\"']({NAMES})[\"']\s*(==|!=|(not\s+)?in\b)"
               rf"|\bin\s*[(\[{{][^)\]}}]*[\"']({NAMES})[\"']|\bcase\s+[\"']({NAMES})[\"']"),
    # a concrete adapter module or class used directly
    re.compile(r"models\.(open_clip_vit|hf_clip|hf_t5)\b|\b(OpenClipViTAdapter|HFCLIPVisionAdapter|HFT5Adapter)\b"),
]


def _outside_models() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py")
                  if p.relative_to(SRC).parts[0] != "models")


def test_the_pattern_catches_adapter_branches():
    bad = ['if suite["adapter"] == "open_clip_vit":', "elif adapter != 'hf_clip_vision':",
           'if cfg.get("adapter") in ("a", "b"):', 'if adapter not in ("open_clip_vit", "hf_clip_vision"):',
           'if suite.adapter == "hf_t5":', 'if name in {"hf_t5"}:', '"hf_t5" == x',
           "from submerge.models.hf_clip import CLIPImageProcess"]
    good = ['adapter = get_adapter(suite_cfg["adapter"])', 'get_adapter("open_clip_vit").build(arch)',
            "raise ConfigError(f'adapter {name!r} has no image preprocessing')"]
    for line in bad:
        assert any(p.search(line) for p in COMPARISONS), line
    for line in good:
        assert not any(p.search(line) for p in COMPARISONS), line


@pytest.mark.parametrize("path", _outside_models(), ids=lambda p: str(p.relative_to(SRC)))
def test_no_adapter_name_branches_outside_models(path):
    hits = [f"{path.relative_to(SRC)}:{i}: {line.strip()}"
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if not line.lstrip().startswith("#") and any(p.search(line) for p in COMPARISONS)]
    assert not hits, "architecture-specific branches belong in submerge.models adapters:\n" + "\n".join(hits)


# ----------------------------------------------------------------------------- import graph

def _node(module: str) -> str | None:
    """``submerge.data.heads`` -> ``data``; ``submerge.evaluate`` -> ``evaluate``; others None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "submerge" and len(parts) > 1 else None


def _package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        src = _node(".".join(path.relative_to(SRC.parent).with_suffix("").parts))
        if src is None:
            continue
        targets = {_node(m) for m in imported_modules(path)} - {None, src}
        graph.setdefault(src, set()).update(targets)
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), list(graph.get(start, ()))
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    return seen


def test_package_import_graph_has_no_cycle_through_data_suites_models_evaluate():
    graph = _package_graph()
    assert {"data", "suites"} <= graph["evaluate"]          # the dispatch sits above both
    assert "data" in graph["suites"]                        # digits reads heads from data.heads
    assert not graph["models"] & {"data", "suites", "evaluate"}
    assert not graph["data"] & {"suites", "evaluate"}
    for node in ("data", "suites", "models", "evaluate"):
        assert node not in _reachable(graph, node), f"import cycle through submerge.{node}: {graph}"


def test_package_import_graph_has_no_cycle_at_all():
    """Every top-level module or package of submerge (recipe, merges, stages, report, io, ...)
    imports only downwards: no cycle anywhere in the package graph."""
    graph = _package_graph()
    for node in graph:
        assert node not in _reachable(graph, node), f"import cycle through submerge.{node}: " + \
            "; ".join(f"{k} -> {sorted(v)}" for k, v in sorted(graph.items()))

