"""What the config layer needs of the embedded ``digits`` suite, without importing torch.

:data:`DEFAULTS` (the ``digits:`` block's defaults), :data:`GRID` (the (α, β) grid the suite
is tuned for), :func:`resolve_config` (the block merged over the defaults, checked),
:data:`TASK_NAMES` (the 20 tasks in order; :data:`GROUPS` are prefixes of it) and
:data:`N_IMAGES`. :mod:`submerge.suites.digits` (data, model, training; imports torch)
re-exports them and checks at import that its ``TASKS`` are :data:`TASK_NAMES`, in order.
"""

from __future__ import annotations

import copy
from typing import Mapping

from submerge.errors import ConfigError

N_IMAGES = 1797   # sklearn's bundled digits

# The task order: every group is a prefix of it (like the paper's 8 / 14 / 20 tasks).
TASK_NAMES: tuple[str, ...] = (
    "rot90", "parity", "invert", "flip_lr", "blur", "mod3", "permute", "shift", "rot180", "ge5",
    "noise", "transpose", "crop", "prime", "rot270", "flip_ud", "digit", "mod4", "pixelate", "occlude",
)

GROUPS: dict[str, list[str]] = {f"n{n}": list(TASK_NAMES[:n]) for n in (4, 8, 14, 20)}

DEFAULTS: dict = {
    "seed": 0,
    # open_clip VisionTransformer(**arch); the keys are exactly its constructor arguments.
    # A 16-d output keeps the frozen linear-probe heads of the base well below the experts.
    "arch": {"image_size": 8, "patch_size": 4, "width": 64, "layers": 4, "heads": 4,
             "mlp_ratio": 4.0, "output_dim": 16},
    "n_val": 300,            # validation images per task (the same images for every task)
    "n_test": 400,           # test images per task
    "n_train": None,         # cap on training images per task (None: all the rest, 1097)
    "batch_size": 64,
    "base_epochs": 1,        # short generic pretraining (10-way digits, upright images): the
    "base_lr": 1e-3,         #   experts then share directions, and the merge collapses in rank
    "head_steps": 200,       # full-batch Adam steps of the linear probe on frozen features
    "head_lr": 1e-2,
    "expert_epochs": 5,
    "expert_lr": 1e-4,
    "weight_decay": 0.01,
}

# The merge grid this suite is tuned for (bench/digits.md). With 64-wide layers the top
# singular value of a merged task vector holds 8-25% of sum(S) in every boosted matrix, so
# the paper's beta in {0, 0.01, 0.02} all flatten the spectrum fully (cutoff index 0);
# larger beta keep the head of the spectrum. alpha reaches 1/N-scale values for the 20-task sum.
GRID: dict[str, list[float]] = {
    "alpha": [0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 1.0],
    "beta": [0.0, 0.1, 0.2, 0.4],
}

_INT_KEYS = {"seed": 0, "n_val": 1, "n_test": 1, "batch_size": 1, "base_epochs": 0,
             "head_steps": 0, "expert_epochs": 0}   # key -> smallest allowed value
_FLOAT_KEYS = ("base_lr", "head_lr", "expert_lr", "weight_decay")
_ARCH_INT_KEYS = ("image_size", "patch_size", "width", "layers", "heads", "output_dim")


def resolve_config(cfg: Mapping | None = None) -> dict:
    """The ``digits:`` block merged over :data:`DEFAULTS` (``arch`` merged key by key), checked."""
    cfg = {} if cfg is None else cfg
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"digits: expected a mapping, got {type(cfg).__name__}")
    out = copy.deepcopy(DEFAULTS)
    for key, value in cfg.items():
        if key not in DEFAULTS:
            raise ConfigError(f"digits.{key}: unknown key (known: {', '.join(DEFAULTS)})")
        if key == "arch":
            if not isinstance(value, Mapping):
                raise ConfigError("digits.arch: expected a mapping")
            for akey, avalue in value.items():
                if akey not in DEFAULTS["arch"]:
                    raise ConfigError(f"digits.arch.{akey}: unknown key "
                                      f"(known: {', '.join(DEFAULTS['arch'])})")
                out["arch"][akey] = avalue
        else:
            out[key] = value
    for key, low in _INT_KEYS.items():
        if isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < low:
            raise ConfigError(f"digits.{key}: expected an integer >= {low}, got {out[key]!r}")
    if out["n_train"] is not None and (isinstance(out["n_train"], bool)
                                       or not isinstance(out["n_train"], int) or out["n_train"] < 1):
        raise ConfigError(f"digits.n_train: expected a positive integer or null, got {out['n_train']!r}")
    for key in _FLOAT_KEYS:
        if isinstance(out[key], bool) or not isinstance(out[key], (int, float)) or out[key] < 0:
            hint = " (YAML reads 1e-4 as a string: write 1.0e-4)" if isinstance(out[key], str) else ""
            raise ConfigError(f"digits.{key}: expected a number >= 0, got {out[key]!r}{hint}")
    arch = out["arch"]
    for key in _ARCH_INT_KEYS:
        if isinstance(arch[key], bool) or not isinstance(arch[key], int) or arch[key] < 1:
            raise ConfigError(f"digits.arch.{key}: expected a positive integer, got {arch[key]!r}")
    ratio = arch["mlp_ratio"]
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio <= 0:
        raise ConfigError(f"digits.arch.mlp_ratio: expected a positive number, got {ratio!r}")
    if arch["image_size"] != 8:
        raise ConfigError(f"digits.arch.image_size: the digits are 8×8, got {arch['image_size']}")
    if 8 % arch["patch_size"]:
        raise ConfigError(f"digits.arch.patch_size: must divide 8, got {arch['patch_size']}")
    if arch["width"] % arch["heads"]:
        raise ConfigError(f"digits.arch.heads: must divide width {arch['width']}, got {arch['heads']}")
    if out["n_val"] + out["n_test"] >= N_IMAGES:
        raise ConfigError(f"digits.n_val + digits.n_test must leave training images "
                          f"(< {N_IMAGES}), got {out['n_val']} + {out['n_test']}")
    return out


__all__ = ["DEFAULTS", "GRID", "GROUPS", "N_IMAGES", "TASK_NAMES", "resolve_config"]
