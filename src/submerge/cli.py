"""The ``submerge`` command line, for use outside Snakemake.

    submerge --version
    submerge audit PATH [PATH ...]      # exit 0 when clean, 1 when anything changed, 2 on errors
    submerge audit --chain FILE         # the provenance tree of FILE down to the checkpoints

Subcommands live in :data:`SUBCOMMANDS` (name -> :class:`Subcommand`); to add one, write
a ``configure(parser)`` that adds its arguments and a ``run(args) -> int`` that returns
the exit code, and register both there.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from submerge import __version__

EXIT_OK, EXIT_CHANGED, EXIT_ERROR = 0, 1, 2


@dataclass(frozen=True)
class Subcommand:
    """One ``submerge <name>`` subcommand."""

    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


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


SUBCOMMANDS: dict[str, Subcommand] = {
    "audit": Subcommand(
        help="check figures/tables against their provenance sidecars (inputs and outputs)",
        configure=_configure_audit,
        run=run_audit,
    ),
}


# -------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="submerge", description="Subspace-boosted model merging: command line tools."
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
        cmd.configure(sub.add_parser(name, help=cmd.help, description=cmd.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``submerge`` script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    return SUBCOMMANDS[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
