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

Rows must already hold the rendered prompt (e.g. a promptsource template applied); this
module does no templating. Config of one expert, the ``dataset`` block::

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
      max_new_tokens: 64        # exact match: generation length (r-three/mats: 64)

Suite level: ``tokenizer: {path: <local dir>}`` or ``{hub: <id>, revision: ...}``
(``AutoTokenizer.from_pretrained``, :func:`submerge.models.load_tokenizer`). How the model
scores a choice or generates an answer depends on the architecture, so ``accuracy`` asks
the adapter: :meth:`~submerge.models.Adapter.score_choices` and
:meth:`~submerge.models.Adapter.generate` (implemented by ``hf_t5``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from submerge.data.vision import SOURCE_DEFAULTS, open_split, parse_dataset_cfg, require_columns, subset_indices
from submerge.errors import ConfigError
from submerge.models import load_tokenizer

log = logging.getLogger(__name__)

TEXT_DEFAULTS = {
    **SOURCE_DEFAULTS, "kind": "text", "input_key": "input", "label_key": "label",
    "choices_key": None, "choices": None, "target_key": None, "scoring": "sum", "max_new_tokens": 64,
}
SCORINGS = ("sum", "mean")


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
        self.mode = "rank" if ranked else "exact"
        self._tokenizer_spec = suite_cfg.get("tokenizer")
        self._tokenizer = None
        self._splits: dict[str, object] = {}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self._tokenizer_spec)
        return self._tokenizer

    def split(self, split: str):
        """The Hugging Face dataset of ``split`` ("val" or "test"), columns checked, cached."""
        if split not in self._splits:
            ds = open_split(self.cfg, split, expert=self.name)
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

    @torch.no_grad()
    def accuracy(self, adapter, module, split: str, *, device="cpu", batch_size: int = 256,
                 max_examples: int | None = None) -> float:
        """Fraction in [0, 1] of examples of ``split`` answered correctly.

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
        count = self._rank_correct if self.mode == "rank" else self._exact_correct
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
