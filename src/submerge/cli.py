"""The ``submerge`` command line, for use outside Snakemake.

    submerge --version
    submerge audit PATH [PATH ...]      # exit 0 when clean, 1 when anything changed, 2 on errors
    submerge audit --chain FILE         # the provenance tree of FILE down to the checkpoints
    submerge merge [RECIPE.yaml] [--base SRC --expert SRC ... --method M --alpha A ...] -o DIR
    submerge diagnose [RECIPE.yaml] [--base SRC --expert SRC ...] -o DIR [--hogsvd]

Subcommands live in :data:`SUBCOMMANDS` (name -> :class:`Subcommand`); to add one, write
a ``configure(parser)`` that adds its arguments and a ``run(args) -> int`` that returns
the exit code, and register both there.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from submerge import __version__
from submerge.recipe import DIAGNOSE_BETA

EXIT_OK, EXIT_CHANGED, EXIT_ERROR = 0, 1, 2


@dataclass(frozen=True)
class Subcommand:
    """One ``submerge <name>`` subcommand."""

    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    epilog: str = ""  # examples, shown by --help


# ------------------------------------------------------------------------------- audit


def _configure_audit(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths",
        nargs="+",
        type=Path,
        metavar="PATH",
        help="a figure/table file, its .json sidecar, or a directory (all sidecars below it; "
        "a table or figure there without a readable sidecar is an error)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="list unchanged files too")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--chain",
        action="store_true",
        help="print the provenance tree of each PATH: its inputs, theirs, ... down to the "
        "checkpoints' sha256 (or to files without recorded provenance)",
    )
    mode.add_argument(
        "--shallow",
        action="store_true",
        help="check only each sidecar's own outputs and inputs, not the chain upstream",
    )


def _audit_targets(paths: Sequence[Path]) -> tuple[list[Path], list[str]]:
    """The sidecars/outputs to audit, and the errors found while listing directories
    (unreadable sidecars, tables and figures without one)."""
    from submerge.report.provenance import scan_directory

    targets, errors = [], []
    for path in paths:
        if path.is_dir():
            found, problems = scan_directory(path)
            if not found and not problems:
                problems = [f"no provenance sidecars under {path}"]
            targets += found
            errors += problems
        else:
            targets.append(path)
    return targets, errors


def run_audit(args: argparse.Namespace) -> int:
    """Audit every given output/sidecar (following the chain upstream unless ``--shallow``;
    printing the tree with ``--chain``); 0 clean, 1 changed, 2 error."""
    from submerge.report.provenance import audit, provenance_chain, render_chain

    targets, errors = _audit_targets(args.paths)
    audited = changed = 0
    hashes: dict = {}  # each file hashed once across targets
    for target in targets:
        try:
            if args.chain:
                tree = provenance_chain(target, hashes=hashes)
                print(render_chain(tree))
                ok = tree.ok
            else:
                result = audit(target, follow=not args.shallow, hashes=hashes)
                print(result.report(verbose=args.verbose))
                ok = result.ok
        except (OSError, ValueError) as exc:
            errors.append(str(exc))
            continue
        audited += 1
        changed += not ok
    for err in errors:
        print(f"ERROR   {err}", file=sys.stderr)
    print(f"{audited} audited: {changed} changed, {len(errors)} error(s)")
    if errors:
        return EXIT_ERROR
    return EXIT_CHANGED if changed else EXIT_OK


# ------------------------------------------------------------------ merge / diagnose

TOP_EPILOG = """examples:
  submerge audit results/digits/figures/rank_collapse.png
  submerge merge --base results/digits/models/base.safetensors \\
      --expert results/digits/models/experts/rot90.safetensors \\
      --expert results/digits/models/experts/parity.safetensors \\
      --method ties --hyper top_k_percent=20 --beta 0.2 --alpha 0.4 -o merged/
  submerge diagnose --base results/digits/models/base.safetensors \\
      --expert results/digits/models/experts/rot90.safetensors \\
      --expert results/digits/models/experts/parity.safetensors --beta 0.2 -o diagnose/

'submerge COMMAND --help' describes each command."""

SOURCE_HELP = ("a local file or directory, an http(s) URL, or a hub file org/name[:file][@revision] "
               "(default file model.safetensors); append #sha256=<hex> to pin its hash")

MERGE_EPILOG = """Checkpoints (--base, --expert): """ + SOURCE_HELP + """. A normalised
checkpoint of the pipeline (results/<suite>/models/) carries its adapter and architecture; an
HF checkpoint takes them from the config.json beside it; otherwise give --adapter and --arch.

examples:
  # TIES + Subspace Boosting of two digits experts (after `make run`)
  submerge merge --base results/digits/models/base.safetensors \\
      --expert results/digits/models/experts/rot90.safetensors \\
      --expert results/digits/models/experts/parity.safetensors \\
      --method ties --hyper top_k_percent=20 --beta 0.2 --alpha 0.4 -o merged/

  # the same as a recipe file (mergekit-yaml style; fields as in a pipeline config's method)
  cat > recipe.yaml <<END
  base: results/digits/models/base.safetensors
  experts: [results/digits/models/experts/rot90.safetensors,
            results/digits/models/experts/parity.safetensors]
  method: {merge: ties, top_k_percent: 20, boost: {layers: both, attn_mode: per_qkv}}
  alpha: 0.4
  beta: 0.2
  END
  submerge merge recipe.yaml -o merged/

  # HF T5 experts from the hub, TA + LiNeS + SB on a GPU
  submerge merge --base google/t5-v1_1-base --expert org/t5-qasc@<rev> --expert org/t5-wiki@<rev> \\
      --method task_arithmetic --lines --beta 0.01 --alpha 1.0 --device cuda -o t5-merged/

The output directory holds the model in its source's format (open_clip_visual.safetensors, or
a save_pretrained directory), a model card (README.md) and a provenance sidecar."""

DIAGNOSE_EPILOG = """Checkpoints as for 'submerge merge'. For n = 1..N the first n experts are merged
(--method, default task_arithmetic) and every attention/MLP matrix's stable rank and 90 %-energy
rank is measured before and after Subspace Boosting at --beta: the rank-collapse curve.

example:
  submerge diagnose --base results/digits/models/base.safetensors \\
      --expert results/digits/models/experts/rot90.safetensors \\
      --expert results/digits/models/experts/parity.safetensors \\
      --expert results/digits/models/experts/invert.safetensors --beta 0.2 --hogsvd -o diagnose/

writes diagnose/rank_collapse.{csv,md,png} (and alignment.{csv,png} with --hogsvd)."""

# config field of a merge recipe -> the flag that sets it
_FLAGS = {"base": "--base", "experts": "--expert", "method": "--method", "method.merge": "--method",
          "alpha": "--alpha", "beta": "--beta", "adapter": "--adapter", "arch": "--arch",
          "device": "--device", "output": "-o/--output", "method.lines": "--lines",
          "method.lines.scale": "--lines-scale", "method.lines.slope": "--lines-slope",
          "method.boost": "--beta", "method.boost.beta_attn": "--beta-attn",
          "method.boost.beta_mlp": "--beta-mlp", "method.boost.layers": "--boost-layers",
          "method.boost.attn_mode": "--attn-mode"}


def _add_recipe_arguments(parser: argparse.ArgumentParser, *, diagnose: bool) -> None:
    parser.add_argument("recipe", nargs="?", type=Path, metavar="RECIPE.yaml",
                        help="a merge recipe (YAML: base, experts, method, alpha, beta, adapter, "
                        "arch, device, output); or give the flags below instead")
    src = parser.add_argument_group("checkpoints")
    src.add_argument("--base", metavar="SRC", help="the base model: " + SOURCE_HELP)
    src.add_argument("--expert", action="append", metavar="[NAME=]SRC",
                     help="an expert (repeat, in merge order); NAME defaults to the file's name")
    src.add_argument("--adapter", choices=["open_clip_vit", "hf_clip_vision", "hf_t5"],
                     help="the architecture family (default: from the base checkpoint)")
    src.add_argument("--arch", metavar="NAME|YAML|FILE",
                     help="the architecture: an open_clip model name (ViT-B-32), an inline YAML "
                     "mapping or a YAML/JSON file (default: from the base checkpoint)")
    m = parser.add_argument_group("method")
    m.add_argument("--method", default=None, metavar="MERGE",
                   help="merge function (task_arithmetic, ties, tsv_m, iso_c, iso_cts, hogsvd; "
                   "default task_arithmetic)")
    m.add_argument("--hyper", action="append", default=[], metavar="KEY=VALUE",
                   help="a hyperparameter of the merge function (repeat), e.g. top_k_percent=20")
    m.add_argument("--lines", action="store_true", help="apply LiNeS layer scaling")
    m.add_argument("--lines-scale", metavar="X|norm", help="LiNeS base scale (default norm)")
    m.add_argument("--lines-slope", type=float, metavar="X", help="LiNeS slope (default 0.5)")
    b = parser.add_argument_group("Subspace Boosting")
    if not diagnose:
        b.add_argument("--boost", action="store_true",
                       help="apply Subspace Boosting (implied by --beta)")
    b.add_argument("--beta", type=float, metavar="B",
                   help="boosting threshold β in [0, 1)" + (
                       f" (default {DIAGNOSE_BETA})" if diagnose else ""))
    b.add_argument("--beta-attn", type=float, metavar="B", help="β of attention matrices only")
    b.add_argument("--beta-mlp", type=float, metavar="B", help="β of MLP matrices only")
    b.add_argument("--boost-layers", choices=["attn", "mlp", "both"], help="which matrices (default both)")
    b.add_argument("--attn-mode", choices=["per_qkv", "full", "none"],
                   help="attention: q/k/v boosted separately (default per_qkv), as one, or not")
    if not diagnose:
        parser.add_argument("--alpha", type=float, metavar="A",
                            help="scale of the merged task vector: θ = θ_base + α·Δ")
    parser.add_argument("--device", metavar="DEV", help="auto (default), cpu or cuda[:N]")
    parser.add_argument("-o", "--output", metavar="DIR", help="output directory")


def _configure_merge(parser: argparse.ArgumentParser) -> None:
    _add_recipe_arguments(parser, diagnose=False)


def _configure_diagnose(parser: argparse.ArgumentParser) -> None:
    _add_recipe_arguments(parser, diagnose=True)
    parser.add_argument("--energy-frac", type=float, default=0.9, metavar="F",
                        help="share of Σσ² the energy rank covers (default 0.9)")
    parser.add_argument("--hogsvd", action="store_true",
                        help="also the HO-GSVD alignment matrix of the experts")


def _parse_arch(text: str):
    import yaml

    path = Path(text)
    if path.is_file():
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    if text.lstrip().startswith("{"):
        return yaml.safe_load(text)
    return text


_RECIPE_FLAGS = ("base", "expert", "adapter", "arch", "method", "lines", "lines_scale", "lines_slope",
                 "boost", "beta", "beta_attn", "beta_mlp", "boost_layers", "attn_mode", "alpha")


def _flags_recipe(args: argparse.Namespace, *, diagnose: bool) -> dict:
    """The merge recipe mapping the flags describe (parsed like a recipe file)."""
    import re

    import yaml

    from submerge.errors import ConfigError

    cfg: dict = {}
    if args.base is not None:
        cfg["base"] = args.base
    if args.expert:
        named = [re.match(r"([A-Za-z0-9_-]+)=(.+)", e) for e in args.expert]
        if all(named):
            cfg["experts"] = {m.group(1): m.group(2) for m in named}
        else:
            cfg["experts"] = [m.group(2) if m else e for m, e in zip(named, args.expert)]
    method: dict = {"merge": args.method or "task_arithmetic"}
    for item in args.hyper:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"config field method.{item}: --hyper takes KEY=VALUE, got {item!r}")
        method[key.strip()] = yaml.safe_load(value)
    if args.lines or args.lines_scale is not None or args.lines_slope is not None:
        lines: dict = {}
        if args.lines_scale is not None:
            lines["scale"] = args.lines_scale if args.lines_scale == "norm" else yaml.safe_load(args.lines_scale)
        if args.lines_slope is not None:
            lines["slope"] = args.lines_slope
        method["lines"] = lines
    boost_fields = {"layers": args.boost_layers, "attn_mode": args.attn_mode,
                    "beta_attn": args.beta_attn, "beta_mlp": args.beta_mlp}
    if diagnose or getattr(args, "boost", False) or args.beta is not None or any(
            v is not None for v in boost_fields.values()):
        method["boost"] = {k: v for k, v in boost_fields.items() if v is not None}
    cfg["method"] = method
    if getattr(args, "alpha", None) is not None:
        cfg["alpha"] = args.alpha
    if args.beta is not None:
        cfg["beta"] = args.beta
    if args.adapter is not None:
        cfg["adapter"] = args.adapter
    if args.arch is not None:
        cfg["arch"] = _parse_arch(args.arch)
    return cfg


def _flag_message(message: str) -> str:
    """A recipe error as the flag that set the field (``config field beta: ...`` -> ``--beta: ...``)."""
    import re

    m = re.match(r"config field ([\w.\[\]-]+): (.*)", message, re.DOTALL)
    if m is None:
        return message
    field, rest = m.groups()
    top = re.sub(r"\[\d+\]$", "", field)
    if top in _FLAGS:
        flag = _FLAGS[top]
    elif top.startswith(("experts.", "experts[")) or top == "experts":
        flag = "--expert"
    elif top.startswith("base"):
        flag = "--base"
    elif top.startswith("method.") and top.count(".") == 1:
        flag = f"--hyper {top.split('.', 1)[1]}"
    else:
        return message
    return f"{flag}: {rest}"


class _InputError(Exception):
    """Bad input, reported as one line."""


def _load_recipe(args: argparse.Namespace, *, diagnose: bool):
    """The :class:`~submerge.recipe.MergeRecipe` of the recipe file or of the flags."""
    import yaml

    from submerge.errors import ConfigError
    from submerge.recipe import DIAGNOSE_BETA, parse_merge_recipe

    flags = [f for f in _RECIPE_FLAGS if getattr(args, f, None) not in (None, False, [])]
    if args.hyper:
        flags.append("hyper")
    if args.recipe is not None:
        if flags:
            raise _InputError(f"--{flags[0].replace('_', '-')}: give either a recipe file "
                              f"({args.recipe}) or flags, not both (only --device and -o/--output "
                              "may be added to a recipe file)")
        try:
            cfg = yaml.safe_load(args.recipe.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise _InputError(f"{args.recipe}: recipe file not found") from None
        except (OSError, yaml.YAMLError) as exc:
            raise _InputError(f"{args.recipe}: cannot read the recipe: "
                              f"{' '.join(str(exc).split())}") from None
        if not isinstance(cfg, dict):
            raise _InputError(f"{args.recipe}: a recipe is a YAML mapping of base, experts, method, ...")
        where = lambda msg: f"{args.recipe}: {msg}"  # noqa: E731
    else:
        try:
            cfg = _flags_recipe(args, diagnose=diagnose)
        except ConfigError as exc:
            raise _InputError(_flag_message(str(exc))) from None
        where = _flag_message
    if args.device is not None:
        cfg["device"] = args.device
    if args.output is not None:
        cfg["output"] = str(args.output)
    if diagnose:  # diagnose always compares before and after boosting
        if isinstance(cfg.get("method"), str):
            cfg["method"] = {"merge": cfg["method"]}
        if isinstance(cfg.get("method"), dict):
            cfg["method"] = {**cfg["method"], "boost": cfg["method"].get("boost") or {}}
            fixed = {"beta_attn", "beta_mlp"} <= set(cfg["method"]["boost"])
            if "beta" not in cfg and not fixed:
                cfg["beta"] = DIAGNOSE_BETA
    try:
        recipe = parse_merge_recipe(cfg, need_alpha=not diagnose)
    except ConfigError as exc:
        raise _InputError(where(str(exc))) from None
    if recipe.output is None:
        raise _InputError(where("config field output: required (the output directory)"))
    return recipe, where


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _run_recipe_command(args: argparse.Namespace, *, diagnose: bool) -> int:
    from submerge import standalone
    from submerge.errors import SubmergeError

    name = "diagnose" if diagnose else "merge"
    where = _flag_message
    try:
        recipe, where = _load_recipe(args, diagnose=diagnose)
        if diagnose:
            files = standalone.diagnose(recipe, Path(recipe.output), energy_frac=args.energy_frac,
                                        with_hogsvd=args.hogsvd)
            for path in files.values():
                print(path)
        else:
            out = standalone.merge(recipe, Path(recipe.output),
                                   command=shlex.join(["submerge", *args.argv]))
            print(out)
    except _InputError as exc:
        print(f"submerge {name}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except (SubmergeError, OSError) as exc:
        message = str(exc)
        message = where(message) if message.startswith("config field") else message
        print(f"submerge {name}: error: {_one_line(message)}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def run_merge(args: argparse.Namespace) -> int:
    """``submerge merge``: 0 on success, 2 on bad input (one line naming the file or flag)."""
    return _run_recipe_command(args, diagnose=False)


def run_diagnose(args: argparse.Namespace) -> int:
    """``submerge diagnose``: 0 on success, 2 on bad input (one line naming the file or flag)."""
    return _run_recipe_command(args, diagnose=True)


SUBCOMMANDS: dict[str, Subcommand] = {
    "audit": Subcommand(
        help="check figures/tables against their provenance sidecars (inputs and outputs)",
        configure=_configure_audit,
        run=run_audit,
    ),
    "merge": Subcommand(
        help="merge experts into their base (any registered method, optional LiNeS and "
        "Subspace Boosting) and write the model in its source's format",
        configure=_configure_merge,
        run=run_merge,
        epilog=MERGE_EPILOG,
    ),
    "diagnose": Subcommand(
        help="rank collapse of the merged task vector as experts are added, before and after "
        "Subspace Boosting (table + figure; optional HO-GSVD alignment matrix)",
        configure=_configure_diagnose,
        run=run_diagnose,
        epilog=DIAGNOSE_EPILOG,
    ),
}


# -------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="submerge", description="Subspace-boosted model merging: command line tools.",
        epilog=TOP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"submerge {__version__}")
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, cmd in SUBCOMMANDS.items():
        cmd.configure(sub.add_parser(name, help=cmd.help, description=cmd.help, epilog=cmd.epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``submerge`` script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in model cards
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    return SUBCOMMANDS[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
