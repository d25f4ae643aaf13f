"""Docstrings read from Python source without running it, joined into one text per module.

Shared by the demo corpus's standard-library part and its installed-packages part: a
module's text is its own docstring, then each public class's and function's (classes'
members included), each under its dotted name, in source order.
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Iterator
from pathlib import Path

# Shorter docstrings are labels ("group id", "**DEPRECATED**", "Stub."), not sentences.
MIN_DOC_CHARS = 20
TEST_PACKAGES = frozenset({"test", "tests", "testing", "idle_test"})

Section = tuple[str, "str | None"]  # (heading, docstring)


def package_modules(root: Path, package: str) -> list[tuple[str, Path]]:
    """(dotted name, file) of every public module of `package` under `root`, sorted.

    A module is public when no part of its dotted name starts with "_"; test packages
    are left out.
    """
    single = root / f"{package}.py"
    if single.is_file():
        return [(package, single)]
    directory = root / package
    if not (directory / "__init__.py").is_file():
        return []
    found = []
    for path in directory.rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if any(part.startswith("_") or part in TEST_PACKAGES for part in parts):
            continue
        found.append((".".join(parts), path))
    return sorted(found)


def source_sections(module_name: str, path: Path) -> list[Section]:
    """The module's docstring and its public definitions' docstrings; none for a file that does not parse."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError):
        return []
    return [(module_name, ast.get_docstring(tree, clean=False))] + list(definition_sections(module_name, tree.body))


def definition_sections(prefix: str, body: list[ast.stmt]) -> Iterator[Section]:
    for node in body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if node.name.startswith("_"):
            continue
        qualified = f"{prefix}.{node.name}"
        yield qualified, ast.get_docstring(node, clean=False)
        if isinstance(node, ast.ClassDef):
            yield from definition_sections(qualified, node.body)


def join_sections(sections: list[Section]) -> str:
    """One text: each docstring long enough to be prose, cleaned of indentation, under its heading."""
    parts = []
    for heading, doc in sections:
        if not isinstance(doc, str):
            continue
        doc = inspect.cleandoc(doc)
        if len(doc) >= MIN_DOC_CHARS:
            parts.append(f"{heading}\n\n{doc}")
    return "\n\n".join(parts)
