"""Stage ``workflow/rules/evaldata.smk``: each image task's evaluation split, decoded and put
through the geometric part of the model's preprocessing once (``rule eval_data``), and the
hook that lets the evaluating stages read those files instead of the datasets.

``results/{suite}/evaldata/{expert}/{split}.safetensors`` holds ``images`` (uint8 N×S×S×3,
after resize + center crop) and ``labels`` (int64 N) of exactly the examples an evaluation
with ``eval.max_{split}_examples`` sees, in its order; the sidecar ``{split}.json`` holds
``n``, ``n_split``, ``max_examples``, the dataset block, the adapter, the input size and the
file's sha256 (:func:`submerge.data.vision.prepare_split`, :func:`~submerge.data.vision.
save_prepared`). Accuracies from these files equal those from the datasets bit for bit.

Only experts with an image ``dataset`` block get these files (:func:`needs_eval_data`): digits
tasks build their data in memory. Text tasks whose dataset block names a template file
(``dataset.prompt``, :func:`needs_rendered_text`) get their rendered splits instead (``rule
eval_text``, :func:`render_eval_text`): ``results/{suite}/evaldata/{expert}/{split}.jsonl`` (one
row per example: input, answer choices and label, or reference answers; the whole split, the
``max_examples`` subset is drawn at evaluation) and its sidecar ``{split}.json``
(:func:`submerge.data.language.save_rendered`); they are tokenised at scoring time by the adapter.
:func:`eval_data_file` names the file of either kind. This module imports nothing heavy at
module level, so the workflow files can import it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

SPLITS = ("val", "test")


def needs_eval_data(entry: Mapping) -> bool:
    """Whether an expert entry of the config gets prepared evaluation data: it has a
    ``dataset`` block of image kind."""
    dataset = entry.get("dataset") if isinstance(entry, Mapping) else None
    return isinstance(dataset, Mapping) and dataset.get("kind", "image") == "image"


def needs_rendered_text(entry: Mapping) -> bool:
    """Whether an expert entry of the config gets rendered text splits (rule eval_text): a text
    ``dataset`` block with a ``prompt`` (template file)."""
    dataset = entry.get("dataset") if isinstance(entry, Mapping) else None
    return isinstance(dataset, Mapping) and dataset.get("kind") == "text" and dataset.get("prompt") is not None


def eval_data_file(root: str, expert: str, entry: Mapping, split: str) -> str | None:
    """The prepared evaluation file of ``expert``'s ``split`` (rule eval_data for an image task,
    rule eval_text for a text task with a template file), or None when it has none."""
    if needs_eval_data(entry):
        return f"{root}/evaldata/{expert}/{split}.safetensors"
    if needs_rendered_text(entry):
        return f"{root}/evaldata/{expert}/{split}.jsonl"
    return None


def render_eval_text(suite_view: Mapping, expert: str, split: str, out: str | Path) -> None:
    """Render ``split`` of a text expert's dataset with its task's templates and write ``out``
    (JSON lines) and its sidecar atomically."""
    from submerge.data.language import render_split, save_rendered
    from submerge.errors import ConfigError

    if split not in SPLITS:
        raise ConfigError(f"eval_text: unknown split {split!r}; expected one of {SPLITS}")
    experts = suite_view.get("experts") or {}
    if expert in experts and not needs_rendered_text(experts[expert]):
        raise ConfigError(f"eval_text: expert {expert!r} has no text dataset block with a prompt "
                          "(dataset.prompt); only those get rendered splits")
    from submerge.data.prompts import load_prompts
    from submerge.stages.common import record_provenance

    rows, meta = render_split(suite_view, expert, split)
    save_rendered(out, rows, meta)
    # the provenance sidecar ({split}.jsonl.json) reaches the template file by its hash
    record_provenance([out], [load_prompts(experts[expert]["dataset"]["prompt"]).file])
    log.info("%s: %d %s examples of %s rendered", out, meta["n"], split, expert)


def eval_data_path(root: str | Path, expert: str, split: str) -> Path:
    """``{root}/evaldata/{expert}/{split}.safetensors`` (``root``: the suite's results folder)."""
    return Path(root) / "evaldata" / expert / f"{split}.safetensors"


def prepare_eval_data(suite_view: Mapping, expert: str, split: str, max_examples: int | None,
                      out: str | Path) -> None:
    """Decode ``split`` of ``expert``'s dataset (the seeded ``max_examples`` subset), apply the
    geometric preprocessing of the suite's adapter, write ``out`` and its sidecar atomically."""
    from submerge.data.vision import prepare_split, save_prepared
    from submerge.errors import ConfigError

    if split not in SPLITS:
        raise ConfigError(f"eval_data: unknown split {split!r}; expected one of {SPLITS}")
    experts = suite_view.get("experts") or {}
    if expert in experts and not needs_eval_data(experts[expert]):
        raise ConfigError(f"eval_data: expert {expert!r} has no image dataset block; only image tasks "
                          "get prepared evaluation data")
    images, labels, meta = prepare_split(suite_view, expert, split, max_examples)
    save_prepared(out, images, labels, meta)
    log.info("%s: %d %s examples of %s (%.1f MB)", out, meta["n"], split, expert, images.numel() / 1e6)


def attach_eval_data(tasks: Sequence, paths: Iterable[str | Path]) -> None:
    """Make each task in ``tasks`` read the prepared files in ``paths`` (each file's sidecar
    names its expert and split) instead of its dataset.

    Files of experts that are not among ``tasks`` are ignored, so that a job can pass all its
    files with every subset of its tasks it evaluates; ``paths`` may be empty. A file of a task
    that cannot read prepared files is a wiring error (ValueError); a file made for another
    dataset or preprocessing raises CheckpointError (:meth:`submerge.data.vision.VisionTask.
    use_prepared`).
    """
    from submerge.data.language import read_rendered_meta
    from submerge.data.vision import read_prepared_meta

    by_name = {task.name: task for task in tasks}
    for path in paths:
        meta = read_rendered_meta(path) if Path(path).suffix == ".jsonl" else read_prepared_meta(path)
        task = by_name.get(meta["expert"])
        if task is None:
            continue
        if not hasattr(task, "use_prepared"):
            raise ValueError(f"prepared evaluation data {path}: task {task.name!r} ({type(task).__name__}) "
                             "does not read prepared files")
        task.use_prepared(meta["split"], path)
        log.debug("%s/%s: evaluated from %s", task.name, meta["split"], path)
