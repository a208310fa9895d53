"""Language suites from a config alone: raw datasets rendered with the shipped promptsource templates
(as r-three/mats renders them), the r-three/mats hold-out, the cached rendered splits (rule eval_text),
and a tiny T5 suite run through the workflow offline."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path

import datasets
import pandas as pd
import pytest
import torch
import yaml

from submerge.data.language import (LanguageTask, open_text_split, read_rendered_meta, render_split,
                                    save_rendered, squad_score)
from submerge.data.prompts import PROMPTS_DIR, load_prompts, render_rows, shipped
from submerge.errors import CheckpointError, ConfigError
from submerge.models import get_adapter
from workflow_utils import ROOT, snakemake, write_config

T5 = get_adapter("hf_t5")
OFFLINE = {"SUBMERGE_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# r-three/mats src/data/dataset_readers.py DATASET_MIXTURES (commit df71e970)
P3_EIGHT_QA = ["cosmos_qa", "social_iqa", "paws", "quail", "wiki_qa", "quartz", "qasc", "ropes"]
P3_TIES = ["paws", "qasc", "quartz", "story_cloze", "wiki_qa", "winogrande", "wsc"]
WORDS = ("the a cat dog sky is red blue more less bigger smaller sun hot cold water it paragraph question "
         "answer use information from to . ? : if".split())


def quartz_row(i: int, key: str = "A") -> dict:
    colours = ["red", "blue"] if i % 2 else ["more", "less"]
    return {"id": f"q{i}", "question": f"If the sky is {i} the cat is _____.",
            "choices": {"text": colours, "label": ["A", "B"]}, "answerKey": key,
            "para": f"the dog is blue {i}.", "para_id": "p", "para_anno": {"x": "y"}, "question_anno": {"x": "y"}}


def ropes_row(i: int, answers=("x",)) -> dict:
    return {"id": f"r{i}", "background": f"water is hot {i}.", "situation": "the sun is hot.",
            "question": f"is the sky red {i}?", "answers": {"text": list(answers), "answer_start": [0] * len(answers)}}


# ---------------------------------------------------------------------------------- templates


def test_shipped_files_name_their_promptsource_source_and_cover_table_2():
    assert sorted(set(P3_EIGHT_QA) | set(P3_TIES)) == shipped()
    for task in shipped():
        doc = yaml.safe_load((PROMPTS_DIR / f"{task}.yaml").read_text())
        src = doc["source"]
        assert src["repo"] == "bigscience-workshop/promptsource" and src["tag"] == "v0.2.3"
        assert re.fullmatch(r"[0-9a-f]{40}", src["commit"]) and re.fullmatch(r"[0-9a-f]{40}", src["blob"])
        assert src["path"].startswith("promptsource/templates/") and src["path"].endswith("/templates.yaml")
        assert doc["selection"]["repo"] == "r-three/mats"
        prompts = load_prompts(task)
        assert prompts.templates and all("|||" in t["jinja"] for t in prompts.templates)
        # r-three/mats keeps only original-task templates whose metrics are all the reader's
        assert all(set(t["metrics"]) <= set(doc["selection"]["metrics_to_use"]) for t in prompts.templates)
        kept = {t["name"] for t in prompts.templates}
        assert not kept & set(doc["selection"]["ignored"])
    assert [t["name"] for t in load_prompts("social_iqa").templates] == [
        "I was wondering", "Show choices and generate answer", "Generate answer", "Show choices and generate index"]


@pytest.mark.parametrize("suite, tasks", [("t5-qa8", P3_EIGHT_QA), ("t5-nlp7", P3_TIES)])
def test_real_configs_list_hub_datasets_with_their_templates(suite, tasks):
    from submerge.recipe import parse_config

    cfg = yaml.safe_load((ROOT / "config" / "suites" / f"{suite}.yaml").read_text())
    parse_config(cfg)  # every prompt resolves at start-up
    assert sorted(cfg["experts"]) == sorted(tasks)
    for name, spec in cfg["experts"].items():
        ds = spec["dataset"]
        assert ds["kind"] == "text" and ds["prompt"] == name and "/" in ds["hub"] and "path" not in ds
        assert ds["val_last"] == {"quartz": 200, "qasc": 500, "wsc": 100}.get(name, 1000)  # r-three/mats


def test_rendered_prompt_equals_its_template_applied_by_hand():
    prompts = load_prompts("quartz")
    assert prompts.templates[0]["name"] == "use_info_from_question_paragraph"
    row = render_rows(prompts, [quartz_row(3, "B")])[0]
    # promptsource v0.2.3 quartz/use_info_from_question_paragraph, written out by hand: the question
    # is trimmed of ".?!", its blank replaced by the choices joined with " or ", "?" appended; jinja
    # keeps the newline after each block tag; the parts around "|||" are stripped
    assert row["input"] == ("Use information from the paragraph to answer the question.\n\nQuestion:\n\n\n"
                            "If the sky is 3 the cat is red or blue? \n\n\nParagraph :\n\nthe dog is blue 3.")
    assert row["target"] == "blue" and row["choices"] == ["red", "blue"] and row["label"] == 1
    # a "|||" inside a field is protected from the split
    row = render_rows(prompts, [{**quartz_row(3), "para": "a ||| b"}])[0]
    assert row["input"].endswith("Paragraph :\n\na ||| b")
    wsc = load_prompts("wsc")
    assert wsc.templates[5]["name"] == "GPT-3 Style"
    example = {"text": "Mark told Pete many lies about himself.", "span1_index": 0, "span2_index": 5,
               "span1_text": "Mark", "span2_text": "himself", "idx": 0, "label": 1}
    row = render_rows(wsc, [example] * 6)[5]
    assert row["input"] == ("Passage: Mark told Pete many lies about himself. \n\nQuestion: In the passage above, "
                            "does the pronoun \"himself\" refer to Mark?\n\nAnswer:")
    assert row["choices"] == ["No", "Yes"] and row["label"] == 1 and row["target"] == "Yes"


def test_templates_go_round_robin_and_labels_follow_the_reader():
    prompts = load_prompts("quartz")
    rows = render_rows(prompts, [quartz_row(i, "AB"[i % 2]) for i in range(19)])
    names = [t["name"] for t in prompts.templates]
    assert [r["template"] for r in rows] == [names[i % len(names)] for i in range(19)]
    assert [r["label"] for r in rows] == [i % 2 for i in range(19)]  # answerKey A -> 0, B -> 1
    assert all(r["target"] == r["choices"][r["label"]] for r in rows)
    wino = load_prompts("winogrande")  # r-three/mats: lbl = int(answer) - 1
    ex = {"sentence": "The cat ate the dog because _ was hungry.", "option1": "cat", "option2": "dog", "answer": "2"}
    assert all(r["label"] == 1 and r["target"] == r["choices"][1] for r in render_rows(wino, [ex] * 5))
    ropes = render_rows(load_prompts("ropes"), [ropes_row(i, ["it", "sun"]) for i in range(3)])
    assert all(r["answers"] == ["it", "sun"] and r["target"] in ("it", "sun") and "choices" not in r for r in ropes)
    assert ropes == render_rows(load_prompts("ropes"), [ropes_row(i, ["it", "sun"]) for i in range(3)])


def test_squad_score_by_hand():
    # normalised: "cat sat" vs "cat sat down" -> EM 0, F1 = 2 * 1 * (2/3) / (1 + 2/3) = 0.8
    assert squad_score("The cat sat!", ["a cat sat down"]) == pytest.approx(0.4)
    assert squad_score("The cat sat!", ["a cat sat down", "cat, sat"]) == 1.0
    assert squad_score("dog", ["cat"]) == 0.0


def test_unknown_prompt_fails_at_start_up_naming_the_field():
    from submerge.recipe import parse_config

    cfg = yaml.safe_load((ROOT / "config" / "suites" / "t5-nlp7.yaml").read_text())
    cfg["experts"]["wsc"]["dataset"]["prompt"] = "wsc_typo"
    with pytest.raises(ConfigError, match=r"experts\.wsc\.dataset\.prompt.*wsc_typo"):
        parse_config(cfg)


# ----------------------------------------------------------------------- splits, rendered files


def _save(path: Path, splits: dict) -> Path:
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(path))
    return path


def _suite(path, **dataset):
    return {"adapter": "hf_t5", "tokenizer": {"path": "unused"},
            "experts": {"quartz": {"dataset": {"kind": "text", "path": str(path), "prompt": "quartz", **dataset}}}}


def test_validation_is_held_out_as_r_three_mats_does(tmp_path):
    path = _save(tmp_path / "d", {"train": [quartz_row(i) for i in range(10)],
                                  "validation": [quartz_row(100 + i) for i in range(5)]})
    task = LanguageTask(_suite(path, test_split="validation", val_last=3), "quartz", root=tmp_path)
    assert [r["id"] for r in open_text_split(task.cfg, "val", expert="quartz")] == ["q7", "q8", "q9"]
    assert len(open_text_split(task.cfg, "test", expert="quartz")) == 5
    task = LanguageTask(_suite(path, test_split="train", val_last=4, test_last=4), "quartz", root=tmp_path)
    val, test = (open_text_split(task.cfg, s, expert="quartz") for s in ("val", "test"))
    assert [r["id"] for r in test] == [r["id"] for r in val] == ["q6", "q7", "q8", "q9"]  # qasc in r-three/mats


def test_rendered_split_is_cached_and_checked(tmp_path):
    path = _save(tmp_path / "d", {"train": [quartz_row(i, "AB"[i % 3 == 0]) for i in range(10)],
                                  "validation": [quartz_row(100 + i) for i in range(5)]})
    suite = _suite(path, test_split="validation", val_last=3)
    rows, meta = render_split(suite, "quartz", "val")
    assert [r["input"] for r in rows] == [r["input"] for r in render_rows(load_prompts("quartz"),
                                                                           [quartz_row(i) for i in (7, 8, 9)])]
    out = tmp_path / "evaldata" / "quartz" / "val.jsonl"
    save_rendered(out, rows, meta)
    meta = read_rendered_meta(out)
    assert meta["prompt"]["sha256"] == hashlib.sha256((PROMPTS_DIR / "quartz.yaml").read_bytes()).hexdigest()
    task = LanguageTask(suite, "quartz", root=tmp_path)
    task.use_prepared("val", out)
    assert task.split("val")["input"] == [r["input"] for r in rows]
    # another hold-out: refused
    other = LanguageTask(_suite(path, test_split="validation", val_last=4), "quartz", root=tmp_path)
    with pytest.raises(CheckpointError, match="another dataset"):
        other.use_prepared("val", out)
    # a flipped byte: refused on read
    data = bytearray(out.read_bytes())
    data[10] ^= 1
    out.write_bytes(bytes(data))
    task = LanguageTask(suite, "quartz", root=tmp_path)
    task.use_prepared("val", out)
    with pytest.raises(CheckpointError, match="sha256"):
        task.split("val")


# ------------------------------------------------------------------- the workflow on a tiny T5


def _tokenizer(path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(path))
    return fast


ARCH = {"vocab_size": len(WORDS) + 3, "d_model": 16, "d_kv": 8, "d_ff": 32, "num_layers": 2, "num_heads": 2,
        "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1}


def _state(model) -> dict:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _labelled(task: str, model, tokenizer, rows: list[dict]) -> tuple[list[dict], float]:
    """``rows`` (one evaluation split, in order) with their answers set to ``model``'s own: the
    expert's score on them is then known (1.0 for rank classification)."""
    rendered = render_rows(load_prompts(task), rows)
    inputs = [r["input"] for r in rendered]
    if task == "quartz":
        scores = T5.score_choices(model, tokenizer, inputs, [r["choices"] for r in rendered])
        for s in scores:
            assert abs(float(s[0] - s[1])) > 1e-3  # no near-ties
        return [{**row, "answerKey": "AB"[int(s.argmax())]} for row, s in zip(rows, scores)], 1.0
    gens = T5.generate(model, tokenizer, inputs, max_new_tokens=64)
    # SQuAD normalisation drops punctuation and articles: an answer left with a word scores
    # exact match 1 and F1 1, one left empty exact match 1 and F1 0
    expected = sum(1.0 if [w for w in re.findall(r"\w+", g.lower()) if w not in ("a", "an", "the")] else 0.5
                   for g in gens) / len(gens)
    return [ropes_row(int(row["id"][1:]), [g]) for row, g in zip(rows, gens)], expected


def _make_inputs(root: Path) -> tuple[dict, dict]:
    from safetensors.torch import save_file
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = _tokenizer(root / "tokenizer")
    torch.manual_seed(0)
    base = T5ForConditionalGeneration(T5Config(**ARCH)).eval()
    files = {"base": root / "base.safetensors"}
    save_file(_state(base), str(files["base"]))
    expected, experts = {}, {}
    for k, (task, row, n_train, n_test, val_last) in enumerate(
            [("quartz", quartz_row, 9, 5, 4), ("ropes", ropes_row, 7, 3, 3)]):
        expert = copy.deepcopy(base)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(k + 1)
            for p in expert.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
        files[task] = root / task / "model.safetensors"
        files[task].parent.mkdir()
        save_file(_state(expert), str(files[task]))
        train, test = [row(i) for i in range(n_train)], [row(100 + i) for i in range(n_test)]
        head, val = train[:-val_last], train[-val_last:]
        val, expected[(task, "val")] = _labelled(task, expert, tokenizer, val)
        test, expected[(task, "test")] = _labelled(task, expert, tokenizer, test)
        if task == "quartz":  # a hub dataset (a local hub-style folder of Parquet files): rule fetch_dataset
            source = {"hub": str(root / "hub" / task)}
            (root / "hub" / task).mkdir(parents=True)
            for split, split_rows in (("train", head + val), ("validation", test)):
                datasets.Dataset.from_list(split_rows).to_parquet(str(root / "hub" / task / f"{split}.parquet"))
        else:  # a DatasetDict saved to disk
            source = {"path": str(_save(root / "data" / task, {"train": head + val, "validation": test}))}
        experts[task] = {"source": {"path": str(files[task]),
                                    "sha256": hashlib.sha256(files[task].read_bytes()).hexdigest()},
                         "dataset": {"kind": "text", **source, "test_split": "validation",
                                     "val_last": val_last, "prompt": task}}
    cfg = {"suite": "t5tiny", "adapter": "hf_t5", "arch": ARCH, "tokenizer": {"path": str(root / "tokenizer")},
           "base": {"source": {"path": str(files["base"])}}, "experts": experts,
           "groups": {"all": ["quartz", "ropes"]},
           "methods": {"ta_sb": {"merge": "task_arithmetic", "boost": {}}},
           "grid": {"alpha": [0.5, 1.0], "beta": [0.0]}, "eval": {"batch_size": 4}, "device": "cpu"}
    return cfg, expected


@pytest.fixture(scope="module")
def t5_run(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        for k, v in OFFLINE.items():
            mp.setenv(k, v)
        inputs = tmp_path_factory.mktemp("inputs")
        mp.setenv("HF_DATASETS_CACHE", str(inputs / "hf_datasets"))  # what fetch_dataset fills
        torch.set_num_threads(1)
        cfg, expected = _make_inputs(inputs)
        workdir = tmp_path_factory.mktemp("run")
        snakemake(workdir, write_config(workdir, cfg), "results/t5tiny/scores.csv", timeout=600)
        yield workdir, cfg, expected


@pytest.mark.slow
def test_t5_suite_runs_from_its_config_with_rendered_splits(t5_run):
    workdir, cfg, expected = t5_run
    root = workdir / "results" / "t5tiny"
    # the hub dataset went through rule fetch_dataset (into the datasets cache), the other not
    fetched = json.loads((root / "downloads" / "datasets" / "quartz.json").read_text())
    assert {s: v["num_rows"] for s, v in fetched["splits"].items()} == {"train": 9, "validation": 5}
    assert not (root / "downloads" / "datasets" / "ropes.json").exists()
    # the rendered splits are rule outputs, one per task and split
    for task in ("quartz", "ropes"):
        for split in ("val", "test"):
            meta = json.loads((root / "evaldata" / task / f"{split}.json").read_text())
            assert meta["expert"] == task and meta["split"] == split and meta["prompt"]["task"] == task
            assert meta["prompt"]["source"]["tag"] == "v0.2.3"
            prov = json.loads((root / "evaldata" / task / f"{split}.jsonl.json").read_text())
            assert json.dumps(meta["prompt"]["sha256"]) in json.dumps(prov)  # the template file, by hash
    rows = [json.loads(line) for line in (root / "evaldata" / "quartz" / "val.jsonl").read_text().splitlines()]
    assert len(rows) == 4  # val_last rows of train: rows 5..8
    assert rows[0]["template"] == "use_info_from_question_paragraph"
    assert rows[0]["input"] == ("Use information from the paragraph to answer the question.\n\nQuestion:\n\n\n"
                                "If the sky is 5 the cat is red or blue? \n\n\nParagraph :\n\nthe dog is blue 5.")
    names = [t["name"] for t in load_prompts("quartz").templates]
    assert [r["template"] for r in rows] == names[:4]
    # the experts' own answers are the labels: the chain (checkpoint, hold-out, templates in order,
    # tokenisation in the adapter, scoring) reproduces their scores
    for task in ("quartz", "ropes"):
        ref = json.loads((root / "reference" / f"{task}.json").read_text())
        for split in ("val", "test"):
            assert ref[split]["expert"] == pytest.approx(expected[(task, split)], abs=1e-9), (task, split, ref)
    scores = pd.read_csv(root / "scores.csv")
    assert set(scores.task) == {"quartz", "ropes"} and scores.accuracy.between(0, 1).all()
    assert sorted(scores[scores.split == "val"].groupby("method").size().items()) == [("ta_sb", 4)]
    assert sorted(scores[scores.split == "test"].groupby("method").size().items()) == [("ta_sb", 2)]


@pytest.mark.parametrize("dataset", [
    {"kind": "text", "hub": "org/qa", "prompt": "quartz", "test_split": "validation", "val_last": 5},
    {"kind": "text", "hub": "org/sc", "config_name": "2016", "data_dir": "/manual/sc", "prompt": "story_cloze",
     "train_split": "validation", "test_split": "test", "val_last": 5},
    {"kind": "text", "hub": "org/qasc", "prompt": "qasc", "test_split": "train", "val_last": 5, "test_last": 5},
])
def test_prefetch_makes_the_calls_of_the_text_evaluation(dataset, tmp_path, monkeypatch):
    """fetch_dataset loads exactly what rule eval_text opens, with the same arguments (data_dir
    included), so that the rendering job finds it in the cache."""
    from submerge.stages import fetch as F

    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, tuple(sorted(kwargs.items()))))
        return datasets.Dataset.from_list([quartz_row(i) for i in range(12)])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    record = F.prefetch_dataset(dataset, tmp_path / "d.json", expert="e")
    fetched = set(calls)
    assert len(fetched) == len(calls) == len(record["splits"])
    if "data_dir" in dataset:
        assert all(dict(kw)["data_dir"] == "/manual/sc" for _, kw in calls)
    calls.clear()
    dcfg = F._dataset_cfg(dataset, "e")
    for split in ("val", "test"):
        expected = 5 if split == "val" or "test_last" in dataset else 12
        assert len(open_text_split(dcfg, split, expert="e")) == expected
    assert set(calls) == fetched


def test_stage_writes_rendered_split_sidecar_and_provenance(tmp_path):
    from submerge.stages.evaldata import eval_data_file, needs_rendered_text, render_eval_text

    path = _save(tmp_path / "d", {"train": [quartz_row(i) for i in range(6)],
                                  "validation": [quartz_row(100 + i) for i in range(3)]})
    suite = _suite(path, test_split="validation", val_last=2)
    entry = suite["experts"]["quartz"]
    assert needs_rendered_text(entry) and not needs_rendered_text({"dataset": {"kind": "text", "hub": "x"}})
    out = Path(eval_data_file(str(tmp_path / "results"), "quartz", entry, "test"))
    assert out == tmp_path / "results" / "evaldata" / "quartz" / "test.jsonl"
    render_eval_text(suite, "quartz", "test", out)
    assert read_rendered_meta(out)["n"] == 3
    prov = json.loads(out.with_name("test.jsonl.json").read_text())
    template_sha = hashlib.sha256((PROMPTS_DIR / "quartz.yaml").read_bytes()).hexdigest()
    assert template_sha in json.dumps(prov) and hashlib.sha256(out.read_bytes()).hexdigest() in json.dumps(prov)
    with pytest.raises(ConfigError, match="no text dataset block with a prompt"):
        render_eval_text({"experts": {"quartz": {"dataset": {"kind": "text", "path": str(path)}}}}, "quartz",
                         "test", out)
