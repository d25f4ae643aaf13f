"""Documentation of installed packages as demo-corpus documents: docstrings and descriptions.

Only the distributions listed in PACKAGES are read, each a dependency that every install of
this project has, and each only when its installed metadata declares the licence listed for
it (all permissive: MIT, BSD-3-Clause, Apache-2.0), so that what the demo trains on may be
redistributed with the model. A package that is missing or declares another licence is
skipped, and `describe_package_docs` says which and why. Sources are read with `ast`, never
imported. The text changes when a package's version does; the versions are recorded.

Chosen for English prose per second of reading: SQLAlchemy's, huggingface_hub's and
datasets' docstrings are long-form reference text, and read about ten times faster than
torch's (docs/DATA_PROCESSING.md has the measurements).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from nanogpt_core.data.docstrings import join_sections, package_modules, source_sections
from nanogpt_core.data.documents import Document


@dataclass(frozen=True)
class PackageText:
    distribution: str  # the name on PyPI
    packages: tuple[str, ...]  # the import names whose docstrings are read
    licence: str  # the SPDX id its metadata must declare


PACKAGES: tuple[PackageText, ...] = (
    PackageText("SQLAlchemy", ("sqlalchemy",), "MIT"),
    PackageText("huggingface-hub", ("huggingface_hub",), "Apache-2.0"),
    PackageText("datasets", ("datasets",), "Apache-2.0"),
    PackageText("pydantic", ("pydantic",), "MIT"),
    PackageText("click", ("click",), "BSD-3-Clause"),
    PackageText("Jinja2", ("jinja2",), "BSD-3-Clause"),
)

# How each accepted licence may be spelled in a distribution's License-Expression, License
# field or trove classifier ("License :: OSI Approved :: BSD License" names no BSD variant;
# for the packages listed, their licence files say 3-clause).
LICENCE_SPELLINGS: dict[str, frozenset[str]] = {
    "MIT": frozenset({"mit", "mit license"}),
    "Apache-2.0": frozenset({"apache-2.0", "apache 2.0", "apache license 2.0", "apache software license"}),
    "BSD-3-Clause": frozenset({"bsd-3-clause", "bsd 3-clause", "bsd license"}),
}


def iter_package_documents(packages: tuple[PackageText, ...] = PACKAGES) -> Iterator[Document]:
    """Per readable package: one document per public module with docstrings, then its description."""
    for package in packages:
        if _skip_reason(package) is not None:
            continue
        for import_name in package.packages:
            root = _import_root(import_name)
            if root is None:
                continue
            for module_name, path in package_modules(root, import_name):
                text = join_sections(source_sections(module_name, path))
                if text:
                    yield Document(id=f"package/{module_name}", text=text)
        description = _description(package.distribution)
        if description:
            yield Document(id=f"package-readme/{package.distribution}", text=description)


def describe_package_docs(packages: tuple[PackageText, ...] = PACKAGES) -> list[dict[str, Any]]:
    """Each listed distribution: version, licence, and whether it was read (and if not, why)."""
    described = []
    for package in packages:
        reason = _skip_reason(package)
        entry: dict[str, Any] = {"distribution": package.distribution, "licence": package.licence,
                                 "read": reason is None}
        if reason is None:
            entry["version"] = metadata.version(package.distribution)
        else:
            entry["skipped"] = reason
        described.append(entry)
    return described


def declared_licences(distribution: str) -> set[str]:
    """The licence names a distribution's metadata declares, lower-cased."""
    meta = metadata.metadata(distribution)
    declared = set()
    if meta.get("License-Expression"):
        declared.add(meta["License-Expression"].strip().lower())
    # The free-text License field sometimes holds the whole licence text; its first line names it.
    if meta.get("License"):
        declared.add(meta["License"].strip().splitlines()[0].strip().lower())
    for classifier in meta.get_all("Classifier") or []:
        if classifier.startswith("License ::"):
            declared.add(classifier.split("::")[-1].strip().lower())
    return declared


def _skip_reason(package: PackageText) -> str | None:
    if package.licence not in LICENCE_SPELLINGS:
        return f"{package.licence} is not one of the licences the demo corpus accepts ({', '.join(LICENCE_SPELLINGS)})"
    try:
        declared = declared_licences(package.distribution)
    except metadata.PackageNotFoundError:
        return "not installed"
    if not declared & LICENCE_SPELLINGS[package.licence]:
        return f"declares {sorted(declared) or 'no licence'}, not {package.licence}"
    return None


def _import_root(import_name: str) -> Path | None:
    """The folder that holds the package, found without importing it."""
    spec = importlib.util.find_spec(import_name)
    if spec is None or spec.origin is None:
        return None
    origin = Path(spec.origin)
    return origin.parent.parent if origin.name == "__init__.py" else origin.parent


def _description(distribution: str) -> str:
    meta = metadata.metadata(distribution)
    return (meta.get_payload() or meta.get("Description") or "").strip()
