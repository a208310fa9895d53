"""Code fingerprints: which version of the library a job runs, blind to comments, docstrings
and formatting (torch-free, reads source files only).

``code_fingerprint("submerge.stages.merge")`` hashes the syntax tree of that module and of every
submerge module it imports, directly or through others, at module level or inside functions.
The workflow passes it as a param of each rule, with ``--rerun-triggers input params
software-env`` (profiles/default): a real change to ``boosting.py`` reruns the jobs whose stage
reaches ``boosting.py``; a comment, a docstring, a touched or reverted file, or a fresh clone of
the same commit reruns nothing. Content-addressed result caches use it in their keys too.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

SRC = Path(__file__).resolve().parent  # the submerge package
PACKAGE = SRC.name


def _module_file(module: str) -> Path | None:
    """The source file of a submerge module (``None`` for a name that is not one)."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = SRC.joinpath(*parts[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


@lru_cache(maxsize=None)
def _parsed(path: Path) -> tuple[str, frozenset[str], frozenset[str]]:
    """(normalised syntax tree, submerge modules imported, modules named by registry entries
    ``"submerge.x:function"``) of one source file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parts = [PACKAGE, *path.relative_to(SRC).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    package = parts if path.name == "__init__.py" else parts[:-1]  # for relative imports
    imported, registered = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            imported.add(name)
            imported.update(f"{name}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and node.value.startswith(f"{PACKAGE}."):
            if ":" in node.value:  # a merge function's registry entry "submerge.x:function"
                registered.add(node.value.split(":")[0])
            else:  # a module imported by name (the model adapters)
                imported.add(node.value)
    # a module also runs its packages' __init__
    imported.update(".".join(parts[:i]) for i in range(1, len(parts)))
    text = ast.dump(_strip_docstrings(tree), annotate_fields=False, include_attributes=False)
    known = lambda names: frozenset(m for m in names if _module_file(m) is not None)  # noqa: E731
    return text, known(imported), known(registered)


def imported_modules(path: str | Path) -> frozenset[str]:
    """The submerge modules a source file imports (at module level or inside functions, and
    the packages they are in, and the adapter modules it names)."""
    return _parsed(Path(path).resolve())[1]


def reachable_modules(module: str, *, merges: bool = False) -> list[str]:
    """``module`` and every submerge module it reaches through imports, sorted; with
    ``merges``, also the implementations of the registered merge functions (every module
    reads the registry, only the jobs that merge run them)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        _, imported, registered = _parsed(path)
        todo.extend(imported)
        if merges:
            todo.extend(registered)
    return sorted(seen)


def code_fingerprint(*modules: str, merges: bool = False) -> str:
    """sha256 (16 hex digits) of the syntax trees of ``modules`` and all they reach."""
    names = sorted({m for module in modules for m in reachable_modules(module, merges=merges)})
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode() + b"\0" + _parsed(_module_file(name))[0].encode() + b"\0")
    return digest.hexdigest()[:16]


# Where a job runs, not what it computes: the warm worker (submerge.worker) starts jobs and
# names the stage modules it preloads; a job computes the same with or without it (tested).
LAUNCHERS = frozenset({f"{PACKAGE}.worker"})


def script_fingerprint(path: str | Path, *, merges: bool = False) -> str:
    """The fingerprint of a Snakemake script: its own syntax tree and the submerge modules it
    imports (``merges``: it runs merge functions, see :func:`reachable_modules`), less the
    :data:`LAUNCHERS`."""
    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE:
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
    digest = hashlib.sha256(ast.dump(_strip_docstrings(tree), annotate_fields=False).encode())
    modules -= LAUNCHERS
    digest.update(code_fingerprint(*sorted(modules), merges=merges).encode() if modules else b"")
    return digest.hexdigest()[:16]
