"""The registry of merge functions: one entry per merge function, torch-free.

Each entry names the function's implementation (imported only when a merge runs), its label
and paper, its hyperparameters as they are spelt in a config (with the keyword of the function
each maps to, a default and a check) and the extra inputs the workflow must hand it. The config
check (:mod:`submerge.recipe`), the job params (``workflow/rules/common.smk``), the table labels
(:mod:`submerge.report.tables`) and the merge call (:func:`submerge.merging.merge`) all read
this one entry.

Adding a merge function: write ``src/submerge/merging/<name>.py`` (``fn(task_vectors,
layer_info, **kwargs) -> Δ_merge``, without α), then one :func:`register` call below
(see ``docs/extending.md``).
"""

from __future__ import annotations

import importlib
import numbers
from dataclasses import dataclass
from typing import Any, Callable

from submerge.errors import ConfigError

# Extra inputs a merge function may need, besides the group's task vectors:
TALL_LAMBDAS = "tall_lambdas"  # per-task TALL-mask λ chosen on validation (rule consensus_lambdas)
HOGSVD_CACHE = "hogsvd"  # the group's HO-GSVD cache (rule hogsvd)
EXTRA_INPUTS = (TALL_LAMBDAS, HOGSVD_CACHE)


def _number(lo: float | None = None, hi: float | None = None, *, lo_open=False, hi_open=False,
            integer=False) -> Callable[[Any], str | None]:
    """A check: a number (an integer if ``integer``) in the given range; returns the problem."""

    def check(value: Any) -> str | None:
        kind = numbers.Integral if integer else numbers.Real
        if isinstance(value, bool) or not isinstance(value, kind):
            return f"must be {'an integer' if integer else 'a number'}, got {value!r}"
        if value != value or value in (float("inf"), float("-inf")):
            return f"must be finite, got {value!r}"
        if lo is not None and (value < lo or (lo_open and value == lo)):
            return f"must be {'>' if lo_open else '>='} {lo}, got {value!r}"
        if hi is not None and (value > hi or (hi_open and value == hi)):
            return f"must be {'<' if hi_open else '<='} {hi}, got {value!r}"
        return None

    return check


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {list(choices)}, got {value!r}"

    return check


@dataclass(frozen=True)
class Hyper:
    """One hyperparameter of a merge function: its config ``name``, the function keyword
    ``arg`` it is passed as, its ``default`` and a ``check`` returning the problem or None."""

    name: str
    arg: str
    default: Any
    check: Callable[[Any], str | None]
    doc: str


@dataclass(frozen=True)
class MergeSpec:
    """A merge function: ``impl`` is ``"module:function"``, imported on first use."""

    name: str
    label: str
    paper: str
    impl: str
    hyper: tuple[Hyper, ...] = ()
    needs: tuple[str, ...] = ()  # extra inputs, from EXTRA_INPUTS
    sota: bool = False  # shown in the SOTA comparison table (paper Table 4)
    doc: str = ""

    def function(self) -> Callable:
        module, name = self.impl.split(":")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"merge function {self.name!r} needs {self.impl}, which cannot be "
                              f"imported: {err}") from err

    def check_hyper(self, values: dict[str, Any], where: str) -> dict[str, Any]:
        """``values`` (config names) checked and completed with defaults, in registry order;
        ConfigError naming ``where.<name>`` for an unknown name or a bad value."""
        known = [h.name for h in self.hyper]
        for name in values:
            if name not in known:
                raise ConfigError(f"config field {where}.{name}: merge function {self.name!r} has "
                                  f"no hyperparameter {name!r}; it takes {known or 'none'}")
        out = {}
        for h in self.hyper:
            value = values.get(h.name, h.default)
            problem = h.check(value)
            if problem:
                raise ConfigError(f"config field {where}.{h.name}: {problem}")
            out[h.name] = value
        return out

    def kwargs(self, hyper: dict[str, Any]) -> dict[str, Any]:
        """Config-named hyperparameters as the function's keyword arguments."""
        by_name = {h.name: h.arg for h in self.hyper}
        return {by_name[name]: value for name, value in hyper.items()}


MERGES: dict[str, MergeSpec] = {}


def register(spec: MergeSpec) -> MergeSpec:
    if spec.name in MERGES:
        raise ValueError(f"merge function {spec.name!r} registered twice")
    unknown = set(spec.needs) - set(EXTRA_INPUTS)
    if unknown:
        raise ValueError(f"merge function {spec.name!r}: unknown extra inputs {sorted(unknown)}")
    MERGES[spec.name] = spec
    return spec


def get(name: str, where: str = "merge") -> MergeSpec:
    """The registered merge function ``name``; ConfigError naming ``where`` otherwise."""
    try:
        return MERGES[name]
    except KeyError:
        raise ConfigError(f"config field {where}: unknown merge function {name!r}; "
                          f"known: {sorted(MERGES)}") from None


register(MergeSpec(
    name="task_arithmetic", label="TA", impl="submerge.merging.task_arithmetic:task_arithmetic",
    paper="Ilharco et al. 2023, Editing Models with Task Arithmetic, arXiv:2212.04089",
    doc="Δ = Σ_t τ_t"))

register(MergeSpec(
    name="ties", label="TIES", impl="submerge.merging.ties:ties",
    paper="Yadav et al. 2023, TIES-Merging, arXiv:2306.01708",
    doc="trim to the top-k % per task, elect signs, disjoint merge",
    hyper=(
        Hyper("top_k_percent", "k", 20, _number(0, 100, lo_open=True),
              "percentage of each task vector's entries kept (by magnitude, whole model)"),
        Hyper("aggregate", "merge", "dis-mean", _one_of("dis-mean", "dis-sum", "sum"),
              "disjoint aggregation of the entries that agree with the elected sign"),
    )))

register(MergeSpec(
    name="consensus", label="Consensus", impl="submerge.merging.consensus:consensus",
    paper="Wang et al. 2024, Localizing Task Information for Improved Model Merging and "
          "Compression (TALL masks / Consensus), arXiv:2405.07813",
    doc="the combined task vector, kept where at least min_votes TALL masks agree",
    needs=(TALL_LAMBDAS,),
    hyper=(
        Hyper("min_votes", "k", 2, _number(0, integer=True),
              "number of task masks that must keep an entry"),
        Hyper("combine", "base", "ta", _one_of("ta", "ties"),
              "how the task vectors are combined before masking (TA sum or TIES dis-sum)"),
    )))

register(MergeSpec(
    name="tsv_m", label="TSV-M", impl="submerge.merging.tsv:tsv_m", sota=True,
    paper="Gargiulo et al. 2025, Task Singular Vectors, arXiv:2412.00081",
    doc="top ⌊d/T⌋ singular triplets per task, orthogonalised"))

register(MergeSpec(
    name="iso_c", label="Iso-C", impl="submerge.merging.iso:iso_c", sota=True,
    paper="Marczak et al. 2025, No Task Left Behind (Iso-C), arXiv:2502.04959",
    doc="the summed task vector with a flat spectrum"))

register(MergeSpec(
    name="iso_cts", label="Iso-CTS", impl="submerge.merging.iso:iso_cts", sota=True,
    paper="Marczak et al. 2025, No Task Left Behind (Iso-CTS), arXiv:2502.04959",
    doc="common plus task-specific subspaces with a flat spectrum",
    hyper=(
        Hyper("common_space_fraction", "common_space_fraction", 0.8,
              _number(0, 1, lo_open=True, hi_open=True),
              "fraction of each matrix's rank given to the common subspace"),
    )))

register(MergeSpec(
    name="hogsvd", label="HO-GSVD", impl="submerge.hogsvd:hogsvd_merge",
    paper="Skorobogat et al. 2025, Subspace-Boosted Model Merging (Algorithm 2), arXiv:2506.16506",
    doc="Higher-Order reconstruction from the group's HO-GSVD cache (π: config hogsvd.pi)",
    needs=(HOGSVD_CACHE,)))
