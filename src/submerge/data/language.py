"""Evaluation of T5 experts on text-to-text tasks (the paper's Table 2 language suites).

The paper follows Tam et al. 2024a ("Merging by Matching Models in Task Parameter
Subspaces", code r-three/mats): 8 QA tasks of Zhou et al. 2023 and 7 NLP tasks of Yadav et
al. 2023, scored as in that code (``src/model/EncoderDecoderWrapper.py``):

* **rank classification** (tasks with answer choices): every choice is scored by the
  log-likelihood of its tokens (incl. the closing ``</s>``) under the decoder given the
  input; the prediction is the highest-scoring choice. Default ``scoring: sum`` — the sum
  of token log-probabilities, which is what r-three/mats does (``length_normalization`` is
  off in its evaluation configs); ``scoring: mean`` divides by the number of tokens
  (T-Few style length normalisation).
* **exact match** (tasks with a target string): greedy generation
  (``do_sample=False, num_beams=1``, ``max_new_tokens``), decoded without special tokens
  and stripped, must equal the target after the same tokenise/decode round trip (as
  FusionBench's Flan-T5 GLUE evaluation compares decoded strings).

Rows either hold the rendered prompt already (``input`` / ``choices`` / ``label`` columns, no
``prompt``), or are raw examples of the task's dataset rendered here with the task's templates
(``prompt``, :mod:`submerge.data.prompts`: the promptsource templates r-three/mats uses, example
``i`` with template ``i % T``). Rendered splits are cached by ``rule eval_text``
(``results/{suite}/evaldata/{expert}/{split}.jsonl`` + ``.json`` sidecar, :func:`render_split`,
:func:`save_rendered`); the evaluating jobs read them (:meth:`LanguageTask.use_prepared`) and
tokenise at scoring time (the adapter). Config of one expert, the ``dataset`` block::

    dataset:
      kind: text
      hub / config_name / revision / path       # as for vision datasets (submerge.data.vision)
      train_split / test_split / val_split      # "val" = val_fraction of train (at most val_max,
      val_fraction / val_max / val_seed         #   seed val_seed) unless val_split names a split
      input_key: input          # column with the input text
      label_key: label          # column with the index of the correct choice (rank classification)
      choices_key: null         # column with the list of answer choices of each row, or
      choices: null             #   one fixed list of verbalised labels for all rows
      target_key: null          # column with the target string -> exact match (instead of choices)
      scoring: sum              # rank classification: sum | mean token log-likelihood
      max_new_tokens: 64        # exact match / squad: generation length (r-three/mats: 64)
      prompt: null              # a task of submerge/data/prompts (e.g. quartz) or a template file:
                                #   rows are raw examples, rendered with its templates; the task's
                                #   metric (accuracy: rank classification, squad: generation scored
                                #   by SQuAD exact match and F1, averaged) replaces the *_key fields
      data_dir: null            # passed to datasets.load_dataset (manual downloads: story_cloze)
      val_last: null            # "val" = the last val_last rows of train_split (r-three/mats:
                                #   P3_VALIDATION_SET_SIZE = 1000; 500 qasc, 200 quartz, 100 wsc)
      test_last: null           # "test" = the last test_last rows of test_split (r-three/mats' qasc
                                #   tests on its validation rows: test_split: train, test_last: 500)

Suite level: ``tokenizer: {path: <local dir>}`` or ``{hub: <id>, revision: ...}``
(``AutoTokenizer.from_pretrained``, :func:`submerge.models.load_tokenizer`). How the model
scores a choice or generates an answer depends on the architecture, so ``accuracy`` asks
the adapter: :meth:`~submerge.models.Adapter.score_choices` and
:meth:`~submerge.models.Adapter.generate` (implemented by ``hf_t5``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from submerge.data.vision import (SOURCE_DEFAULTS, load_named_split, open_split, parse_dataset_cfg,
                                  require_columns, subset_indices)
from submerge.errors import CheckpointError, ConfigError
from submerge.models import load_tokenizer

log = logging.getLogger(__name__)

TEXT_DEFAULTS = {
    **SOURCE_DEFAULTS, "kind": "text", "input_key": "input", "label_key": "label",
    "choices_key": None, "choices": None, "target_key": None, "scoring": "sum", "max_new_tokens": 64,
    "prompt": None, "data_dir": None, "val_last": None, "test_last": None,
}
SCORINGS = ("sum", "mean")
RENDERED_RULE = "eval_text"
RENDERED_FORMAT = 1
_PROMPT_FIXED = ("choices_key", "choices", "target_key")  # set by the template file when ``prompt`` is given


# ----------------------------------------------------------------------------- splits


def load_text_split(dcfg: Mapping, field: str, *, expert: str):
    """The split named by ``dcfg[field]``: :func:`submerge.data.vision.load_named_split`, with
    ``data_dir`` passed to ``datasets.load_dataset`` when given."""
    if dcfg.get("data_dir") is None or dcfg.get("path"):
        return load_named_split(dcfg, field, expert=expert)
    import datasets

    try:
        return datasets.load_dataset(dcfg["hub"], dcfg.get("config_name"), split=dcfg[field],
                                     revision=dcfg.get("revision"), data_dir=dcfg["data_dir"])
    except ValueError as e:
        raise ConfigError(f"expert {expert!r}: dataset.{field} = {dcfg[field]!r} could not be loaded from "
                          f"hub dataset {dcfg['hub']!r} (data_dir {dcfg['data_dir']!r}): {e}") from e


def _last(ds, count, field: str, *, expert: str):
    count = int(count)
    if count < 1:
        raise ConfigError(f"expert {expert!r}: dataset.{field} must be a positive integer, got {count}")
    n = len(ds)
    return ds.select(range(max(n - count, 0), n))  # r-three/mats: orig_data[-count:]


def open_text_split(dcfg: Mapping, split: str, *, expert: str):
    """The raw rows of ``split`` ("val" or "test") of a parsed text dataset block.

    With ``val_last`` / ``test_last`` as r-three/mats holds data out (``dataset_readers.py``:
    "validation" = the last ``P3_VALIDATION_SET_SIZE`` rows of the train split, "test" = the
    dataset's validation split); otherwise as :func:`submerge.data.vision.open_split`.
    """
    if split == "test" and dcfg.get("test_last") is not None:
        return _last(load_text_split(dcfg, "test_split", expert=expert), dcfg["test_last"], "test_last",
                     expert=expert)
    if split == "val" and dcfg.get("val_last") is not None:
        if dcfg.get("val_split"):
            raise ConfigError(f"expert {expert!r}: give dataset.val_split or dataset.val_last, not both")
        return _last(load_text_split(dcfg, "train_split", expert=expert), dcfg["val_last"], "val_last",
                     expert=expert)
    if dcfg.get("data_dir") is not None and not dcfg.get("path"):
        if split == "test":
            return load_text_split(dcfg, "test_split", expert=expert)
        if split == "val" and dcfg.get("val_split"):
            return load_text_split(dcfg, "val_split", expert=expert)
    return open_split(dcfg, split, expert=expert)


# ----------------------------------------------------------------------------- rendered splits


def _as_json(obj):
    return json.loads(json.dumps(obj))


def render_split(suite_cfg: Mapping, expert: str, split: str) -> tuple[list[dict], dict]:
    """``(rows, meta)``: every example of ``split`` of ``expert``'s dataset rendered with its
    task's templates (:func:`submerge.data.prompts.render_rows`), and the sidecar fields."""
    from submerge.data.prompts import render_rows

    task = LanguageTask(suite_cfg, expert, root=".")
    if task.prompts is None:
        raise ConfigError(f"expert {expert!r}: dataset.prompt is not set; only raw datasets with a "
                          "template file are rendered (rule eval_text)")
    raw = open_text_split(task.cfg, split, expert=expert)
    rows = render_rows(task.prompts, raw, expert=expert)
    if not rows:
        raise ConfigError(f"expert {expert!r}: the {split!r} split is empty")
    meta = {"format": RENDERED_FORMAT, "expert": expert, "split": split, "n": len(rows),
            **task.prepared_identity()}
    log.info("%s/%s: %d examples rendered with %d templates of %s", expert, split, len(rows),
             len(task.prompts.templates), task.prompts.file)
    return rows, meta


def save_rendered(path: str | Path, rows: Sequence[Mapping], meta: Mapping) -> None:
    """Write a rendered split atomically: JSON lines ``path`` and the sidecar
    ``path.with_suffix(".json")`` (``meta`` + the file's sha256)."""
    from submerge.io.atomic import write_bytes_atomic
    from submerge.io.jsonio import write_json

    if meta.get("n") != len(rows):
        raise ValueError(f"rendered split: meta n = {meta.get('n')}, {len(rows)} rows")
    data = "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows).encode("utf-8")
    write_bytes_atomic(path, data)
    write_json(Path(path).with_suffix(".json"), {**meta, "sha256": hashlib.sha256(data).hexdigest()})


def _redo(path: Path) -> str:
    return f"delete {path} and rerun (rule {RENDERED_RULE})"


def read_rendered_meta(path: str | Path) -> dict:
    """The sidecar of a rendered split; CheckpointError naming the file when it cannot be read."""
    path = Path(path)
    sidecar = path.with_suffix(".json")
    if not path.is_file():
        raise CheckpointError(f"rendered split {path} does not exist (rule {RENDERED_RULE})")
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"rendered split {path}: cannot read its sidecar {sidecar} ({exc}): "
                              f"{_redo(path)}") from exc
    missing = [k for k in ("format", "expert", "split", "n", "dataset", "prompt", "sha256")
               if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise CheckpointError(f"rendered split {path}: sidecar {sidecar} lacks {missing}: {_redo(path)}")
    return meta


def read_rendered(path: str | Path, meta: Mapping) -> list[dict]:
    """The rows of a rendered split, checked against its sidecar (sha256, count, fields)."""
    path = Path(path)
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise CheckpointError(f"rendered split {path}: sha256 differs from its sidecar's (the file is "
                              f"truncated or corrupt): {_redo(path)}")
    try:
        rows = [json.loads(line) for line in data.decode("utf-8").splitlines()]
    except ValueError as exc:
        raise CheckpointError(f"rendered split {path}: not JSON lines ({exc}): {_redo(path)}") from exc
    if len(rows) != meta["n"] or any(not isinstance(r, dict) or "input" not in r for r in rows):
        raise CheckpointError(f"rendered split {path}: {len(rows)} rows, sidecar says {meta['n']}: {_redo(path)}")
    return rows


# ----------------------------------------------------------------------------- SQuAD scoring


def squad_normalize(text: str) -> str:
    """The official SQuAD v1.1 ``normalize_answer`` (HF ``evaluate``'s squad metric): lower case,
    no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_f1(prediction: str, truth: str) -> float:
    pred, gold = squad_normalize(prediction).split(), squad_normalize(truth).split()
    common = Counter(pred) & Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_score(prediction: str, answers: Sequence[str]) -> float:
    """(exact match + F1) / 2 of one prediction, each the maximum over the reference answers:
    r-three/mats reports the "average" of SQuAD's exact_match and f1 for ROPES (``Scorer``)."""
    if not answers:
        raise ValueError("an example without reference answers")
    em = max(float(squad_normalize(prediction) == squad_normalize(a)) for a in answers)
    f1 = max(squad_f1(prediction, a) for a in answers)
    return (em + f1) / 2


def normalize_target(tokenizer, target: str) -> str:
    """``target`` after the tokenise/decode round trip that generated text goes through."""
    ids = tokenizer(target)["input_ids"]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


class LanguageTask:
    """Accuracy of a T5 model on a text-to-text dataset: rank classification or exact match."""

    def __init__(self, suite_cfg: Mapping, expert: str, *, root: str | Path):
        experts = suite_cfg.get("experts") or {}
        if expert not in experts:
            raise ConfigError(f"expert {expert!r} is not in the suite's experts")
        self.name = expert
        self.root = Path(root)  # unused: text tasks have no heads; kept for the EvalTask constructor
        self.cfg = cfg = parse_dataset_cfg(experts[expert], expert, TEXT_DEFAULTS)
        if cfg["kind"] != "text":
            raise ConfigError(f"expert {expert!r}: dataset.kind must be 'text', got {cfg['kind']!r}")
        self.prompts = None
        if cfg["prompt"] is not None:
            from submerge.data.prompts import load_prompts

            self.prompts = load_prompts(cfg["prompt"], f"experts.{expert}.dataset.prompt")
            clash = [f for f in _PROMPT_FIXED if cfg[f] is not None]
            clash += [f for f in ("input_key", "label_key") if cfg[f] != TEXT_DEFAULTS[f]]
            if clash:
                raise ConfigError(f"expert {expert!r}: dataset.prompt renders the rows; drop dataset.{clash} "
                                  f"(the template file {self.prompts.file} sets the answers and the metric)")
            if self.prompts.metric == "accuracy":
                cfg["choices_key"] = "choices"
            else:
                cfg["target_key"] = "target"
        ranked = cfg["choices_key"] is not None or cfg["choices"] is not None
        if cfg["choices_key"] is not None and cfg["choices"] is not None:
            raise ConfigError(f"expert {expert!r}: give dataset.choices_key or dataset.choices, not both")
        if ranked == (cfg["target_key"] is not None):
            raise ConfigError(f"expert {expert!r}: dataset needs answer choices (choices_key or choices) "
                              f"for rank classification, or target_key for exact match — exactly one")
        if cfg["choices"] is not None and (not cfg["choices"] or not all(isinstance(c, str) for c in cfg["choices"])):
            raise ConfigError(f"expert {expert!r}: dataset.choices must be a non-empty list of strings")
        if cfg["scoring"] not in SCORINGS:
            raise ConfigError(f"expert {expert!r}: dataset.scoring must be one of {SCORINGS}, got {cfg['scoring']!r}")
        if not isinstance(cfg["max_new_tokens"], int) or cfg["max_new_tokens"] < 1:
            raise ConfigError(f"expert {expert!r}: dataset.max_new_tokens must be a positive integer")
        self.mode = "rank" if ranked else ("squad" if self.prompts is not None else "exact")
        self._tokenizer_spec = suite_cfg.get("tokenizer")
        self._tokenizer = None
        self._splits: dict[str, object] = {}
        self._prepared: dict[str, Path] = {}

    def prepared_identity(self) -> dict:
        """What a rendered split of this task must have been made with (besides expert and
        split): the dataset block and the template file (task, sha256, source)."""
        return {"dataset": _as_json({k: self.cfg[k] for k in self.cfg if k not in _PROMPT_FIXED}),
                "prompt": None if self.prompts is None else self.prompts.identity()}

    def use_prepared(self, split: str, path: str | Path) -> None:
        """Evaluate ``split`` from the rendered file ``path`` (rule eval_text) instead of rendering
        the dataset; CheckpointError when it was made for another expert, split, dataset or
        template file."""
        if split not in ("val", "test"):
            raise ValueError(f"expert {self.name!r}: unknown split {split!r}")
        if self.prompts is None:
            raise ValueError(f"expert {self.name!r}: rendered split {path} given, but dataset.prompt is not set")
        path = Path(path)
        meta = read_rendered_meta(path)
        made = {"expert": meta["expert"], "split": meta["split"], "dataset": meta["dataset"], "prompt": meta["prompt"]}
        want = {"expert": self.name, "split": split, **self.prepared_identity()}
        if made != want or meta["format"] != RENDERED_FORMAT:
            diff = sorted(k for k in want if made[k] != want[k]) or ["format"]
            raise CheckpointError(f"rendered split {path} was made for another {', '.join(diff)}: {_redo(path)}")
        self._prepared[split] = path
        self._splits.pop(split, None)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self._tokenizer_spec)
        return self._tokenizer

    def split(self, split: str):
        """The Hugging Face dataset of ``split`` ("val" or "test"), columns checked, cached."""
        if split not in self._splits:
            if self.prompts is not None:
                import datasets

                if split in self._prepared:
                    path = self._prepared[split]
                    rows = read_rendered(path, read_rendered_meta(path))
                    log.info("%s/%s: %d rendered examples from %s", self.name, split, len(rows), path)
                else:
                    from submerge.data.prompts import render_rows

                    rows = render_rows(self.prompts, open_text_split(self.cfg, split, expert=self.name),
                                       expert=self.name)
                self._splits[split] = datasets.Dataset.from_list(rows)
                return self._splits[split]
            ds = open_text_split(self.cfg, split, expert=self.name)
            fields = ["input_key"] + (["target_key"] if self.mode == "exact" else ["label_key"])
            if self.cfg["choices_key"] is not None:
                fields.append("choices_key")
            require_columns(ds, self.cfg, fields, expert=self.name, split=split)
            self._splits[split] = ds
        return self._splits[split]

    def _rank_correct(self, adapter, module, rows: Mapping, device) -> int:
        cfg = self.cfg
        n = len(rows[cfg["input_key"]])
        choices = rows[cfg["choices_key"]] if cfg["choices_key"] is not None else [cfg["choices"]] * n
        scores = adapter.score_choices(module, self.tokenizer, rows[cfg["input_key"]], choices,
                                       device=device, scoring=cfg["scoring"])
        correct = 0
        for score, label, options in zip(scores, rows[cfg["label_key"]], choices):
            label = int(label)
            if not 0 <= label < len(options):
                raise ConfigError(f"expert {self.name!r}: dataset.label_key {cfg['label_key']!r} value {label} "
                                  f"is not an index into its {len(options)} answer choices")
            correct += int(int(score.argmax()) == label)
        return correct

    def _exact_correct(self, adapter, module, rows: Mapping, device) -> int:
        cfg = self.cfg
        answers = adapter.generate(module, self.tokenizer, rows[cfg["input_key"]], device=device,
                                   max_new_tokens=cfg["max_new_tokens"])
        targets = [normalize_target(self.tokenizer, str(t)) for t in rows[cfg["target_key"]]]
        return sum(a == t for a, t in zip(answers, targets))

    def _squad_correct(self, adapter, module, rows: Mapping, device) -> float:
        predictions = adapter.generate(module, self.tokenizer, rows[self.cfg["input_key"]], device=device,
                                       max_new_tokens=self.cfg["max_new_tokens"])
        return sum(squad_score(p, refs) for p, refs in zip(predictions, rows["answers"]))

    @torch.no_grad()
    def accuracy(self, adapter, module, split: str, *, device="cpu", batch_size: int = 256,
                 max_examples: int | None = None) -> float:
        """Fraction in [0, 1] of examples of ``split`` answered correctly (metric squad: the mean
        of (exact match + F1) / 2).

        ``adapter`` (e.g. ``get_adapter("hf_t5")``) scores the answer choices or generates
        the answers of ``module``. ``max_examples`` evaluates a seeded random subset
        (``vision.subset_indices``).
        """
        ds = self.split(split)
        if max_examples is not None:
            ds = ds.select(subset_indices(len(ds), max_examples))
        n = len(ds)
        if n == 0:
            raise ConfigError(f"expert {self.name!r}: the {split!r} split is empty")
        count = {"rank": self._rank_correct, "exact": self._exact_correct, "squad": self._squad_correct}[self.mode]
        was_training = module.training
        module.eval()
        correct = 0
        try:
            for start in range(0, n, batch_size):
                correct += count(adapter, module, ds[start:min(start + batch_size, n)], device)
        finally:
            module.train(was_training)
        acc = correct / n
        log.info("%s/%s (%s): accuracy %.4f on %d examples", self.name, split, self.mode, acc, n)
        return acc
