"""Downloads on the submit host (submerge.stages.fetch, workflow/rules/fetch.smk): checkpoints
into the cache from a local HTTP server, then served offline; hub datasets opened through the
evaluation's own calls; the fetch rules are localrules, planned only for real suites."""

from __future__ import annotations

import copy
import hashlib
import http.server
import json
import re
from pathlib import Path

import pytest
import yaml

from http_utils import local_http_server
from submerge.errors import CheckpointError, ConfigError
from submerge.stages import fetch as F
from workflow_utils import ROOT, TINY, load_tiny, planned_jobs, snakemake, write_config

FILES = {name: hashlib.sha256(name.encode()).digest() * 512 for name in ("base.pt", "a.pt", "b-head.pt", "clip.pt")}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.requests.append(self.path)
        body = FILES.get(self.path.lstrip("/"))
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")


@pytest.fixture
def server():
    with local_http_server(Handler, requests=[]) as served:
        yield served


@pytest.fixture(autouse=True)
def env(tmp_path, monkeypatch):
    """Online, with the download cache in tmp_path."""
    monkeypatch.delenv("SUBMERGE_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("SUBMERGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ------------------------------------------------------------------------------ checkpoints


def test_prefetch_sources_fills_cache_then_serves_it_offline(server, tmp_path, env, monkeypatch):
    httpd, url = server
    local = tmp_path / "local.pt"
    local.write_bytes(b"a tiny local checkpoint")
    sources = {
        "base": {"source": {"url": f"{url}/base.pt", "sha256": _sha(FILES["base.pt"])}},
        "a": {"source": {"url": f"{url}/a.pt"}, "trust_pickle": False},  # unpinned: hashed here
        "a.head": {"source": {"path": str(local)}},
    }
    out = tmp_path / "downloads" / "x.json"
    record = F.prefetch_sources(sources, out)
    assert json.loads(out.read_text()) == record
    assert sorted(record) == ["a", "a.head", "base"]
    for label, name in (("base", "base.pt"), ("a", "a.pt")):
        path = Path(record[label]["path"])
        assert path.is_relative_to(env) and path.read_bytes() == FILES[name]
        assert record[label]["sha256"] == _sha(FILES[name])
        assert record[label]["source"] == sources[label]["source"]
    assert record["a.head"] == {"path": str(local), "sha256": _sha(local.read_bytes()),
                                "source": {"path": str(local)}}
    assert sorted(httpd.requests) == ["/a.pt", "/base.pt"]

    # the network gone, offline mode on: the same fetch is served from the cache
    httpd.shutdown()
    monkeypatch.setenv("SUBMERGE_OFFLINE", "1")
    assert F.prefetch_sources(sources, tmp_path / "again.json") == record
    assert len(httpd.requests) == 2
    # what the compute job does later (stages.common.load_source) finds the same file
    from submerge.io.download import fetch
    from submerge.stages.common import cache_dir

    assert str(fetch(sources["a"]["source"], cache_dir())) == record["a"]["path"]


def test_prefetch_sources_errors(server, tmp_path, monkeypatch):
    _, url = server
    with pytest.raises(ConfigError, match="needs a 'source'"):
        F.prefetch_sources({"base": {"build": "digits"}}, tmp_path / "x.json")
    monkeypatch.setenv("SUBMERGE_OFFLINE", "1")  # a cache miss offline names the file
    with pytest.raises(CheckpointError, match=r"clip\.pt.*not in the cache.*offline"):
        F.prefetch_sources({"zeroshot_model": {"source": {"url": f"{url}/clip.pt"}}}, tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


# ------------------------------------------------------------------------- the suite's table


def _real_view():
    cfg = yaml.safe_load((ROOT / "config" / "suites" / "vit-b-32.yaml").read_text())
    return {k: v for k, v in cfg.items() if k not in ("groups", "methods", "grid")}


def test_checkpoint_sources_and_records():
    view = _real_view()
    experts = list(view["experts"])
    sources = F.checkpoint_sources(view)
    assert list(sources) == ["base", *experts, "zeroshot_model"]
    assert sources["base"] == {"base": {"source": view["base"]["source"]}}
    assert sources["cars"] == {"cars": {"source": view["experts"]["cars"]["source"]}}
    assert sorted(F.hub_datasets(view)) == sorted(experts)
    r = "results/vit-b-32"
    assert F.build_records(view, r, "base") == [f"{r}/downloads/base.json"]
    assert F.build_records(view, r, "cars") == [f"{r}/downloads/cars.json", f"{r}/downloads/zeroshot_model.json"]
    assert F.eval_records(view, r, ["cars", "dtd"]) == [f"{r}/downloads/datasets/cars.json",
                                                         f"{r}/downloads/datasets/dtd.json"]
    assert len(F.all_records(view, r)) == 1 + 2 * len(experts) + 1

    # a shipped head is the expert's; path sources and path datasets download nothing
    view["experts"]["cars"]["head"] = {"source": {"url": "https://host/head.pt"}}
    view["experts"]["dtd"]["source"] = {"path": "/ckpt/dtd.pt"}
    view["experts"]["dtd"]["dataset"] = {"path": "/data/dtd", "classes": "dtd"}
    sources = F.checkpoint_sources(view)
    assert sources["cars"] == {"cars": {"source": view["experts"]["cars"]["source"]},
                               "cars.head": {"source": {"url": "https://host/head.pt"}}}
    assert "dtd" not in sources and "dtd" not in F.hub_datasets(view)
    assert F.build_records(view, r, "cars") == [f"{r}/downloads/cars.json"]  # no zero-shot head
    assert F.build_records(view, r, "dtd") == [f"{r}/downloads/zeroshot_model.json"]
    assert F.eval_records(view, r, ["dtd"]) == []

    # an expert whose name is taken by another record
    view["experts"]["zeroshot_model"] = view["experts"].pop("cars")
    with pytest.raises(ConfigError, match="experts.zeroshot_model"):
        F.checkpoint_sources(view)


def test_digits_suite_fetches_nothing():
    cfg = load_tiny()
    view = {k: v for k, v in cfg.items() if k not in ("groups", "methods", "grid")}
    assert F.checkpoint_sources(view) == {} and F.hub_datasets(view) == {}
    assert F.hub_tokenizer(view) is None and F.all_records(view, "results/tiny") == []
    assert F.build_records(view, "r", "base") == [] and F.eval_records(view, "r", ["rot90"]) == []


def test_text_suite_tokenizer_records():
    view = {"suite": "t", "adapter": "hf_t5", "tokenizer": {"hub": "google/t5-v1_1-large"},
            "base": {"source": {"path": "/b.safetensors"}},
            "experts": {"qa": {"source": {"path": "/qa.safetensors"},
                               "dataset": {"kind": "text", "hub": "org/qa", "choices_key": "c"}}}}
    assert F.checkpoint_sources(view) == {}
    assert F.eval_records(view, "r", ["qa"]) == ["r/downloads/datasets/qa.json", "r/downloads/tokenizer.json"]
    assert F.build_records(view, "r", "qa") == []


# ---------------------------------------------------------------------------------- datasets


@pytest.mark.parametrize("dataset", [
    {"hub": "org/images", "revision": "abc", "classes": "mnist"},
    {"hub": "org/images", "config_name": "c", "val_split": "validation", "test_split": "validation"},
    {"hub": "org/images", "val_split": "validation"},
    {"kind": "text", "hub": "org/qa", "choices_key": "choices", "train_split": "tr"},
])
def test_prefetch_dataset_makes_the_evaluation_calls(dataset, tmp_path, monkeypatch):
    """prefetch_dataset loads exactly the splits the evaluation later opens, with the same
    datasets.load_dataset arguments (so those find them in the cache)."""
    import datasets

    from submerge.data import vision

    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, tuple(sorted(kwargs.items()))))
        return datasets.Dataset.from_dict({"image": list(range(40)), "label": [0] * 40})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    record = F.prefetch_dataset(dataset, tmp_path / "d.json", expert="e")
    assert json.loads((tmp_path / "d.json").read_text()) == record
    fetched = set(calls)
    assert len(fetched) == len(calls) == len(record["splits"])
    assert all(s["num_rows"] == 40 for s in record["splits"].values())
    calls.clear()
    dcfg = F._dataset_cfg(dataset, "e")
    for split in vision.SPLITS:
        vision.open_split(dcfg, split, expert="e")
    assert set(calls) == fetched


def test_prefetch_dataset_from_a_local_hub_dir_fills_the_cache(tmp_path, monkeypatch):
    import datasets

    src = tmp_path / "repo"
    src.mkdir()
    rows = datasets.Dataset.from_dict({"image": [[0]] * 30, "label": [1] * 30})
    rows.to_parquet(str(src / "train.parquet"))
    rows.select(range(7)).to_parquet(str(src / "test.parquet"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    record = F.prefetch_dataset({"hub": str(src)}, tmp_path / "d.json", expert="e")
    assert {k: v["num_rows"] for k, v in record["splits"].items()} == {"train": 30, "test": 7}
    files = [f for s in record["splits"].values() for f in s["cache_files"]]
    assert files and all(Path(f).is_relative_to(tmp_path / "hf") for f in files)


def test_path_dataset_needs_nothing(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", None)  # any load would fail
    record = F.prefetch_dataset({"path": "/data/x"}, tmp_path / "d.json", expert="x")
    assert record["splits"] == {} and record["path"] == "/data/x"


# ---------------------------------------------------------------------------------- workflow


def _snakefile(tmp_path: Path) -> Path:
    """The project's Snakefile with workflow/rules/fetch.smk included (a copy beside links to
    the project when the Snakefile does not include it yet)."""
    text = (ROOT / "Snakefile").read_text()
    if "workflow/rules/fetch.smk" in text:
        return ROOT / "Snakefile"
    wf = tmp_path / "wf"
    wf.mkdir()
    for name in ("src", "workflow", "scripts", "envs", "config", "profiles"):
        (wf / name).symlink_to(ROOT / name)
    anchor = 'include: "workflow/rules/common.smk"\n'
    assert anchor in text
    (wf / "Snakefile").write_text(text.replace(anchor, anchor + 'include: "workflow/rules/fetch.smk"\n'))
    return wf / "Snakefile"


def _real_config(url: str, tmp_path: Path) -> dict:
    cfg = load_tiny()
    local = tmp_path / "b.pt"
    local.write_bytes(b"b")
    cfg.pop("digits")
    cfg.update(suite="fetchy", arch={"model": "ViT-B-32"},
               base={"source": {"url": f"{url}/base.pt", "sha256": _sha(FILES["base.pt"])}},
               zeroshot_model={"source": {"url": f"{url}/clip.pt"}})
    cfg["experts"] = {
        "a": {"source": {"url": f"{url}/a.pt"}, "head": {"zeroshot": True},
              "dataset": {"path": str(tmp_path / "data-a"), "classes": "mnist"}},
        "b": {"source": {"path": str(local)}, "head": {"source": {"url": f"{url}/b-head.pt"}},
              "dataset": {"path": str(tmp_path / "data-b"), "classes": "mnist"}},
    }
    cfg["groups"] = {"g2": ["a", "b"]}
    return cfg


def _planned_prefetch(workdir: Path, configfile: Path, snakefile: Path) -> set[tuple[str, str]]:
    """(rule, output) of every fetch job a dry run of target ``prefetch`` would execute."""
    proc = snakemake(workdir, configfile, "-n", "prefetch", snakefile=snakefile)
    text = proc.stdout + proc.stderr
    return set(re.findall(r"(?:local)?rule (fetch_\w+):\n\s+output: (\S+)", text))


def test_digits_config_plans_no_fetch_jobs(tmp_path):
    snakefile = _snakefile(tmp_path)
    jobs = planned_jobs(tmp_path, TINY, snakefile=snakefile)
    assert jobs and not any(rule.startswith(("fetch", "prefetch")) for rule, _ in jobs)
    assert _planned_prefetch(tmp_path, TINY, snakefile) == set()


@pytest.mark.slow
def test_prefetch_runs_the_fetch_localrules(server, tmp_path, env):
    httpd, url = server
    snakefile = _snakefile(tmp_path)
    cfg = _real_config(url, tmp_path)
    hub = copy.deepcopy(cfg)
    hub["experts"]["a"]["dataset"] = {"hub": "org/a", "classes": "mnist"}
    assert _planned_prefetch(tmp_path, write_config(tmp_path, hub, "hub.yaml"), snakefile) == {
        ("fetch_checkpoints", f"results/fetchy/downloads/{n}.json") for n in ("base", "a", "b", "zeroshot_model")
    } | {("fetch_dataset", "results/fetchy/downloads/datasets/a.json")}

    configfile = write_config(tmp_path, cfg)
    snakemake(tmp_path, configfile, "prefetch", snakefile=snakefile)
    downloads = tmp_path / "results" / "fetchy" / "downloads"
    records = {p.stem: json.loads(p.read_text()) for p in downloads.glob("*.json")}
    assert sorted(records) == ["a", "b", "base", "zeroshot_model"]
    assert sorted(records["b"]) == ["b.head"]  # its checkpoint is a local path
    assert records["a"]["a"]["sha256"] == _sha(FILES["a.pt"])
    assert Path(records["zeroshot_model"]["zeroshot_model"]["path"]).read_bytes() == FILES["clip.pt"]
    assert sorted(httpd.requests) == ["/a.pt", "/b-head.pt", "/base.pt", "/clip.pt"]
    # done: nothing more to fetch
    assert _planned_prefetch(tmp_path, configfile, snakefile) == set()


def test_fetch_rules_are_localrules(tmp_path):
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings, StorageSettings

    snakefile = _snakefile(tmp_path)
    with SnakemakeApi(OutputSettings(quiet=True)) as api:
        workflow = api.workflow(resource_settings=ResourceSettings(), storage_settings=StorageSettings(),
                                config_settings=ConfigSettings(configfiles=[TINY]),
                                snakefile=snakefile, workdir=tmp_path)._workflow
        assert {"fetch_checkpoints", "fetch_dataset", "fetch_tokenizer", "prefetch"} <= workflow._localrules
