"""Every Snakemake script starts by handing its job to the warm worker (submerge.worker), before
it imports anything heavy: a script without it would pay the full start-up in every job."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "scripts").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_a_script_delegates_before_anything_else(script):
    body = ast.parse(script.read_text()).body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    first, second = body[0], body[1]
    assert isinstance(first, ast.ImportFrom) and first.module == "submerge.worker", script.name
    assert isinstance(second, ast.Expr) and isinstance(second.value, ast.Call) \
        and getattr(second.value.func, "id", None) == "delegate", script.name
