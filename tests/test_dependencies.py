"""What the project declares it needs, what it pins, and what the code actually imports."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("nanogpt_core", "serving", "pipeline")
PYPROJECT = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
DECLARED = [Requirement(text) for text in PYPROJECT["dependencies"]]
EXTRAS = [Requirement(text) for group in PYPROJECT["optional-dependencies"].values() for text in group]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def constraints() -> dict[str, Version]:
    pins = {}
    for line in (PROJECT_ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonical(name)] = Version(version)
    return pins


PINS = constraints()


def test_the_license_file_is_the_mit_license_pyproject_names():
    assert PYPROJECT["license"] == {"text": "MIT"}
    assert (PROJECT_ROOT / "LICENSE").read_text().startswith("MIT License\n")


@pytest.mark.parametrize("requirement", DECLARED + EXTRAS, ids=str)
def test_every_declared_dependency_is_pinned_within_its_range(requirement):
    pin = PINS.get(canonical(requirement.name))
    assert pin is not None, f"{requirement.name} is declared in pyproject.toml but not pinned in constraints.txt"
    assert requirement.specifier.contains(pin, prereleases=True), \
        f"constraints.txt pins {requirement.name}=={pin}, outside pyproject's {requirement.specifier}"


@pytest.mark.parametrize("requirement", DECLARED, ids=str)
def test_the_suite_runs_with_the_pinned_versions(requirement):
    installed = Version(importlib.metadata.version(requirement.name))
    # A local label (torch's +cpu or +cu126) names the build, not the release.
    assert Version(installed.public) == PINS[canonical(requirement.name)], \
        f"{requirement.name} {installed} is installed, constraints.txt pins {PINS[canonical(requirement.name)]}"


def imported_top_level_names() -> dict[str, str]:
    """Each third-party top-level module the packages import, with one file that imports it."""
    first_party = {*PACKAGES, "__future__"}
    found: dict[str, str] = {}
    for package in PACKAGES:
        for path in sorted((PROJECT_ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in first_party:
                        found.setdefault(top, str(path.relative_to(PROJECT_ROOT)))
    return found


def test_every_package_the_code_imports_is_declared_not_merely_installed_alongside():
    distributions = importlib.metadata.packages_distributions()
    declared = {canonical(r.name) for r in DECLARED}
    undeclared = []
    for module, where in sorted(imported_top_level_names().items()):
        providers = {canonical(d) for d in distributions.get(module, [])}
        if not providers & declared:
            undeclared.append(f"{module} (imported in {where}; installed by {sorted(providers) or 'nothing'})")
    assert not undeclared, f"declare these in pyproject.toml's dependencies: {undeclared}"
