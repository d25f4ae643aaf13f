"""An offline English corpus that ships with every CPython, so the demo needs no dataset hub.

It is Python's own documentation: the reference texts behind ``help("topic")`` and the
docstrings of the standard library's public modules, about 1.9 M characters on Python 3.11.
The output depends only on the interpreter's version and build, never on the process
(hash seed, import order, what a test runner has patched), so its data version is stable.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import io
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from nanogpt_core.data.documents import Document

# Easter eggs, GUI toolkits and their demos, bundled installers, generated codec tables, and
# a source already read as topics. Importing readline takes over the terminal's line editing.
SKIPPED_MODULES = frozenset(
    {
        "antigravity",
        "encodings",
        "ensurepip",
        "idlelib",
        "pydoc_data",
        "readline",
        "this",
        "tkinter",
        "turtle",
        "turtledemo",
    }
)
TEST_PACKAGES = frozenset({"test", "tests", "idle_test"})
# Shorter docstrings are labels ("group id", "**DEPRECATED**", "Stub."), not sentences.
MIN_DOC_CHARS = 20

Section = tuple[str, str | None]  # (heading, docstring)


def iter_demo_documents() -> Iterator[Document]:
    """Yield pydoc's topics, then one document per standard-library module, in a fixed order."""
    yield from _topic_documents()
    yield from _stdlib_documents()


def _topic_documents() -> Iterator[Document]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield Document(id=f"pydoc-topic/{name}", text=inspect.cleandoc(topics[name]))


def _stdlib_documents() -> Iterator[Document]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for top_level in sorted(sys.stdlib_module_names):
        if top_level.startswith("_") or top_level in SKIPPED_MODULES:
            continue
        sources = _source_files(stdlib, top_level)
        if sources:
            # Reading the source instead of importing it runs none of the module's code.
            documented = [(name, _source_sections(name, path)) for name, path in sources]
        else:
            # Written in C: there is no source to read, so import the module and introspect it.
            module = _import_quietly(top_level)
            documented = [(top_level, _compiled_sections(module))] if module else []
        for name, sections in documented:
            text = _join(sections)
            if text:
                yield Document(id=f"stdlib/{name}", text=text)


def _source_files(stdlib: Path, top_level: str) -> list[tuple[str, Path]]:
    single = stdlib / f"{top_level}.py"
    if single.is_file():
        return [(top_level, single)]
    package = stdlib / top_level
    if not (package / "__init__.py").is_file():
        return []
    found = []
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(stdlib).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if any(part.startswith("_") or part in TEST_PACKAGES for part in parts):
            continue
        found.append((".".join(parts), path))
    return sorted(found)


def _source_sections(module_name: str, path: Path) -> list[Section]:
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError):
        return []
    return [(module_name, ast.get_docstring(tree, clean=False))] + list(
        _definition_sections(module_name, tree.body)
    )


def _definition_sections(prefix: str, body: list[ast.stmt]) -> Iterator[Section]:
    for node in body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if node.name.startswith("_"):
            continue
        qualified = f"{prefix}.{node.name}"
        yield qualified, ast.get_docstring(node, clean=False)
        if isinstance(node, ast.ClassDef):
            yield from _definition_sections(qualified, node.body)


def _import_quietly(name: str) -> ModuleType | None:
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except Exception:  # e.g. Windows-only modules on other platforms
            return None


def _compiled_sections(module: ModuleType) -> list[Section]:
    module_name = module.__name__
    namespace = vars(module)
    sections: list[Section] = [(module_name, module.__doc__)]
    for name in sorted(namespace):
        if name.startswith("_"):
            continue
        # sys keeps the interpreter's own hooks under dunder names; test runners and
        # debuggers replace the public ones, which would make the text depend on the caller.
        obj = namespace.get(f"__{name}__", namespace[name])
        # Aliases (IOError for OSError) and re-exports from other modules would repeat text.
        if getattr(obj, "__module__", None) != module_name:
            continue
        if getattr(obj, "__name__", None) != name:
            continue
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        qualified = f"{module_name}.{name}"
        sections.append((qualified, obj.__doc__))
        if inspect.isclass(obj):
            # Own members only: walking the MRO would repeat object's and int's docstrings.
            for attr, member in sorted(vars(obj).items()):
                if attr.startswith("_"):
                    continue
                if inspect.isroutine(member) or inspect.isdatadescriptor(member):
                    sections.append((f"{qualified}.{attr}", member.__doc__))
    return sections


def _join(sections: list[Section]) -> str:
    parts = []
    for heading, doc in sections:
        if not isinstance(doc, str):
            continue
        doc = inspect.cleandoc(doc)
        if len(doc) >= MIN_DOC_CHARS:
            parts.append(f"{heading}\n\n{doc}")
    return "\n\n".join(parts)
