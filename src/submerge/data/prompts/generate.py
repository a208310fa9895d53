"""Write the prompt files of this folder from a promptsource checkout (run once; the files are shipped).

Each language task of the paper's Table 2 (the 8 QA tasks and 7 NLP tasks of Tam et al. 2024a,
code r-three/mats) is evaluated as r-three/mats does it (``src/data/dataset_readers.py``,
``P3_DatasetReader``): the task's promptsource templates (promptsource==0.2.3, the version in
r-three/mats' ``requirements.txt``) that are written for the original task and whose metrics are
all in the reader's ``metrics_toUse``, less the names it ignores, in the order of the templates
file; example ``i`` of a split gets template ``i % len(templates)`` (``evaluation_template_idx:
-1`` in ``configs/evaluation_dataset/p3_validation.json``).

    python -m submerge.data.prompts.generate /path/to/promptsource   # a git clone, tag v0.2.3 present

The jinja and answer-choice strings are copied verbatim (YAML round trip) from
``promptsource/templates/<dataset>/templates.yaml`` at tag v0.2.3; each file names that path, the
commit and the blob. Nothing else in the package imports this module.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

TAG = "v0.2.3"
MATS = {"repo": "r-three/mats", "commit": "df71e970e73349716d8688b2c9fab302e9c78393",
        "path": "src/data/dataset_readers.py"}

# task -> (promptsource dataset dir, r-three/mats reader class, metrics_toUse, ignored names,
#          load_dataset arguments in r-three/mats, the reader's label, its answer references)
TASKS = {
    "cosmos_qa": ("cosmos_qa", "P3_CosmosQAReader", ["Accuracy"], [], ["cosmos_qa"],
                  {"field": "label"}, None),
    "social_iqa": ("social_i_qa", "P3_SocialIQAReader", ["Accuracy"],
                   ["Check if a random answer is valid or not"], ["social_i_qa"],
                   {"field": "label", "offset": -1}, None),
    "paws": ("paws/labeled_final", "P3_PAWSReader", ["Accuracy"], [], ["paws", "labeled_final"],
             {"field": "label"}, None),
    "quail": ("quail", "P3_QuAILReader", ["Accuracy"], [], ["quail"],
              {"field": "correct_answer_id"}, None),
    "wiki_qa": ("wiki_qa", "P3_WikiQAReader", ["Accuracy"], [], ["wiki_qa"], {"field": "label"}, None),
    "quartz": ("quartz", "P3_QuaRTzReader", ["Accuracy"], [], ["quartz"],
               {"field": "answerKey", "map": {"A": 0, "B": 1}}, None),
    "qasc": ("qasc", "P3_QASCReader", ["Accuracy"], [], ["qasc"],
             {"field": "answerKey", "map": {k: i for i, k in enumerate("ABCDEFGH")}}, None),
    "ropes": ("ropes", "P3_ROPESReader", ["Squad"], [], ["ropes"], None, "answers.text"),
    "story_cloze": ("story_cloze/2016", "P3_StoryClozeReader", ["Accuracy"], [], ["story_cloze", "2016"],
                    {"field": "answer_right_ending", "offset": -1}, None),
    "winogrande": ("winogrande/winogrande_xl", "P3_WinograndeReader", ["Accuracy"], [],
                   ["winogrande", "winogrande_xl"], {"field": "answer", "offset": -1}, None),
    "wsc": ("super_glue/wsc.fixed", "P3_WSCReader", ["Accuracy"], [], ["super_glue", "wsc.fixed"],
            {"field": "label"}, None),
}


class _Loader(yaml.SafeLoader):
    """promptsource's ``!Template`` / ``!TemplateMetadata`` objects read as plain mappings."""


def _mapping(loader, node):
    return loader.construct_mapping(node, deep=True)


_Loader.add_constructor("!Template", _mapping)
_Loader.add_constructor("!TemplateMetadata", _mapping)


def _git(repo: Path, *args: str) -> str:
    return subprocess.check_output(["git", "-C", str(repo), *args], text=True).strip()


def task_file(repo: Path, task: str) -> dict:
    folder, reader, metrics, ignored, stash, label, answers = TASKS[task]
    path = f"promptsource/templates/{folder}/templates.yaml"
    commit = _git(repo, "rev-parse", f"{TAG}^{{commit}}")
    source = yaml.load(_git(repo, "show", f"{commit}:{path}") + "\n", Loader=_Loader)
    kept, dropped = [], []
    for tid, t in source["templates"].items():  # file order = DatasetTemplates.templates order
        meta = t["metadata"]
        reason = None
        if not meta.get("original_task"):
            reason = "not original_task"
        elif any(m not in metrics for m in meta.get("metrics") or []):
            reason = f"metrics {meta.get('metrics')} not all in {metrics}"
        elif t["name"] in ignored:
            reason = f"ignored by name in {reader}"
        if reason:
            dropped.append({"name": t["name"], "id": tid, "reason": reason})
        else:
            kept.append({"name": t["name"], "id": tid, "jinja": t["jinja"],
                         "answer_choices": t.get("answer_choices"), "metrics": list(meta["metrics"])})
    return {
        "task": task,
        "source": {"repo": "bigscience-workshop/promptsource", "tag": TAG, "commit": commit, "path": path,
                   "blob": _git(repo, "rev-parse", f"{commit}:{path}")},
        "selection": {**MATS, "reader": reader, "metrics_to_use": metrics, "ignored": ignored,
                      "load_dataset": stash},
        "metric": "squad" if metrics == ["Squad"] else "accuracy",
        "label": label,
        "answers": answers,
        "templates": kept,
        "excluded": dropped,
    }


def main(argv: list[str]) -> None:
    repo = Path(argv[0])
    out = Path(__file__).parent
    for task in TASKS:
        doc = task_file(repo, task)
        head = (f"# Prompt templates of task {task!r}, copied verbatim by submerge/data/prompts/generate.py from\n"
                f"# {doc['source']['repo']} {doc['source']['path']} at {TAG} ({doc['source']['commit']}),\n"
                f"# selected as r-three/mats {MATS['path']} ({doc['selection']['reader']}) selects them.\n")
        text = head + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=100)
        (out / f"{task}.yaml").write_text(text, encoding="utf-8")
        print(f"{task}: {len(doc['templates'])} templates kept, {len(doc['excluded'])} excluded")


if __name__ == "__main__":
    main(sys.argv[1:])
