"""Prompt templates of the language tasks, and how an example is rendered with them.

Each ``<task>.yaml`` in this folder holds the promptsource templates (promptsource v0.2.3, the
version r-three/mats pins) that r-three/mats (Tam et al. 2024a, the language setup the paper
follows) evaluates the task with, copied verbatim by :mod:`submerge.data.prompts.generate`, with
the source path, commit and blob, and what r-three/mats' reader adds (``src/data/dataset_readers.py``):

* ``label``: how the index of the correct answer choice is read from a raw example
  (``{field: label}``, ``{field: answer, offset: -1}``, ``{field: answerKey, map: {A: 0, ...}}``);
* ``answers``: for a generation task (``metric: squad``, ROPES) the dotted field with the reference
  answers;
* ``templates``: in order; example ``i`` of a split gets template ``i % len(templates)``
  (r-three/mats ``template_idx = -1``, ``evaluation_template_idx: -1`` in its evaluation config).

Rendering follows ``promptsource.templates.Template.apply`` (v0.2.3): the same jinja environment
(``zip`` global, ``choice`` / ``most_frequent`` filters), every ``}}`` turned into ``| string |
truncate(2048) }}``, ``|||`` inside field values protected, the answer choices rendered first
and passed as ``answer_choices``, the output split on ``|||`` and stripped. promptsource's
``choice`` filter draws with the global ``random``; here it draws with ``random.Random(i)`` for
example ``i``, so that a rendering is reproducible (it only picks a target among the ROPES
reference answers, which scoring does not read).

A config names a template set by task name (``dataset.prompt: quartz``) or by the path of a file
of the same form. This module imports no torch (the workflow checks the names at start-up).
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

from submerge.errors import ConfigError

PROMPTS_DIR = Path(__file__).parent
TEXT_VAR_LENGTH = 2048  # promptsource.templates.TEXT_VAR_LENGTH
PIPE_PROTECTOR = "3ed2dface8203c4c9dfb1a5dc58e41e0"  # promptsource.templates.Template.pipe_protector
METRICS = ("accuracy", "squad")


def shipped() -> list[str]:
    """The task names with a shipped template file."""
    return sorted(p.stem for p in PROMPTS_DIR.glob("*.yaml"))


@dataclass(frozen=True)
class PromptSet:
    """The templates of one task and how its labels / reference answers are read."""

    task: str
    file: str
    sha256: str
    metric: str
    label: Mapping | None
    answers: str | None
    templates: tuple[Mapping, ...]
    source: Mapping

    def identity(self) -> dict:
        """What a rendered split was made with (stored in its sidecar, checked on read)."""
        return {"task": self.task, "sha256": self.sha256, "source": dict(self.source)}


def _resolve(spec: str) -> Path:
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") or path.parent != Path("."):
        return path
    return PROMPTS_DIR / f"{spec}.yaml"


@cache
def load_prompts(spec: str, where: str = "dataset.prompt") -> PromptSet:
    """The :class:`PromptSet` of a task name (a shipped file) or a file path; ConfigError naming
    ``where`` when it is missing or malformed."""
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"{where}: expected a task name ({', '.join(shipped())}) or a path, got {spec!r}")
    path = _resolve(spec)
    if not path.is_file():
        raise ConfigError(f"{where} = {spec!r}: no template file {path} (shipped: {', '.join(shipped())})")
    raw = path.read_bytes()
    try:
        doc = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} = {spec!r}: {path} is not valid YAML ({exc})") from exc
    bad = f"{where} = {spec!r}: {path}"
    if not isinstance(doc, Mapping) or not isinstance(doc.get("templates"), list) or not doc["templates"]:
        raise ConfigError(f"{bad} needs a non-empty 'templates' list")
    metric = doc.get("metric", "accuracy")
    if metric not in METRICS:
        raise ConfigError(f"{bad}: metric must be one of {METRICS}, got {metric!r}")
    for i, t in enumerate(doc["templates"]):
        if not isinstance(t, Mapping) or not isinstance(t.get("jinja"), str) or "|||" not in t["jinja"]:
            raise ConfigError(f"{bad}: templates[{i}] needs a 'jinja' string with the '|||' separator")
        if metric == "accuracy" and not isinstance(t.get("answer_choices"), str):
            raise ConfigError(f"{bad}: templates[{i}] ({t.get('name')!r}) has no answer_choices, "
                              f"which rank classification (metric: accuracy) needs")
    label, answers = doc.get("label"), doc.get("answers")
    if metric == "accuracy" and not (isinstance(label, Mapping) and isinstance(label.get("field"), str)):
        raise ConfigError(f"{bad}: metric accuracy needs 'label: {{field: ...}}' (optionally offset or map)")
    if metric == "squad" and not isinstance(answers, str):
        raise ConfigError(f"{bad}: metric squad needs 'answers: <dotted field>' (e.g. answers.text)")
    return PromptSet(task=str(doc.get("task", path.stem)), file=str(path), sha256=hashlib.sha256(raw).hexdigest(),
                     metric=metric, label=dict(label) if label else None, answers=answers,
                     templates=tuple(dict(t) for t in doc["templates"]), source=dict(doc.get("source") or {}))


# ------------------------------------------------------------------------------ rendering


class _Env:
    """promptsource's jinja environment, with a seeded ``choice``."""

    def __init__(self):
        from jinja2 import BaseLoader, Environment

        self.rng = random.Random(0)
        env = Environment(loader=BaseLoader)
        env.globals.update(zip=zip)
        env.filters["highlight"] = lambda s: "<span style='color: #F08080'>" + s + "</span>"
        env.filters["choice"] = lambda choices: self.rng.choice(choices)
        env.filters["most_frequent"] = _most_frequent
        self.env = env
        self._compiled: dict[str, object] = {}

    def template(self, text: str):
        if text not in self._compiled:
            self._compiled[text] = self.env.from_string(text)
        return self._compiled[text]


def _most_frequent(items):
    if not items:
        return None
    counts = Counter(items).most_common()
    return [c for c, n in counts if n == counts[0][1]]


def _escape_pipe(example: Mapping) -> dict:
    return {k: v.replace("|||", PIPE_PROTECTOR) if isinstance(v, str) else v for k, v in example.items()}


def _unescape_pipe(text: str) -> str:
    return text.replace(PIPE_PROTECTOR, "|||")


def answer_choices(env: _Env, template: Mapping, example: Mapping) -> list[str] | None:
    """``Template.get_answer_choices_list``: the rendered answer choices (None if the template has none)."""
    expr = template.get("answer_choices")
    if expr is None:
        return None
    rendered = env.template(expr).render(**_escape_pipe(example))
    return [_unescape_pipe(c.strip()) for c in rendered.split("|||")]


def apply_template(env: _Env, template: Mapping, example: Mapping) -> tuple[list[str], list[str] | None]:
    """``Template.apply(example)`` (truncate=True): the rendered parts [input, target, ...] and
    the answer choices."""
    jinja = template["jinja"].replace("}}", f" | string | truncate({TEXT_VAR_LENGTH}) }}}}")
    protected = _escape_pipe(example)
    if "answer_choices" in protected:
        raise ValueError("Example contains the restricted key 'answer_choices'.")
    choices = answer_choices(env, template, example)
    protected["answer_choices"] = choices
    rendered = env.template(jinja).render(**protected)
    return [_unescape_pipe(part).strip() for part in rendered.split("|||")], choices


def _field(example: Mapping, dotted: str):
    value = example
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


def read_label(spec: Mapping, example: Mapping) -> int:
    """The correct choice's index, as r-three/mats' reader computes ``lbl``."""
    value = _field(example, spec["field"])
    if "map" in spec:
        return int(spec["map"][value])
    return int(value) + int(spec.get("offset", 0))


def render_rows(prompts: PromptSet, rows: Sequence[Mapping] | object, *, expert: str = "task") -> list[dict]:
    """Every example of ``rows`` (a split, in order) rendered: ``{"index", "template", "input",
    "target"}`` plus ``"choices"`` and ``"label"`` (metric accuracy) or ``"answers"`` (squad).
    Example ``i`` gets template ``i % len(prompts.templates)``."""
    env = _Env()
    out = []
    n_templates = len(prompts.templates)
    for i, example in enumerate(rows):
        template = prompts.templates[i % n_templates]
        env.rng.seed(i)
        try:
            parts, choices = apply_template(env, template, example)
        except Exception as exc:  # jinja UndefinedError, TypeError ... on a row of another dataset
            raise ConfigError(f"expert {expert!r}: template {template.get('name')!r} of {prompts.file} cannot "
                              f"render example {i} (fields {sorted(example)}): {type(exc).__name__}: {exc}") from exc
        row = {"index": i, "template": template.get("name"), "input": parts[0],
               "target": parts[1] if len(parts) > 1 else ""}
        try:
            if prompts.metric == "accuracy":
                label = read_label(prompts.label, example)
                if choices is None or not 0 <= label < len(choices):
                    raise ValueError(f"label {label} is not an index into the answer choices {choices}")
                row.update(choices=choices, label=label)
            else:
                answers = _field(example, prompts.answers)
                row["answers"] = [str(a) for a in (answers if isinstance(answers, (list, tuple)) else [answers])]
        except (KeyError, ValueError, TypeError) as exc:
            raise ConfigError(f"expert {expert!r}: example {i} of its dataset: {prompts.file}: "
                              f"{type(exc).__name__}: {exc}") from exc
        out.append(row)
    return out
