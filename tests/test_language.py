"""Language evaluation: T5 rank classification and exact match on a tiny random T5."""

from __future__ import annotations

import datasets
import pytest
import torch

from submerge.data.language import LanguageTask, normalize_target
from submerge.data.vision import val_split_indices
from submerge.errors import ConfigError
from submerge.models import get_adapter

T5 = get_adapter("hf_t5")

WORDS = "yes no maybe the cat dog is a question answer true false red blue sky it".split()
MAX_NEW = 5


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A tiny WordLevel tokenizer with T5's conventions (pad 0, </s> 1 appended), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    path = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="module")
def t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(WORDS) + 3, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg).double().eval()  # float64: no near-ties between paths


INPUTS = ["is the sky blue question", "the cat is red", "a dog", "is it true", "red blue red blue sky",
          "answer the question", "cat", "the dog is a cat question"]
CHOICES = [["yes", "no"], ["true", "false", "maybe"], ["cat", "dog", "the cat", "a dog"], ["yes", "no"],
           ["red", "blue sky"], ["yes", "no", "maybe the answer"], ["true", "false"], ["cat dog", "dog cat", "it"]]


def reference_scores(model, tokenizer, text, choices):
    """Sum of token log-likelihoods of each choice, one (input, choice) pair at a time, no padding."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    out = []
    with torch.no_grad():
        for c in choices:
            labels = tokenizer(c, return_tensors="pt")["input_ids"]
            loss = model(input_ids=ids, labels=labels).loss  # mean NLL over the choice's tokens
            out.append((-loss * labels.shape[1]).item())
    return torch.tensor(out, dtype=torch.float64), [tokenizer(c)["input_ids"].__len__() for c in choices]


@pytest.fixture(scope="module")
def ref(t5, tokenizer):
    return [reference_scores(t5, tokenizer, x, c) for x, c in zip(INPUTS, CHOICES)]


def reference_greedy(model, tokenizer, text):
    """Greedy decoding written out: argmax token by token from the decoder start until </s>."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    dec = torch.tensor([[model.config.decoder_start_token_id]])
    with torch.no_grad():
        for _ in range(MAX_NEW):
            nxt = model(input_ids=ids, decoder_input_ids=dec).logits[0, -1].argmax()
            dec = torch.cat([dec, nxt.view(1, 1)], dim=1)
            if nxt.item() == model.config.eos_token_id:
                break
    return tokenizer.decode(dec[0], skip_special_tokens=True).strip()


def _save(tmp_path, train_rows: dict, test_rows: dict):
    path = tmp_path / "data"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(train_rows),
                          "test": datasets.Dataset.from_dict(test_rows)}).save_to_disk(str(path))
    return path


def _suite(tokenizer_dir, dataset):
    return {"adapter": "hf_t5", "tokenizer": {"path": str(tokenizer_dir)},
            "experts": {"qa": {"dataset": {"kind": "text", **dataset}}}}


@pytest.mark.parametrize("scoring", ["sum", "mean"])
def test_score_choices_match_one_pair_at_a_time(t5, tokenizer, ref, scoring):
    got = T5.score_choices(t5, tokenizer, INPUTS, CHOICES, scoring=scoring)
    for scores, (expected, lengths) in zip(got, ref):
        if scoring == "mean":
            expected = expected / torch.tensor(lengths, dtype=torch.float64)
        torch.testing.assert_close(scores.double(), expected, atol=1e-5, rtol=1e-5)


def test_rank_classification_accuracy(t5, ref, tokenizer_dir, tmp_path):
    preds = [int(scores.argmax()) for scores, _ in ref]
    labels = [p if i % 2 == 0 else (p + 1) % len(c) for i, (p, c) in enumerate(zip(preds, CHOICES))]
    rows = {"input": INPUTS, "answer_choices": CHOICES, "label": labels}
    path = _save(tmp_path, rows, rows)
    task = LanguageTask(_suite(tokenizer_dir, {"path": str(path), "choices_key": "answer_choices"}), "qa",
                        root=tmp_path)
    for batch_size in (3, 256):
        assert task.accuracy(T5, t5, "test", batch_size=batch_size) == 0.5
    assert task.mode == "rank"


def test_rank_classification_with_fixed_choices(t5, tokenizer, tokenizer_dir, tmp_path):
    choices = ["no", "yes"]
    preds = [int(reference_scores(t5, tokenizer, x, choices)[0].argmax()) for x in INPUTS]
    labels = [p if i < 6 else 1 - p for i, p in enumerate(preds)]  # 6 of 8 right
    rows = {"text": INPUTS, "y": labels}
    path = _save(tmp_path, rows, rows)
    task = LanguageTask(_suite(tokenizer_dir, {"path": str(path), "input_key": "text", "label_key": "y",
                                               "choices": choices}), "qa", root=tmp_path)
    assert task.accuracy(T5, t5, "test") == 6 / 8


def test_exact_match_accuracy(t5, tokenizer, tokenizer_dir, tmp_path):
    generated = [reference_greedy(t5, tokenizer, x) for x in INPUTS]
    wrong = [next(w for w in ("yes", "no") if w != g) for g in generated]
    targets = [g if i % 4 else w for i, (g, w) in enumerate(zip(generated, wrong))]  # 6 of 8 right
    rows = {"input": INPUTS, "target": targets}
    path = _save(tmp_path, rows, rows)
    task = LanguageTask(_suite(tokenizer_dir, {"path": str(path), "target_key": "target",
                                               "max_new_tokens": MAX_NEW}), "qa", root=tmp_path)
    assert task.mode == "exact"
    for batch_size in (3, 256):
        assert task.accuracy(T5, t5, "test", batch_size=batch_size) == 6 / 8


def test_score_choices_and_generate_checks_and_other_adapters(t5, tokenizer):
    assert T5.generate(t5, tokenizer, INPUTS[:2], max_new_tokens=MAX_NEW) == \
        [reference_greedy(t5, tokenizer, x) for x in INPUTS[:2]]
    with pytest.raises(ValueError, match="scoring"):
        T5.score_choices(t5, tokenizer, INPUTS[:1], CHOICES[:1], scoring="max")
    with pytest.raises(ValueError, match="non-empty"):
        T5.score_choices(t5, tokenizer, INPUTS[:1], [[]])
    for name in ("open_clip_vit", "hf_clip_vision"):  # image towers score no text
        with pytest.raises(ConfigError, match=f"adapter '{name}' cannot score"):
            get_adapter(name).score_choices(t5, tokenizer, INPUTS[:1], CHOICES[:1])
        with pytest.raises(ConfigError, match=f"adapter '{name}' cannot generate"):
            get_adapter(name).generate(t5, tokenizer, INPUTS[:1])


def test_normalize_target_round_trip(tokenizer):
    assert normalize_target(tokenizer, "  the  cat ") == "the cat"
    assert normalize_target(tokenizer, "yes") == "yes"


def test_val_split_and_max_examples(t5, tokenizer_dir, tmp_path):
    n = 30
    train = {"input": [INPUTS[i % 8] for i in range(n)], "answer_choices": [["yes", "no"]] * n,
             "label": [0] * n, "idx": list(range(n))}
    path = _save(tmp_path, train, train)
    task = LanguageTask(_suite(tokenizer_dir, {"path": str(path), "choices_key": "answer_choices"}), "qa",
                        root=tmp_path)
    assert task.split("val")["idx"] == val_split_indices(n)[1] and len(task.split("val")) == 3
    acc = task.accuracy(T5, t5, "val")
    assert acc in (0.0, 1 / 3, 2 / 3, 1.0)
    assert task.accuracy(T5, t5, "test", max_examples=4) in (0.0, 0.25, 0.5, 0.75, 1.0)


@pytest.mark.parametrize("dataset, message", [
    ({}, "answer choices .* or target_key"),
    ({"choices": ["a"], "target_key": "t"}, "exactly one"),
    ({"choices": ["a"], "choices_key": "c"}, "not both"),
    ({"choices": ["a"], "scoring": "max"}, "dataset.scoring"),
    ({"choices": ["a"], "kind": "image"}, "dataset.kind must be 'text'"),
    ({"target_key": "t", "max_new_tokens": 0}, "max_new_tokens"),
    ({"choices": ["a"], "answer": "x"}, r"unknown dataset field\(s\) \['answer'\]"),
])
def test_bad_config(tokenizer_dir, tmp_path, dataset, message):
    with pytest.raises(ConfigError, match=message):
        LanguageTask(_suite(tokenizer_dir, {"path": str(tmp_path), **dataset}), "qa", root=tmp_path)


def test_bad_data(t5, tokenizer_dir, tmp_path):
    rows = {"input": INPUTS[:2], "answer_choices": CHOICES[:2], "label": [0, 5]}
    path = _save(tmp_path, rows, rows)

    def task(**dataset):
        return LanguageTask(_suite(tokenizer_dir, {"path": str(path), "choices_key": "answer_choices", **dataset}),
                            "qa", root=tmp_path)

    with pytest.raises(ConfigError, match="value 5 is not an index into its 3 answer choices"):
        task().accuracy(T5, t5, "test")
    with pytest.raises(ConfigError, match=r"dataset\.input_key = 'question' is not a column"):
        task(input_key="question").accuracy(T5, t5, "test")
    with pytest.raises(ConfigError, match=r"dataset\.test_split = 'validation' is not a split"):
        task(test_split="validation").accuracy(T5, t5, "test")
    bad_tok = LanguageTask({**_suite(tokenizer_dir, {"path": str(path), "choices": ["a"]}),
                            "tokenizer": {"path": str(tmp_path / "nope")}}, "qa", root=tmp_path)
    with pytest.raises(ConfigError, match="tokenizer.path .*nope is not a directory"):
        bad_tok.accuracy(T5, t5, "test")
