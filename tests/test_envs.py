"""The conda environments of the rules pin the same versions as pyproject.toml, and every rule
names one of them (rules run in those envs with `--software-deployment-method conda`)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pins(requirements) -> dict[str, str]:
    pins = {}
    for req in requirements:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s;]+)", req.strip())
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def _project_pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return _pins(project["dependencies"])


ENVS = sorted((ROOT / "envs").glob("*.yaml"))


@pytest.mark.parametrize("env", ENVS, ids=lambda p: p.stem)
def test_env_pins_agree_with_pyproject(env):
    spec = yaml.safe_load(env.read_text())
    pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict) and "pip" in d)
    pins = _pins(pip)
    project = _project_pins()
    assert pins, f"{env.name}: no pinned pip packages"
    for name, version in pins.items():
        assert name in project, f"{env.name}: {name} is not a dependency in pyproject.toml"
        assert version == project[name], f"{env.name}: {name}=={version}, pyproject.toml has {project[name]}"
    assert "-e .." in pip, f"{env.name}: the project itself is not installed into the env"
    python = next(d for d in spec["dependencies"] if isinstance(d, str) and d.startswith("python="))
    assert python == "python=3.11"


def test_torch_pin_is_not_the_broken_cpu_wheel():
    assert _project_pins()["torch"] == "2.14.1"
    assert _project_pins()["torchvision"] == "0.29.1"


def test_every_rule_with_code_names_a_pinned_env():
    text = "\n".join(p.read_text() for p in (ROOT / "workflow" / "rules").glob("*.smk"))
    rules = re.findall(r"^rule (\w+):\n((?:[ \t]+.*\n|\n)*)", text, re.MULTILINE)
    assert len(rules) >= 10
    envs = {p.name for p in ENVS}
    for name, body in rules:
        if "script:" not in body:
            continue
        m = re.search(r'conda:\s*\n\s*"\.\./\.\./envs/([\w.-]+)"', body)
        assert m, f"rule {name} has no conda env"
        assert m.group(1) in envs, f"rule {name}: unknown env {m.group(1)}"
