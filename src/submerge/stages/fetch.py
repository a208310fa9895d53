"""Downloads on the submit host (``workflow/rules/fetch.smk``, ``snakemake prefetch``).

Compute nodes of many clusters have no internet. The fetch rules are ``localrules``: they run
in the Snakemake process itself, on the login node, and put every file a compute job would
download into the caches that job reads:

* checkpoints (base, each expert and its shipped head, ``zeroshot_model``):
  :func:`submerge.io.download.fetch` into :func:`~submerge.stages.common.cache_dir`, the call
  :func:`~submerge.stages.common.load_source` makes later (which then finds the file there,
  also in offline mode);
* hub datasets: the ``datasets.load_dataset`` calls of :func:`submerge.data.vision.load_named_split`
  (text: :func:`submerge.data.language.load_text_split`, which passes ``data_dir``) for the
  splits the evaluation opens (``test_split``, and ``val_split`` or ``train_split``),
  into the Hugging Face datasets cache (``HF_DATASETS_CACHE`` / ``HF_HOME``); ``path:`` datasets
  need nothing;
* a hub tokenizer (suite ``tokenizer: {hub: ...}``): :func:`submerge.models.load_tokenizer`,
  into the Hugging Face hub cache.

Each writes a small JSON record (what was fetched, where it is). The jobs that need the files
take those records as inputs, so they run after the fetch; they still open the files through
the same code, which then reads them from the cache. The caches must be on a file system the
compute nodes see. The digits suite (``build: digits``) has nothing to fetch.

This module imports no torch at module level: ``fetch.smk`` reads the table of downloads
(:func:`checkpoint_sources`, :func:`hub_datasets`, :func:`hub_tokenizer`) when the workflow is
parsed.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Iterable, Mapping

from submerge.errors import ConfigError
from submerge.recipe import is_digits

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

ZEROSHOT_MODEL = "zeroshot_model"  # the suite's full CLIP for zero-shot heads
TOKENIZER = "tokenizer"  # downloads/tokenizer.json
_DOWNLOADS = "downloads"  # results/{suite}/downloads/
_LOCAL = "path"  # a source or dataset kind that downloads nothing


# ------------------------------------------------------------------ what a suite downloads


def _downloads(spec: Mapping | None) -> bool:
    """Whether a checkpoint spec (``{"source": {...}}``) names a file to download."""
    return isinstance(spec, Mapping) and isinstance(spec.get("source"), Mapping) \
        and _LOCAL not in spec["source"]


def _source_only(spec: Mapping) -> dict:
    return {"source": dict(spec["source"])}


def checkpoint_sources(view: Mapping) -> dict[str, dict[str, dict]]:
    """Model name (``base``, an expert, ``zeroshot_model``) -> {label: ``{"source": ...}``} of
    the files its job fetches: an expert's own checkpoint (label: the expert) and its shipped
    head (label ``<expert>.head``). Only names with a hub or URL source are listed: a ``path``
    source and a digits model need no download."""
    out: dict[str, dict[str, dict]] = {}
    base = view.get("base") or {}
    if not is_digits(base) and _downloads(base):
        out["base"] = {"base": _source_only(base)}
    for expert, spec in (view.get("experts") or {}).items():
        if is_digits(spec):
            continue
        files = {}
        if _downloads(spec):
            files[expert] = _source_only(spec)
        if _downloads(spec.get("head")):
            files[f"{expert}.head"] = _source_only(spec["head"])
        if files:
            if expert in ("base", ZEROSHOT_MODEL, TOKENIZER):
                raise ConfigError(f"config field experts.{expert}: the name {expert!r} is taken by "
                                  f"results/<suite>/{_DOWNLOADS}/{expert}.json; rename the expert")
            out[expert] = files
    if _downloads(view.get(ZEROSHOT_MODEL)) and _needs_zeroshot(view):
        out[ZEROSHOT_MODEL] = {ZEROSHOT_MODEL: _source_only(view[ZEROSHOT_MODEL])}
    return out


def _needs_zeroshot(view: Mapping, experts: Iterable[str] | None = None) -> bool:
    """Whether one of ``experts`` (default: all) builds a zero-shot head: an image expert
    whose head has no ``source`` (stages.checkpoints._build_real_head)."""
    table = view.get("experts") or {}
    return any(not is_digits(table[e]) and isinstance(table[e].get("head"), Mapping)
               and "source" not in table[e]["head"]
               and (table[e].get("dataset") or {}).get("kind", "image") != "text"
               for e in (table if experts is None else experts))


def hub_datasets(view: Mapping) -> dict[str, dict]:
    """Expert -> its ``dataset`` block, for the experts whose evaluation data come from the hub."""
    return {e: dict(spec["dataset"]) for e, spec in (view.get("experts") or {}).items()
            if not is_digits(spec) and isinstance(spec.get("dataset"), Mapping)
            and spec["dataset"].get("hub") is not None}


def hub_tokenizer(view: Mapping) -> dict | None:
    """The suite's ``tokenizer`` block when it names a hub tokenizer (None otherwise)."""
    spec = view.get(TOKENIZER)
    if isinstance(spec, Mapping) and spec.get("hub") is not None:
        return dict(spec)
    return None


def _uses_tokenizer(view: Mapping, experts: Iterable[str]) -> bool:
    """Whether evaluating ``experts`` loads the suite's tokenizer (text tasks)."""
    table = view.get("experts") or {}
    return any((table[e].get("dataset") or {}).get("kind") == "text" for e in experts
               if not is_digits(table[e]))


# ------------------------------------------------------------ the records jobs wait for


def downloads_dir(root: str) -> str:
    """``results/{suite}/downloads`` for ``root`` = ``results/{suite}``."""
    return f"{root}/{_DOWNLOADS}"


def checkpoint_record(root: str, name: str) -> str:
    return f"{downloads_dir(root)}/{name}.json"


def dataset_record(root: str, expert: str) -> str:
    return f"{downloads_dir(root)}/datasets/{expert}.json"


def tokenizer_record(root: str) -> str:
    return f"{downloads_dir(root)}/{TOKENIZER}.json"


def all_records(view: Mapping, root: str) -> list[str]:
    """Every download record of the suite (rule ``prefetch``); [] for the digits suite."""
    files = [checkpoint_record(root, n) for n in checkpoint_sources(view)]
    files += [dataset_record(root, e) for e in hub_datasets(view)]
    if hub_tokenizer(view) is not None:
        files.append(tokenizer_record(root))
    return files


def build_records(view: Mapping, root: str, model: str) -> list[str]:
    """The records the job building ``model`` (``base`` or an expert: rules base_model and
    expert_model) waits for: its checkpoint(s); for an expert with a zero-shot head also
    ``zeroshot_model`` and a hub tokenizer (hf_clip_vision reads it there)."""
    sources = checkpoint_sources(view)
    files = [checkpoint_record(root, model)] if model in sources else []
    if model != "base" and _needs_zeroshot(view, [model]):
        if ZEROSHOT_MODEL in sources:
            files.append(checkpoint_record(root, ZEROSHOT_MODEL))
        if hub_tokenizer(view) is not None:
            files.append(tokenizer_record(root))
    return files


def eval_records(view: Mapping, root: str, experts: Iterable[str]) -> list[str]:
    """The records a job evaluating on ``experts``' data waits for: their hub datasets, and a
    hub tokenizer when one of them is a text task."""
    experts = list(experts)
    hub = hub_datasets(view)
    files = [dataset_record(root, e) for e in experts if e in hub]
    if hub_tokenizer(view) is not None and _uses_tokenizer(view, experts):
        files.append(tokenizer_record(root))
    return files


def by_wildcard(table: Mapping, wildcard: str) -> Callable:
    """A Snakemake params/input function: ``table[wildcards.<wildcard>]`` (rule files take no
    function definitions of their own)."""

    def entry(wildcards):
        return table[getattr(wildcards, wildcard)]

    entry.__name__ = f"{wildcard}_entry"
    return entry


# --------------------------------------------------------------------------- the fetches


def prefetch_sources(sources: Mapping[str, Mapping], out: PathLike) -> dict:
    """Fetch every checkpoint of ``sources`` (label -> ``{"source": {...}, ...}``, the spec
    dicts of the config) into :func:`~submerge.stages.common.cache_dir` and write ``out``:
    label -> ``{"path", "sha256", "source"}`` (JSON, atomically). A pinned sha256 is checked
    by the fetch; an unpinned file's hash is computed here."""
    from submerge.io.atomic import sha256_file
    from submerge.io.download import fetch
    from submerge.io.jsonio import write_json
    from submerge.stages.common import cache_dir

    cache = cache_dir()
    record = {}
    for label, spec in sources.items():
        if not isinstance(spec, Mapping) or not isinstance(spec.get("source"), Mapping):
            raise ConfigError(f"{label}: a checkpoint spec needs a 'source' mapping, got {spec!r}")
        source = spec["source"]
        path = fetch(source, cache)  # verifies a pinned sha256
        pinned = source.get("sha256")
        digest = str(pinned).strip().lower() if pinned else sha256_file(path)
        log.info("%s: %s (sha256 %s)", label, path, digest)
        record[label] = {"path": str(path), "sha256": digest, "source": dict(source)}
    write_json(out, record)
    return record


def _dataset_cfg(dataset: Mapping, expert: str) -> dict:
    """The parsed dataset block, with the defaults of its kind (image or text)."""
    from submerge.data.vision import VISION_DEFAULTS, parse_dataset_cfg

    if dataset.get("kind") == "text":
        from submerge.data.language import TEXT_DEFAULTS as defaults
    else:
        defaults = VISION_DEFAULTS
    return parse_dataset_cfg({"dataset": dataset}, expert, defaults)


def _split_fields(dcfg: Mapping) -> list[str]:
    """The ``*_split`` fields :func:`submerge.data.vision.open_split` (and, for text, :func:`submerge.
    data.language.open_text_split`) opens for "val" and "test", each once."""
    fields, names = [], set()
    val_field = "val_split" if dcfg.get("val_split") and dcfg.get("val_last") is None else "train_split"
    for field in (val_field, "test_split"):
        if dcfg[field] not in names:
            fields.append(field)
            names.add(dcfg[field])
    return fields


def prefetch_dataset(dataset: Mapping, out: PathLike, *, expert: str = "dataset") -> dict:
    """Download the splits an expert's evaluation opens (its ``dataset`` block) into the
    Hugging Face datasets cache, through :func:`submerge.data.vision.load_named_split` (the
    same ``datasets.load_dataset`` call as the evaluation, so that it finds them in the
    cache), and write ``out``: the dataset and each split's size and fingerprint (JSON,
    atomically). A ``path:`` dataset is local: nothing is loaded."""
    from submerge.data.vision import load_named_split
    from submerge.io.jsonio import write_json

    dcfg = _dataset_cfg(dataset, expert)
    if dcfg.get("kind") == "text":  # the same call as the text evaluation (data_dir)
        from submerge.data.language import load_text_split as load_named_split
    record = {"expert": expert, **{k: dcfg[k] for k in ("hub", "config_name", "revision", "path")},
              "splits": {}}
    if dcfg.get("path"):
        log.info("%s: dataset.path %s is local, nothing to fetch", expert, dcfg["path"])
    else:
        for field in _split_fields(dcfg):
            ds = load_named_split(dcfg, field, expert=expert)
            record["splits"][dcfg[field]] = {
                "field": field, "num_rows": len(ds),
                "fingerprint": getattr(ds, "_fingerprint", None),
                "cache_files": sorted(f["filename"] for f in getattr(ds, "cache_files", []) or []),
            }
            log.info("%s: hub dataset %r split %r: %d rows", expert, dcfg["hub"], dcfg[field], len(ds))
    write_json(out, record)
    return record


def prefetch_tokenizer(spec: Mapping, out: PathLike) -> dict:
    """Download the suite's hub tokenizer (:func:`submerge.models.load_tokenizer`, the call the
    jobs make) into the Hugging Face hub cache and write ``out`` (JSON, atomically)."""
    from submerge.io.jsonio import write_json
    from submerge.models import load_tokenizer

    tokenizer = load_tokenizer(spec)
    record = {"tokenizer": dict(spec), "class": type(tokenizer).__name__,
              "name_or_path": str(getattr(tokenizer, "name_or_path", ""))}
    log.info("tokenizer %s: %s", spec.get("hub") or spec.get("path"), record["class"])
    write_json(out, record)
    return record
