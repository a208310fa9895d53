"""The recipe: the validated config parsed once into small typed objects (torch-free).

``workflow/rules/common.smk``, the stage functions (:mod:`submerge.stages`) and the report
(:mod:`submerge.report`) all read the config through these objects:

* :class:`Suite`  -- one base model and its experts (name, adapter, architecture, root);
* :class:`Method` -- a merge function (:mod:`submerge.merges`) with its hyperparameters,
  optional LiNeS (:class:`Lines`), optional Subspace Boosting (:class:`Boost`), its α and β
  lists, its groups and its label;
* :class:`GridPoint` -- one (α, β), with the one codec between a point and its path;
* :func:`choose_point` -- the one choice of (α, β) on validation.

A job's params are the ``to_params()`` dicts of these objects (plain, JSON-like data, so that
Snakemake's params rerun trigger sees exactly what determines the job's result); a stage
function turns them back with ``from_params``. Every default is defined here, once.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from submerge import merges
from submerge.errors import ConfigError

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- defaults

SELECTION_METRICS = ("normalized", "absolute")
DEFAULT_SELECTION_METRIC = "normalized"
DEFAULT_BATCH_SIZE = 256
DEFAULT_CONSENSUS_LAMBDAS = (0.2, 0.3, 0.4, 0.5, 0.6)
DEFAULT_HOGSVD_PI = 1e-2
# Proposition 1 figure: a shared HO-GSVD direction is common when every pair of experts' σ lies
# within this factor (Eq. 6, submerge.hogsvd.common_unique_split)
DEFAULT_DECAY_THRESHOLD = 2.0
BOOST_LAYERS = ("attn", "mlp", "both")
ATTN_MODES = ("per_qkv", "full", "none")
LINES_NORM = "norm"  # LiNeS' base scale from the reference's norm ratio
# LiNeS protocols: "reference" (wang-kee/LiNeS src/eval/eval.py for multi-task merging: the
# base scale fixed from the norms, LiNeS' β tuned on validation over the method's alpha list,
# merge coefficient 1.0) or "fixed_slope" (LiNeS' β fixed to `slope`, the pipeline's α tuned)
LINES_PROTOCOLS = ("reference", "fixed_slope")
DEFAULT_LINES_PROTOCOL = "reference"
# the reference's LiNeS β list (np.linspace(0, 1, n_eval_points // 2 + 1)[1:], n_eval_points=21)
DEFAULT_LINES_SLOPES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# Accuracies are compared (and written to scores.csv) at this many significant digits, so that
# a choice made from the grid files and one made from scores.csv are the same choice.
SCORE_DIGITS = 6

# config keys that describe the workflow rather than the suite; every other key is the suite's
WORKFLOW_KEYS = ("groups", "methods", "grid", "eval", "experiments", "consensus_lambdas",
                 "hogsvd", "device", "gpu", "save_merged", "warm_worker", "export")

NAME = re.compile(r"[A-Za-z0-9_-]+")


def check_name(value: Any, where: str) -> str:
    """A name used in paths: letters, digits, '_' and '-' only (no newline, no '/')."""
    if not isinstance(value, str) or NAME.fullmatch(value) is None:
        raise ConfigError(f"config field {where}: {value!r} is not a valid name "
                          "(letters, digits, '_' and '-' only)")
    return value


def _finite(value: Any, where: str, *, lo: float, hi: float | None = None, lo_open: bool,
            hi_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"config field {where}: must be a finite number, got {value!r}")
    if value < lo or (lo_open and value == lo) or (
            hi is not None and (value > hi or (hi_open and value == hi))):
        bounds = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}{')' if hi_open else ']'}"
        raise ConfigError(f"config field {where}: {value!r} is outside {bounds}")
    return float(value)


# --------------------------------------------------------------------------- grid points


def encode_value(x: float) -> str:
    """A grid value in a path: the shortest text that reads back to exactly ``x``
    (``0.1`` → ``'0.1'``, ``1.0`` → ``'1'``, ``1e-07`` → ``'1e-07'``). Two different values
    never share a text; :func:`decode_value` inverts it exactly."""
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"grid value {x!r} is not finite")
    text = repr(x)
    return text[:-2] if text.endswith(".0") else text


def decode_value(text: str) -> float:
    return float(text)


# the texts encode_value writes (Snakemake wildcard constraints)
VALUE_PATTERN = r"[0-9]+(?:\.[0-9]+)?(?:e[-+][0-9]+)?"
NO_BETA = "none"


@dataclass(frozen=True, order=True)
class GridPoint:
    """One (α, β) of a method's grid; ``beta`` is None for a method without boosting."""

    alpha: float
    beta: float | None

    @property
    def name(self) -> str:
        """The point in a path: ``a{α}_b{β}`` (``b{none}`` without boosting)."""
        beta = NO_BETA if self.beta is None else encode_value(self.beta)
        return f"a{encode_value(self.alpha)}_b{beta}"

    @classmethod
    def parse(cls, name: str) -> "GridPoint":
        m = re.fullmatch(rf"a({VALUE_PATTERN})_b({VALUE_PATTERN}|{NO_BETA})", name)
        if m is None:
            raise ValueError(f"{name!r} is not a grid point name (a<alpha>_b<beta>)")
        beta = None if m.group(2) == NO_BETA else decode_value(m.group(2))
        return cls(decode_value(m.group(1)), beta)


def score_value(x: float) -> float:
    """``x`` at the precision the scores are compared and stored at (:data:`SCORE_DIGITS`)."""
    return float(f"{x:.{SCORE_DIGITS}g}")


def validation_score(accuracy: Mapping[str, float], expert_accuracy: Mapping[str, float],
                     metric: str = DEFAULT_SELECTION_METRIC) -> float:
    """The score a grid point is chosen by: the mean over tasks of the validation accuracy,
    divided by each expert's own validation accuracy (``"normalized"``, the reference's
    criterion) or not (``"absolute"``). Accuracies are taken at :data:`SCORE_DIGITS` digits
    and summed exactly (``math.fsum``), so the task order does not matter."""
    if metric not in SELECTION_METRICS:
        raise ConfigError(f"config field eval.selection_metric: {metric!r} is not one of "
                          f"{list(SELECTION_METRICS)}")
    if not accuracy:
        raise ValueError("a grid point without accuracies cannot be scored")
    if metric == "absolute":
        vals = [score_value(a) for a in accuracy.values()]
    else:
        vals = []
        for task, acc in accuracy.items():
            ref = score_value(expert_accuracy[task])
            vals.append(score_value(acc) / ref if ref > 0 else math.nan)
    return math.fsum(vals) / len(vals)


EDGE_MARK = "†"  # a chosen point on the edge of its grid (tables)


def grid_edges(point: GridPoint, grid: Iterable[GridPoint]) -> tuple[str, ...]:
    """The axes ("alpha", "beta") on which ``point`` sits at the edge of ``grid`` (the
    candidates it was chosen from): its value is the smallest or largest of two or more values
    on that axis. β = 0 is the end of β's domain (cutoff at the first singular value), not an
    edge that a wider list could move; the same holds for an α of 0 (a LiNeS β of the
    reference protocol). Empty: the point is inside the grid on every axis."""
    points = list(grid)
    edges = []
    for axis in ("alpha", "beta"):
        values = sorted({getattr(p, axis) for p in points if getattr(p, axis) is not None})
        value = getattr(point, axis)
        if value is None or len(values) < 2:
            continue
        if value == values[-1] or (value == values[0] and value > 0.0):
            edges.append(axis)
    return tuple(edges)


def choose_point(points: Iterable[tuple[GridPoint, Mapping[str, float]]],
                 expert_accuracy: Mapping[str, float],
                 metric: str = DEFAULT_SELECTION_METRIC, *, where: str = "",
                 warn_edges: bool = True) -> tuple[GridPoint, float]:
    """The (α, β) chosen on validation, with its score: the highest
    :func:`validation_score`; ties go to the smaller α, then the smaller β (no β first).
    ``points``: (grid point, validation accuracy per task). Used for the test evaluation, the
    expert-selection experiment and every table. A chosen point on the edge of the grid
    (:func:`grid_edges`) is logged as a warning (``where``: what was chosen, for the log;
    ``warn_edges=False`` for a choice over part of a grid, e.g. the best α of each β):
    the optimum may lie outside the lists."""
    points = list(points)
    best = None
    for point, accuracy in points:
        score = validation_score(accuracy, expert_accuracy, metric)
        key = (-score if score == score else math.inf, point.alpha,
               -math.inf if point.beta is None else point.beta)
        if best is None or key < best[0]:
            best = (key, point, score)
    if best is None:
        raise ValueError("no grid points to choose from")
    edges = grid_edges(best[1], (p for p, _ in points)) if warn_edges else ()
    if edges:
        log.warning(
            "%schosen point %s is on the edge of its grid (%s): widen the list%s",
            f"{where}: " if where else "", best[1].name, ", ".join(edges),
            "s" if len(edges) > 1 else "")
    return best[1], best[2]


# ------------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Boost:
    """Subspace Boosting of a method: which layers, how attention is split, and a β fixed per
    layer kind (``None``: the grid's β)."""

    layers: str = "both"
    attn_mode: str = "per_qkv"
    beta_attn: float | None = None
    beta_mlp: float | None = None

    @classmethod
    def parse(cls, cfg: Mapping | None, where: str) -> "Boost":
        cfg = dict(cfg or {})
        unknown = set(cfg) - {"layers", "attn_mode", "beta_attn", "beta_mlp"}
        if unknown:
            raise ConfigError(f"config field {where}.{sorted(unknown)[0]}: unknown boost setting")
        layers, mode = cfg.get("layers", cls.layers), cfg.get("attn_mode", cls.attn_mode)
        if layers not in BOOST_LAYERS:
            raise ConfigError(f"config field {where}.layers: {layers!r} is not one of {list(BOOST_LAYERS)}")
        if mode not in ATTN_MODES:
            raise ConfigError(f"config field {where}.attn_mode: {mode!r} is not one of {list(ATTN_MODES)}")
        fixed = {k: None if cfg.get(k) is None else
                 _finite(cfg[k], f"{where}.{k}", lo=0.0, hi=1.0, lo_open=False)
                 for k in ("beta_attn", "beta_mlp")}
        return cls(layers=layers, attn_mode=mode, **fixed)

    def betas(self, beta: float | None) -> dict[str, float | None]:
        """β per layer kind at the grid's ``beta`` (None: no boosting at all)."""
        if beta is None:
            return {"attn": None, "mlp": None}
        return {"attn": beta if self.beta_attn is None else self.beta_attn,
                "mlp": beta if self.beta_mlp is None else self.beta_mlp}

    def to_params(self) -> dict:
        out = {"layers": self.layers, "attn_mode": self.attn_mode}
        out.update({k: v for k, v in (("beta_attn", self.beta_attn), ("beta_mlp", self.beta_mlp))
                    if v is not None})
        return out


@dataclass(frozen=True)
class Lines:
    """LiNeS layer scaling: block l of L is scaled by ``scale + slope·l/(L−1)``; ``scale`` is a
    number or ``"norm"`` (the reference's ‖Σ_t τ_t‖₁ / ‖τ_merged‖₁ / T).

    ``protocol`` (:data:`LINES_PROTOCOLS`): ``"reference"`` (default; wang-kee/LiNeS
    ``src/eval/eval.py``, multi-task merging) tunes LiNeS' β (``slope``) on validation over the
    method's ``alpha`` list and merges with coefficient 1.0, so the grid's α *is* LiNeS' β and
    ``slope`` is not given; ``"fixed_slope"`` fixes ``slope`` and tunes the pipeline's α."""

    scale: float | str = LINES_NORM
    slope: float | None = 0.5
    protocol: str = "fixed_slope"

    @classmethod
    def parse(cls, cfg: Mapping | None, where: str) -> "Lines":
        cfg = dict(cfg or {})
        unknown = set(cfg) - {"scale", "slope", "protocol"}
        if unknown:
            raise ConfigError(f"config field {where}.{sorted(unknown)[0]}: unknown LiNeS setting "
                              "(LiNeS takes 'scale', 'slope' and 'protocol')")
        protocol = cfg.get("protocol", DEFAULT_LINES_PROTOCOL)
        if protocol not in LINES_PROTOCOLS:
            raise ConfigError(f"config field {where}.protocol: {protocol!r} is not one of "
                              f"{list(LINES_PROTOCOLS)}")
        scale = cfg.get("scale", cls.scale)
        if scale != LINES_NORM:
            scale = _finite(scale, f"{where}.scale", lo=0.0, lo_open=True, hi=None)
        if protocol == "reference":
            if cfg.get("slope") is not None:
                raise ConfigError(f"config field {where}.slope: the reference protocol tunes "
                                  "LiNeS' β on the method's alpha list; remove 'slope' or set "
                                  "protocol: fixed_slope")
            return cls(scale=scale, slope=None, protocol=protocol)
        slope = _finite(cfg.get("slope", cls.slope), f"{where}.slope", lo=0.0, lo_open=False, hi=None)
        return cls(scale=scale, slope=slope, protocol=protocol)

    @property
    def tunes_slope(self) -> bool:
        """The reference protocol: the grid's α is LiNeS' β, the merge coefficient 1.0."""
        return self.protocol == "reference"

    def to_params(self) -> dict:
        if self.tunes_slope:
            return {"scale": self.scale, "protocol": self.protocol}
        return {"scale": self.scale, "slope": self.slope, "protocol": self.protocol}


@dataclass(frozen=True)
class Method:
    """A named method of the config: a merge function with its hyperparameters (config
    names, defaults filled in), then LiNeS, then Subspace Boosting, each optional."""

    name: str
    merge: str
    hyper: Mapping[str, Any] = field(default_factory=dict)
    lines: Lines | None = None
    boost: Boost | None = None
    alphas: tuple[float, ...] = ()
    betas: tuple[float | None, ...] = (None,)
    groups: tuple[str, ...] = ()
    label: str = ""

    @property
    def spec(self) -> merges.MergeSpec:
        return merges.get(self.merge, f"methods.{self.name}.merge")

    @property
    def boosted(self) -> bool:
        return self.boost is not None

    @property
    def needs(self) -> tuple[str, ...]:
        """Extra inputs of the merge (:data:`submerge.merges.EXTRA_INPUTS`)."""
        return self.spec.needs

    def grid(self) -> list[GridPoint]:
        """Every (α, β) of the method, α outer, in config order."""
        return [GridPoint(a, b) for a in self.alphas for b in self.betas]

    def merge_kwargs(self) -> dict[str, Any]:
        return self.spec.kwargs(dict(self.hyper))

    def without_boost(self) -> tuple:
        """What identifies the method apart from boosting and its label (a boosted method is
        compared against the unboosted method with the same settings)."""
        return (self.merge, tuple(sorted(self.hyper.items())), self.lines)

    def to_params(self) -> dict:
        """What determines the method's Δ_merge (its merged cache): not its grid, groups or
        label, so that adding a grid point or a group leaves the merged caches alone."""
        out: dict[str, Any] = {"name": self.name, "merge": self.merge, "hyper": dict(self.hyper)}
        if self.lines is not None:
            out["lines"] = self.lines.to_params()
        if self.boost is not None:
            out["boost"] = self.boost.to_params()
        return out

    @classmethod
    def from_params(cls, params: Mapping) -> "Method":
        where = f"methods.{params['name']}"
        return cls(name=params["name"], merge=params["merge"], hyper=dict(params.get("hyper", {})),
                   lines=None if "lines" not in params else Lines.parse(params["lines"], f"{where}.lines"),
                   boost=None if "boost" not in params else Boost.parse(params["boost"], f"{where}.boost"))


_METHOD_KEYS = ("merge", "label", "groups", "lines", "boost", "alpha", "beta")


def _values(values: Any, where: str, *, beta: bool) -> tuple[float, ...]:
    if not isinstance(values, (list, tuple)) or not values:
        raise ConfigError(f"config field {where}: must be a non-empty list of numbers")
    out = []
    for i, v in enumerate(values):
        if beta:
            out.append(_finite(v, f"{where}[{i}]", lo=0.0, hi=1.0, lo_open=False))
        else:
            out.append(_finite(v, f"{where}[{i}]", lo=0.0, hi=None, lo_open=True))
    if len(set(out)) != len(out):
        raise ConfigError(f"config field {where}: repeated value {next(v for v in out if out.count(v) > 1)!r}")
    return tuple(out)


def parse_method(name: str, cfg: Mapping, grid: Mapping, groups: Sequence[str]) -> Method:
    where = f"methods.{check_name(name, 'methods')}"
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"config field {where}: expected a mapping")
    if "merge" not in cfg:
        raise ConfigError(f"config field {where}.merge: required (one of {sorted(merges.MERGES)})")
    spec = merges.get(cfg["merge"], f"{where}.merge")
    hyper = spec.check_hyper({k: v for k, v in cfg.items() if k not in _METHOD_KEYS}, where)
    boosted = "boost" in cfg  # `boost: {}` (or null) boosts with the defaults
    if "beta" in cfg and not boosted:
        raise ConfigError(f"config field {where}.beta: a β list on a method without 'boost' "
                          "would be ignored; remove it or add boost: {}")
    method_groups = tuple(cfg.get("groups", groups))
    for i, g in enumerate(method_groups):
        if g not in groups:
            raise ConfigError(f"config field {where}.groups[{i}]: unknown group {g!r}")
    lines = Lines.parse(cfg["lines"], f"{where}.lines") if "lines" in cfg else None
    boost = Boost.parse(cfg["boost"], f"{where}.boost") if boosted else None
    if lines is not None and lines.tunes_slope:  # the α axis is LiNeS' β
        alphas = _values(cfg.get("alpha", list(DEFAULT_LINES_SLOPES)), f"{where}.alpha",
                         beta=False)
    else:
        alphas = _values(cfg.get("alpha", grid["alpha"]),
                         f"{where}.alpha" if "alpha" in cfg else "grid.alpha", beta=False)
    betas: tuple[float | None, ...] = (None,)
    if boosted:
        betas = _values(cfg.get("beta", grid["beta"]), f"{where}.beta" if "beta" in cfg else "grid.beta",
                        beta=True)
    label = cfg.get("label") or auto_label(spec, lines is not None, boosted)
    return Method(name=name, merge=spec.name, hyper=hyper, lines=lines, boost=boost, alphas=alphas,
                  betas=betas, groups=method_groups, label=str(label))


def auto_label(spec: merges.MergeSpec, lines: bool, boosted: bool) -> str:
    """"TA + LiNeS + SB": the merge function's label with the steps applied after it."""
    return spec.label + (" + LiNeS" if lines else "") + (" + SB" if boosted else "")


# --------------------------------------------------------------------------------- suite


@dataclass(frozen=True)
class Suite:
    """One base model and its experts. ``view`` is the plain config of the suite (every key
    that is not a workflow key), restricted to the experts a job depends on; data loaders read
    it as it is."""

    name: str
    adapter: str
    view: Mapping[str, Any]

    @property
    def root(self) -> Path:
        return Path("results") / self.name

    @property
    def experts(self) -> Mapping[str, Mapping]:
        return self.view.get("experts", {})

    @property
    def base(self) -> Mapping:
        return self.view["base"]

    @property
    def arch(self) -> dict:
        """The architecture the adapter builds: ``arch`` from the config, else the digits
        default (digits suites)."""
        if self.view.get("arch"):
            return dict(self.view["arch"])
        if is_digits(self.base):
            from submerge.suites.digits_config import resolve_config

            return dict(resolve_config(self.view.get("digits"))["arch"])
        raise ConfigError("config field arch: required for suites whose base is downloaded")

    @classmethod
    def from_params(cls, view: Mapping) -> "Suite":
        return cls(name=view["suite"], adapter=view["adapter"], view=dict(view))


def is_digits(spec: Mapping) -> bool:
    """A model spec built by the embedded digits suite (``build: digits``)."""
    return spec.get("build") == "digits"


# ------------------------------------------------------------------------ other settings


@dataclass(frozen=True)
class EvalSettings:
    """How models are evaluated. Only ``max_*_examples`` change accuracies and only
    ``selection_metric`` changes which point is chosen; ``batch_size`` and ``device`` change
    neither, so they are not job params (a job reads them from the config: no rerun when they
    change). ``points_per_job`` splits each (group, method)'s grid into jobs of that many points
    (None: one job per (group, method))."""

    batch_size: int = DEFAULT_BATCH_SIZE
    max_val_examples: int | None = None
    max_test_examples: int | None = None
    selection_metric: str = DEFAULT_SELECTION_METRIC
    device: str = "auto"
    points_per_job: int | None = None

    def max_examples(self, split: str) -> int | None:
        return self.max_val_examples if split == "val" else self.max_test_examples

    def to_params(self, *, choice: bool = False) -> dict:
        """What changes a job's results: the example caps, and the metric for a job that
        chooses a grid point (``choice``)."""
        out = {"max_val_examples": self.max_val_examples,
               "max_test_examples": self.max_test_examples}
        if choice:
            out["selection_metric"] = self.selection_metric
        return out

    @classmethod
    def from_params(cls, params: Mapping, config: Mapping | None = None) -> "EvalSettings":
        """Settings from a job's params and the run's config (batch size and device)."""
        return cls(**params, **runtime_settings(config or {}))


def runtime_settings(cfg: Mapping) -> dict:
    """The evaluation settings that change no result: ``eval.batch_size`` and ``device``."""
    return {"batch_size": (cfg.get("eval") or {}).get("batch_size", DEFAULT_BATCH_SIZE),
            "device": cfg.get("device", "auto")}


@dataclass(frozen=True)
class SelectionExperiment:
    """Expert selection (paper Tables 5/10): ``n_select`` candidates of ``universe`` picked
    next to the ``pool`` by the HO-GSVD alignment (``strategy``) vs ``draws`` random picks;
    ``ext`` experts are held out (scored, never merged)."""

    universe: str
    pool: tuple[str, ...]
    ext: tuple[str, ...]
    n_select: int
    method: str
    draws: int = 10
    seed: int = 0
    strategy: str = "greedy"
    # weight of the alignment among the chosen candidates in the objective; 0: alignment with
    # the pool only, the paper's Table 5 wording ("minimize interference with the Pool")
    within_weight: float = 0.0

    def runs(self) -> list[str]:
        """One job each: ``hogsvd-0`` (the HO-GSVD choice), then ``random-0`` … ``random-<draws-1>``."""
        return ["hogsvd-0"] + [f"random-{d}" for d in range(self.draws)]

    def parse_run(self, run: str) -> tuple[str, int]:
        setting, _, draw = run.partition("-")
        if run not in self.runs():
            raise ValueError(f"{run!r} is not a run of the selection experiment ({self.runs()})")
        return setting, int(draw)

    def to_params(self) -> dict:
        return {"universe": self.universe, "pool": list(self.pool), "ext": list(self.ext),
                "n_select": self.n_select, "method": self.method, "draws": self.draws,
                "seed": self.seed, "strategy": self.strategy, "within_weight": self.within_weight}

    @classmethod
    def from_params(cls, params: Mapping) -> "SelectionExperiment":
        return cls(**{**params, "pool": tuple(params["pool"]), "ext": tuple(params["ext"])})


DEFAULT_TABLE8_BETAS = (0.0, 0.1, 0.2)  # per layer kind, when experiments.table8 gives none


@dataclass(frozen=True)
class Table8Experiment:
    """Paper Table 8: a β_attn × β_mlp grid of one boosted ``method`` on one ``group`` (default
    the largest), each pair's α chosen on validation among ``alphas`` (default the method's),
    the pair chosen on validation, every pair reported on test at its α. The SVD factors of the
    method's merged cache are reused: only the cutoff changes with β."""

    method: str
    group: str
    beta_attn: tuple[float, ...] = DEFAULT_TABLE8_BETAS
    beta_mlp: tuple[float, ...] = DEFAULT_TABLE8_BETAS
    alphas: tuple[float, ...] = ()

    def pairs(self) -> list[tuple[float, float]]:
        """(β_attn, β_mlp), β_mlp outer (the paper's row order: FC layers, then attention)."""
        return [(a, m) for m in self.beta_mlp for a in self.beta_attn]

    def to_params(self) -> dict:
        return {"method": self.method, "group": self.group, "beta_attn": list(self.beta_attn),
                "beta_mlp": list(self.beta_mlp), "alphas": list(self.alphas)}

    @classmethod
    def from_params(cls, params: Mapping) -> "Table8Experiment":
        return cls(method=params["method"], group=params["group"],
                   beta_attn=tuple(params["beta_attn"]), beta_mlp=tuple(params["beta_mlp"]),
                   alphas=tuple(params["alphas"]))


def _parse_table8(cfg: Mapping, groups: Mapping[str, Sequence[str]],
                  methods: Mapping[str, Method]) -> Table8Experiment | None:
    t8 = (cfg.get("experiments") or {}).get("table8")
    if not t8:
        return None
    where = "experiments.table8"
    if not isinstance(t8, Mapping):
        raise ConfigError(f"config field {where}: expected a mapping")
    unknown = set(t8) - {"method", "group", "beta_attn", "beta_mlp", "alpha"}
    if unknown:
        raise ConfigError(f"config field {where}.{sorted(unknown)[0]}: unknown setting (Table 8 "
                          "takes method, group, beta_attn, beta_mlp, alpha)")
    name = t8.get("method")
    if name not in methods:
        raise ConfigError(f"config field {where}.method: unknown method {name!r} "
                          f"(known: {', '.join(methods)})")
    method = methods[name]
    if method.boost is None or method.boost.layers != "both" or method.boost.attn_mode == "none":
        raise ConfigError(f"config field {where}.method: {name!r} must boost both layer kinds "
                          "(boost: {layers: both} and attn_mode per_qkv or full)")
    if method.boost.beta_attn is not None or method.boost.beta_mlp is not None:
        raise ConfigError(f"config field {where}.method: {name!r} fixes a kind's β "
                          "(boost.beta_attn / beta_mlp); Table 8 sets both")
    largest = largest_group(groups)
    group = t8.get("group", largest)
    if group not in groups:
        raise ConfigError(f"config field {where}.group: unknown group {group!r}")
    if group not in method.groups:
        raise ConfigError(f"config field {where}.group: method {name!r} does not run on group "
                          f"{group!r} (its merged cache is reused; add the group to its groups)")
    betas = {k: _values(t8.get(k, list(DEFAULT_TABLE8_BETAS)), f"{where}.{k}", beta=True)
             for k in ("beta_attn", "beta_mlp")}
    alphas = (_values(t8["alpha"], f"{where}.alpha", beta=False) if "alpha" in t8
              else method.alphas)
    return Table8Experiment(method=name, group=group, alphas=alphas, **betas)


@dataclass(frozen=True)
class HOGSVDSettings:
    pi: float = DEFAULT_HOGSVD_PI
    layers: str = "both"


# -------------------------------------------------------------------------------- recipe


@dataclass(frozen=True)
class Recipe:
    suite: Suite
    groups: Mapping[str, tuple[str, ...]]
    methods: Mapping[str, Method]
    eval: EvalSettings
    selection: SelectionExperiment | None
    consensus_lambdas: tuple[float, ...]
    hogsvd: HOGSVDSettings
    gpu: bool = True
    save_merged: bool = False
    warm_worker: bool = True   # local runs: jobs start in a preloaded process (submerge.worker)
    export: tuple[tuple[str, str], ...] = ()  # (group, method) pairs exported (parse_export)
    table8: Table8Experiment | None = None

    @property
    def experts(self) -> list[str]:
        return list(self.suite.experts)

    def members(self, group: str) -> list[str]:
        return list(self.groups[group])

    def pairs(self) -> list[tuple[str, str]]:
        """Every (group, method) that is merged and evaluated, groups outer."""
        return [(g, m) for g in self.groups for m, meth in self.methods.items() if g in meth.groups]

    def largest_group(self) -> str:
        return largest_group(self.groups)

    def suite_view(self, experts: Iterable[str] = ()) -> dict:
        """The suite's config restricted to ``experts`` (a job's params: adding an expert
        must not make the other experts' jobs stale)."""
        view = {k: v for k, v in self.suite.view.items() if k != "experts"}
        view["experts"] = {e: self.suite.experts[e] for e in experts}
        return view


def check_schema(cfg: Mapping, schema_path: str | Path) -> None:
    """ConfigError naming the first config field that breaks the JSON schema and the one rule
    it broke (not the whole schema)."""
    import jsonschema
    import yaml

    schema = yaml.safe_load(Path(schema_path).read_text(encoding="utf-8"))
    validator = jsonschema.validators.validator_for(schema)(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(cfg))
    if error is None:
        return
    field = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    rule = f"{error.validator}: {error.validator_value!r}"
    raise ConfigError(f"config field {field}: {error.message[:300]} (schema rule {rule[:120]}; "
                      f"{Path(schema_path).name})")


def parse_config(cfg: Mapping) -> Recipe:
    """The recipe of a config that passed the JSON schema; ConfigError naming the field for
    everything the schema cannot say."""
    suite_name = check_name(cfg.get("suite"), "suite")
    experts = cfg["experts"]
    for name, spec in experts.items():
        check_name(name, "experts")
        if ("build" in spec) == ("source" in spec):
            raise ConfigError(f"config field experts.{name}: give exactly one of 'build' or 'source'")
        if is_digits(spec):
            from submerge.suites.digits_config import TASK_NAMES

            if "task" not in spec:
                raise ConfigError(f"config field experts.{name}.task: a digits expert needs 'task'")
            if spec["task"] not in TASK_NAMES:
                raise ConfigError(f"config field experts.{name}.task: unknown digits task "
                                  f"{spec['task']!r} (known: {', '.join(TASK_NAMES)})")
        else:
            _check_downloaded_expert(cfg, name, spec)
    groups: dict[str, tuple[str, ...]] = {}
    for group, members in cfg["groups"].items():
        check_name(group, "groups")
        for i, member in enumerate(members):
            if member not in experts:
                raise ConfigError(f"config field groups.{group}[{i}]: unknown expert {member!r} "
                                  f"(known: {', '.join(sorted(experts))})")
        # a group is a set: its members in the suite's expert order, whatever order it lists
        order = list(experts)
        groups[group] = tuple(sorted(members, key=order.index))
    methods = {name: parse_method(name, m, cfg["grid"], list(groups))
               for name, m in cfg["methods"].items()}
    ev = dict(cfg.get("eval") or {})
    eval_settings = EvalSettings(
        max_val_examples=ev.get("max_val_examples"), max_test_examples=ev.get("max_test_examples"),
        selection_metric=ev.get("selection_metric", DEFAULT_SELECTION_METRIC),
        points_per_job=ev.get("points_per_job"), **runtime_settings(cfg))
    if eval_settings.selection_metric not in SELECTION_METRICS:
        raise ConfigError(f"config field eval.selection_metric: {eval_settings.selection_metric!r} "
                          f"is not one of {list(SELECTION_METRICS)}")
    selection = _parse_selection(cfg, groups, methods)
    lambdas = _values(cfg.get("consensus_lambdas", DEFAULT_CONSENSUS_LAMBDAS), "consensus_lambdas",
                      beta=False)
    hog = dict(cfg.get("hogsvd") or {})
    hogsvd = HOGSVDSettings(pi=_finite(hog.get("pi", DEFAULT_HOGSVD_PI), "hogsvd.pi", lo=0.0,
                                       lo_open=False, hi=None),
                            layers=hog.get("layers", "both"))
    suite_view = {k: v for k, v in cfg.items() if k not in WORKFLOW_KEYS}
    return Recipe(suite=Suite(name=suite_name, adapter=cfg["adapter"], view=suite_view),
                  groups=groups, methods=methods, eval=eval_settings, selection=selection,
                  consensus_lambdas=lambdas, hogsvd=hogsvd, gpu=bool(cfg.get("gpu", True)),
                  save_merged=bool(cfg.get("save_merged", False)),
                  warm_worker=bool(cfg.get("warm_worker", True)),
                  export=parse_export(cfg.get("export"), groups, methods),
                  table8=_parse_table8(cfg, groups, methods))


def _check_downloaded_expert(cfg: Mapping, name: str, spec: Mapping) -> None:
    """What a downloaded expert needs before anything is downloaded: its evaluation data, its
    head, and for a zero-shot head the suite's full CLIP."""
    where = f"config field experts.{name}"
    dataset = spec.get("dataset")
    if not isinstance(dataset, Mapping):
        raise ConfigError(f"{where}.dataset: required for downloaded experts (the evaluation "
                          "data: {hub: <dataset id>} or {path: <saved DatasetDict>}, see "
                          "src/submerge/data/vision.py)")
    if (dataset.get("hub") is None) == (dataset.get("path") is None):
        raise ConfigError(f"{where}.dataset: give exactly one of 'hub' and 'path'")
    if dataset.get("kind", "image") == "text":
        if dataset.get("prompt") is not None:  # the template file exists and is well formed
            from submerge.data.prompts import load_prompts

            load_prompts(dataset["prompt"], f"{where}.dataset.prompt")
        return  # scored by the language model itself: no head
    head = spec.get("head")
    if not isinstance(head, Mapping) or not ("source" in head or head.get("zeroshot")):
        raise ConfigError(f"{where}.head: required for image experts ({{source: ...}} or "
                          "{zeroshot: true})")
    if head.get("zeroshot") and "zeroshot_model" not in cfg:
        raise ConfigError(f"config field zeroshot_model: required by {where[13:]}.head.zeroshot "
                          "(a full CLIP checkpoint with its text tower)")


def _parse_selection(cfg: Mapping, groups: Mapping, methods: Mapping[str, Method]):
    sel = (cfg.get("experiments") or {}).get("selection")
    if not sel:
        return None
    where = "config field experiments.selection"
    if sel["universe"] not in groups:
        raise ConfigError(f"{where}.universe: unknown group {sel['universe']!r}")
    if sel["method"] not in methods:
        raise ConfigError(f"{where}.method: unknown method {sel['method']!r}")
    if methods[sel["method"]].needs:
        raise ConfigError(f"{where}.method: {sel['method']!r} needs {list(methods[sel['method']].needs)} "
                          "per selection; use a method whose merge needs no extra inputs")
    universe = groups[sel["universe"]]
    for field_name in ("pool", "ext"):
        for e in sel.get(field_name, []):
            if e not in universe:
                raise ConfigError(f"{where}.{field_name}: {e!r} is not in group {sel['universe']!r}")
    n_cand = len(universe) - len(sel["pool"]) - len(sel.get("ext", []))
    if sel["n_select"] > n_cand:
        raise ConfigError(f"{where}.n_select: {sel['n_select']} > number of candidates ({n_cand})")
    return SelectionExperiment(universe=sel["universe"], pool=tuple(sel["pool"]),
                               ext=tuple(sel.get("ext", [])), n_select=int(sel["n_select"]),
                               method=sel["method"], draws=int(sel.get("draws", 10)),
                               seed=int(sel.get("seed", 0)), strategy=sel.get("strategy", "greedy"),
                               within_weight=_finite(sel.get("within_weight", 0.0),
                                                     "experiments.selection.within_weight",
                                                     lo=0.0, lo_open=False, hi=None))


# -------------------------------------------------------------------------------- export

EXPORT_KEYWORDS = ("default", "all", "none")


def largest_group(groups: Mapping[str, Sequence[str]]) -> str:
    """The group with the most experts (the first listed among equally large ones)."""
    return max(groups, key=lambda g: len(groups[g]))


def parse_export(value: Any, groups: Mapping[str, Sequence[str]],
                 methods: Mapping[str, Method]) -> tuple[tuple[str, str], ...]:
    """The (group, method) pairs whose merged model is exported (config field ``export``):

    * absent or ``default``: every boosted method of the largest group (the first listed
      among equally large ones);
    * ``all``: every (group, method) that is merged; ``none`` (or ``[]``): nothing;
    * a list of ``group/method`` or method names; a bare method name is that method on the
      largest group it is merged on.

    ConfigError naming ``config field export`` for anything else."""
    pairs = [(g, m) for g in groups for m, meth in methods.items() if g in meth.groups]
    if value is None or value == "default":
        if not groups:
            return ()
        largest = largest_group(groups)
        return tuple((g, m) for g, m in pairs if g == largest and methods[m].boosted)
    if value == "all":
        return tuple(pairs)
    if value == "none":
        return ()
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"config field export: {value!r} is not one of {list(EXPORT_KEYWORDS)} "
                          "or a list of 'group/method' or method names")
    out: list[tuple[str, str]] = []
    for i, item in enumerate(value):
        where = f"config field export[{i}]"
        if not isinstance(item, str):
            raise ConfigError(f"{where}: {item!r} is not a 'group/method' or method name")
        group, _, method = item.rpartition("/")
        if method not in methods:
            raise ConfigError(f"{where}: unknown method {method!r} (known: {', '.join(methods)})")
        if group:
            if group not in groups:
                raise ConfigError(f"{where}: unknown group {group!r} (known: {', '.join(groups)})")
            if group not in methods[method].groups:
                raise ConfigError(f"{where}: method {method!r} is not merged on group {group!r} "
                                  f"(its groups: {', '.join(methods[method].groups)})")
        else:
            if not methods[method].groups:
                raise ConfigError(f"{where}: method {method!r} is merged on no group")
            group = largest_group({g: groups[g] for g in methods[method].groups})
        if (group, method) not in out:
            out.append((group, method))
    return tuple(out)


# ------------------------------------------------------- merge recipes (submerge merge CLI)

DIAGNOSE_BETA = 0.01  # β of `submerge diagnose` when none is given
MERGE_RECIPE_KEYS = ("adapter", "arch", "base", "experts", "method", "alpha", "beta", "device",
                     "output")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
_SOURCE_KEYS = ("path", "hub", "url")


def parse_source_text(text: str, where: str) -> dict:
    """A checkpoint source (``io.download.fetch``'s mapping) from its command-line text:
    ``https://...`` (a URL), a local path (an existing file; a directory: its
    ``model.safetensors``, ``open_clip_model.safetensors`` or ``pytorch_model.bin``), or a hub
    file ``org/name[:file][@revision]`` (default file ``model.safetensors``); any of them
    followed by ``#sha256=<hex>`` pins its sha256."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"config field {where}: expected a checkpoint path, hub id or URL, "
                          f"got {text!r}")
    text, _, pin = text.strip().partition("#")
    source: dict[str, Any] = {}
    if pin:
        m = re.fullmatch(r"sha256=([0-9a-fA-F]{64})", pin)
        if m is None:
            raise ConfigError(f"config field {where}: {pin!r} is not 'sha256=<64 hex digits>'")
        source["sha256"] = m.group(1).lower()
    local = Path(text).expanduser()
    if re.match(r"https?://", text):
        source["url"] = text
    elif local.exists() or text.startswith(("/", ".", "~")) or re.search(r"\.(safetensors|bin|pt|pth)$", text):
        if local.is_dir():
            found = [local / n for n in ("model.safetensors", "open_clip_model.safetensors",
                                         "pytorch_model.bin") if (local / n).is_file()]
            if not found:
                raise ConfigError(f"config field {where}: directory {local} has no "
                                  "model.safetensors, open_clip_model.safetensors or pytorch_model.bin")
            local = found[0]
        source["path"] = str(local)
    else:
        m = re.fullmatch(r"([\w.-]+/[\w.-]+)(?::([^@]+))?(?:@(.+))?", text)
        if m is None:
            raise ConfigError(f"config field {where}: {text!r} is neither an existing file, a URL "
                              "nor a hub id org/name[:file][@revision]")
        source["hub"] = {"repo": m.group(1), "file": m.group(2) or "model.safetensors"}
        if m.group(3):
            source["hub"]["revision"] = m.group(3)
    return source


def _model_spec(value: Any, where: str) -> dict:
    """``{"source": {...}, "trust_pickle": bool}`` (the pipeline's checkpoint spec) from a
    source text or a mapping (``{source: ..., trust_pickle: ...}`` or the source itself)."""
    if isinstance(value, str):
        return {"source": parse_source_text(value, where)}
    if not isinstance(value, Mapping):
        raise ConfigError(f"config field {where}: expected a checkpoint path, hub id, URL or "
                          f"{{source: ...}}, got {value!r}")
    spec = dict(value) if "source" in value else {"source": dict(value)}
    unknown = set(spec) - {"source", "trust_pickle"}
    if unknown:
        raise ConfigError(f"config field {where}.{sorted(unknown)[0]}: unknown checkpoint field "
                          "(a checkpoint has 'source' and 'trust_pickle')")
    if isinstance(spec["source"], str):
        spec["source"] = parse_source_text(spec["source"], f"{where}.source")
    source = spec["source"]
    if not isinstance(source, Mapping) or sum(k in source for k in _SOURCE_KEYS) != 1:
        raise ConfigError(f"config field {where}.source: needs exactly one of {list(_SOURCE_KEYS)}")
    spec["trust_pickle"] = bool(spec.get("trust_pickle", False))
    return spec


def _expert_name(spec: Mapping) -> str:
    source = spec["source"]
    if "path" in source:
        path = Path(source["path"])
        stem = path.stem if path.stem not in ("model", "pytorch_model", "open_clip_model") else path.parent.name
    elif "hub" in source:
        stem = source["hub"]["repo"].split("/")[-1]
    else:
        stem = Path(source["url"].split("?")[0]).stem
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem) or "expert"


@dataclass(frozen=True)
class MergeRecipe:
    """What ``submerge merge`` / ``submerge diagnose`` merge: a base and experts (checkpoint
    specs as the pipeline's ``{source, trust_pickle}``), one :class:`Method` (merge function,
    hyperparameters, LiNeS, boosting), α and β. Given as a YAML file or as flags, both parsed
    by :func:`parse_merge_recipe`. ``adapter``/``arch`` None: read from the base (a
    normalised checkpoint's sidecar, or an HF ``config.json``)."""

    base: Mapping
    experts: Mapping[str, Mapping]
    method: Method
    alpha: float | None
    beta: float | None
    adapter: str | None = None
    arch: Mapping | None = None
    device: str = "auto"
    output: str | None = None


def parse_merge_recipe(cfg: Mapping, *, need_alpha: bool = True) -> MergeRecipe:
    """The :class:`MergeRecipe` of a merge recipe mapping (keys :data:`MERGE_RECIPE_KEYS`);
    ConfigError naming the field otherwise. ``method`` is a merge function name or a
    method as in a pipeline config (``{merge: ties, top_k_percent: 20, lines: {...},
    boost: {...}}``, parsed by :func:`parse_method`); ``experts`` a mapping name -> checkpoint
    or a list of checkpoints (named after their files); ``beta`` is required when the
    method boosts (unless ``boost`` fixes both ``beta_attn`` and ``beta_mlp``)."""
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"merge recipe: expected a mapping of {list(MERGE_RECIPE_KEYS)}, got {cfg!r}")
    for key in cfg:
        if key not in MERGE_RECIPE_KEYS:
            raise ConfigError(f"config field {key}: unknown (a merge recipe has {list(MERGE_RECIPE_KEYS)})")
    for key in ("base", "experts", "method"):
        if cfg.get(key) in (None, "", [], {}):
            raise ConfigError(f"config field {key}: required")
    base = _model_spec(cfg["base"], "base")
    raw_experts = cfg["experts"]
    experts: dict[str, dict] = {}
    if isinstance(raw_experts, Mapping):
        for name, value in raw_experts.items():
            experts[check_name(name, "experts")] = _model_spec(value, f"experts.{name}")
    elif isinstance(raw_experts, (list, tuple)):
        for i, value in enumerate(raw_experts):
            spec = _model_spec(value, f"experts[{i}]")
            name, n = _expert_name(spec), 2
            while name in experts:
                name, n = f"{_expert_name(spec)}-{n}", n + 1
            experts[name] = spec
    else:
        raise ConfigError("config field experts: expected a list of checkpoints or a mapping "
                          "name -> checkpoint")
    method_cfg = cfg["method"]
    method_cfg = {"merge": method_cfg} if isinstance(method_cfg, str) else method_cfg
    if not isinstance(method_cfg, Mapping):
        raise ConfigError(f"config field method: expected a merge function name or a mapping, "
                          f"got {method_cfg!r}")
    bad = [k for k in ("alpha", "beta", "groups", "label") if k in method_cfg]
    if bad:
        raise ConfigError(f"config field method.{bad[0]}: not part of a merge recipe's method "
                          f"(give {bad[0]} at the top level)" if bad[0] in ("alpha", "beta")
                          else f"config field method.{bad[0]}: not part of a merge recipe")
    alpha = cfg.get("alpha")
    if alpha is None:
        if need_alpha:
            raise ConfigError("config field alpha: required (the scale of the merged task vector)")
    else:
        alpha = _finite(alpha, "alpha", lo=0.0, lo_open=True, hi=None)
    beta = cfg.get("beta")
    boosted = "boost" in method_cfg
    if beta is not None:
        if not boosted:
            raise ConfigError("config field beta: given without Subspace Boosting (method.boost)")
        beta = _finite(beta, "beta", lo=0.0, hi=1.0, lo_open=False)
    grid = {"alpha": [alpha if alpha is not None else 1.0], "beta": [0.0 if beta is None else beta]}
    try:
        method = parse_method("merge", dict(method_cfg), grid, [])
    except ConfigError as exc:  # parse_method names pipeline fields: methods.<name>.<field>
        raise ConfigError(str(exc).replace("config field methods.merge", "config field method", 1)
                          .replace("config field grid.", "config field ", 1)) from None
    if boosted and beta is None:
        if method.boost.beta_attn is None or method.boost.beta_mlp is None:
            raise ConfigError("config field beta: required with Subspace Boosting (method.boost), "
                              "unless boost.beta_attn and boost.beta_mlp are both given")
        beta = 0.0  # both layer kinds take their fixed β (Boost.betas)
    adapter = cfg.get("adapter")
    if adapter is not None and not isinstance(adapter, str):
        raise ConfigError(f"config field adapter: expected an adapter name, got {adapter!r}")
    arch = cfg.get("arch")
    if isinstance(arch, str):
        arch = {"model": arch}  # an open_clip model config name
    elif arch is not None and not isinstance(arch, Mapping):
        raise ConfigError(f"config field arch: expected an open_clip model name or a mapping, got {arch!r}")
    device = cfg.get("device", "auto")
    if not isinstance(device, str) or DEVICE_PATTERN.fullmatch(device) is None:
        raise ConfigError(f"config field device: {device!r} is not auto, cpu or cuda[:N]")
    output = cfg.get("output")
    if output is not None and not isinstance(output, str):
        raise ConfigError(f"config field output: expected a directory path, got {output!r}")
    return MergeRecipe(base=base, experts=experts, method=method, alpha=alpha, beta=beta,
                       adapter=adapter, arch=None if arch is None else dict(arch), device=device,
                       output=output)
