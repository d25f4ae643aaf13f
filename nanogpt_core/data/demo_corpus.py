"""An offline English corpus that needs no dataset hub: documentation already on the machine.

Its parts, in this order (docs/DATA_PROCESSING.md lists their licences):

    pydoc-topic/NAME     the reference texts behind ``help("topic")``
    stdlib/MODULE        docstrings of the standard library's public modules
    python-guide/NAME    CPython's prose documents shipped in the standard library
                         (IDLE's manual, the email package's design notes; see python_guides)
    package/MODULE       docstrings of permissively licensed packages this project installs
    package-readme/DIST  those packages' own descriptions (see package_docs)

The frozen held-out documents (nanogpt_core.data.held_out) are never yielded, so whatever
the corpus grows to, no demo model trains on the text it is measured on. The output depends
only on the interpreter and the installed package versions, never on the process (hash seed,
import order, what a test runner has patched), so its content hash is stable; the versions
are recorded by `describe_demo_corpus`.
"""

from __future__ import annotations

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
from typing import Any

from nanogpt_core.data.docstrings import Section, join_sections, package_modules, source_sections
from nanogpt_core.data.documents import Document
from nanogpt_core.data.held_out import held_out_ids
from nanogpt_core.data.package_docs import describe_package_docs, iter_package_documents
from nanogpt_core.data.python_guides import iter_python_guides

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


def iter_demo_documents() -> Iterator[Document]:
    """Every part of the corpus in a fixed order, the frozen held-out documents left out."""
    excluded = held_out_ids()
    for part in (_topic_documents(), _stdlib_documents(), iter_python_guides(), iter_package_documents()):
        for doc in part:
            if doc.id not in excluded:
                yield doc


def describe_demo_corpus() -> dict[str, Any]:
    """What the corpus is made of on this machine, for the record kept beside its output."""
    return {"python": sys.version.split()[0], "packages": describe_package_docs(),
            "held_out_excluded": len(held_out_ids())}


def _topic_documents() -> Iterator[Document]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield Document(id=f"pydoc-topic/{name}", text=inspect.cleandoc(topics[name]))


def _stdlib_documents() -> Iterator[Document]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for top_level in sorted(sys.stdlib_module_names):
        if top_level.startswith("_") or top_level in SKIPPED_MODULES:
            continue
        sources = package_modules(stdlib, top_level)
        if sources:
            # Reading the source instead of importing it runs none of the module's code.
            documented = [(name, source_sections(name, path)) for name, path in sources]
        else:
            # Written in C: there is no source to read, so import the module and introspect it.
            module = _import_quietly(top_level)
            documented = [(top_level, _compiled_sections(module))] if module else []
        for name, sections in documented:
            text = join_sections(sections)
            if text:
                yield Document(id=f"stdlib/{name}", text=text)


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
