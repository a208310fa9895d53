"""Benchmark of rule eval_text's work: rendering a language task's split with its prompt templates (CPU).

Inputs: synthetic raw rows shaped like the real datasets (quartz: question, two choices, a
~60-word paragraph; cosmos_qa: ~90-word context, four answers; ropes: background ~150 words,
situation ~100 words, answers), ``--rows`` of each. Times, per task:

* ``render_rows``: every row rendered with the task's promptsource templates (round robin);
* ``save_rendered`` + ``read_rendered``: the cached JSON lines file written (atomically, with its
  sha256) and read back checked.

Writes a markdown table (with the command that made it) to ``--out``.

    PYTHONPATH=src .venv/bin/python bench/bench_render.py
"""

from __future__ import annotations

import argparse
import platform
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

from submerge.data.language import read_rendered, save_rendered
from submerge.data.prompts import load_prompts, render_rows
from submerge.io.atomic import write_text_atomic

WORDS = "the a cat dog sky is red blue more less water sun hot cold it was when then people because".split()


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def rows(task: str, n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if task == "quartz":
            out.append({"question": _text(rng, 12).replace(".", " _____."),
                        "choices": {"text": ["more", "less"], "label": ["A", "B"]},
                        "answerKey": rng.choice("AB"), "para": _text(rng, 60)})
        elif task == "cosmos_qa":
            out.append({"context": _text(rng, 90), "question": _text(rng, 10),
                        **{f"answer{i}": _text(rng, 8) for i in range(4)}, "label": rng.randrange(4)})
        else:  # ropes
            out.append({"background": _text(rng, 150), "situation": _text(rng, 100), "question": _text(rng, 12),
                        "answers": {"text": [_text(rng, 2)], "answer_start": [0]}})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--out", default=str(Path(__file__).with_name("render.md")))
    args = ap.parse_args()
    table = ["| task | templates | rows | render s | rows/s | write + checked read s | file MB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for task in ("quartz", "cosmos_qa", "ropes"):
        prompts = load_prompts(task)
        raw = rows(task, args.rows)
        t0 = time.perf_counter()
        rendered = render_rows(prompts, raw)
        t_render = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "val.jsonl"
            t0 = time.perf_counter()
            save_rendered(path, rendered, {"n": len(rendered)})
            back = read_rendered(path, read_rendered_meta_loose(path))
            t_io = time.perf_counter() - t0
            size = path.stat().st_size / 1e6
        assert back == rendered
        table.append(f"| {task} | {len(prompts.templates)} | {len(raw)} | {t_render:.2f} | "
                     f"{len(raw) / t_render:.0f} | {t_io:.2f} | {size:.1f} |")
    cmd = "PYTHONPATH=src .venv/bin/python bench/bench_render.py " + shlex.join(sys.argv[1:])
    text = "\n".join([
        "# Rendering language tasks with their prompt templates (rule eval_text, CPU)", "",
        f"Command: `{cmd.strip()}`", "",
        f"Machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}, one process "
        "(CPU shared with other jobs: timings are indicative). Rows: synthetic, shaped like the datasets "
        "(see the script's docstring).", "", *table, "",
        "The evaluated splits of the paper's language tasks hold at most a few thousand rows (the held-out "
        "validation parts 100 to 1000; the test splits, the datasets' validation splits, up to 8000 for "
        "paws): rendering takes seconds per split, once per task and split, while scoring them with "
        "T5-large takes minutes per grid point.", ""])
    write_text_atomic(args.out, text)
    print(text)


def read_rendered_meta_loose(path: Path) -> dict:
    """The sidecar as written here (no expert/dataset fields: only the hash and count are checked)."""
    import json

    return json.loads(path.with_suffix(".json").read_text())


if __name__ == "__main__":
    main()
