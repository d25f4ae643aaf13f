"""How the code imports itself: down the layers only, and never in a circle.

Every import statement counts, including those inside functions: an import deferred to call
time still ties the two modules together. A package's `__init__` re-exporting its
submodules is not a circle with them, because importing a submodule is not counted as an
import of its package.
"""

from __future__ import annotations

import ast
import fnmatch
from collections.abc import Iterator
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("nanogpt_core", "serving", "pipeline")

# What each package must never import, directly or by a deferred import.
FORBIDDEN = {
    "nanogpt_core": {"pipeline", "serving", "dagster", "dagster_graphql", "dagster_webserver", "fastapi",
                     "starlette", "uvicorn", "gunicorn"},
    "serving": {"pipeline", "dagster"},
}

# The training library's layers, lowest first. A module may import modules of its own layer
# and of the layers below; a circle inside a layer is caught by the circle test. Patterns
# are module names inside nanogpt_core, `*` standing for a submodule.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundations", ("", "atomic_file", "content_hash", "lineage", "hardware", "rng", "schedule", "losses",
                     "distributed", "tokenizer", "durations", "data.documents")),
    ("the model", ("optim", "model", "prompts")),
    ("formats", ("checkpoint", "deployment_manifest", "shards", "shards.*")),
    ("data sources", ("data", "data.*")),
    ("uses of a trained model", ("eval", "eval.*", "hf", "hf.*", "sample", "reply_quality", "report_card")),
    # a profile names the data sources and the benchmark, so it sits above them
    ("profiles", ("config",)),
    ("training runs", ("train", "finetune", "pipes_bridge", "run_command")),
)

def module_files() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (PROJECT_ROOT / package).rglob("*.py"):
            parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


MODULES = module_files()


def imported_names(name: str, path: Path) -> Iterator[str]:
    """Every module name an import statement in the file names (for `from a import b`, both a and a.b)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def project_imports(name: str) -> set[str]:
    return {target for target in imported_names(name, MODULES[name]) if target in MODULES and target != name}


GRAPH = {name: project_imports(name) for name in MODULES}


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iteratively (the graph is small, but recursion limits are not worth testing)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components


def layer_of(name: str) -> int | None:
    inner = name.removeprefix("nanogpt_core").removeprefix(".")
    for number, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(inner, pattern) for pattern in patterns):
            return number
    return None


def is_command_line(name: str) -> bool:
    # `python -m package` runs package.__main__, which nothing imports: it sits above every layer.
    return name.endswith(".__main__")


def test_the_graph_is_read_from_the_real_files():
    assert "nanogpt_core.model" in GRAPH["nanogpt_core.checkpoint"]
    assert "nanogpt_core.eval.scoring" in GRAPH["nanogpt_core.eval.hellaswag"]
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) in (
        [{"a", "b", "c"}, {"d"}], [{"d"}, {"a", "b", "c"}])


def test_no_module_imports_itself_back_through_others():
    circles = [sorted(c) for c in strongly_connected(GRAPH) if len(c) > 1]
    assert not circles, f"import circles: {circles}"


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_never_imports_what_sits_above_it(package):
    wrong = sorted(f"{name} imports {target}"
                   for name, path in MODULES.items() if name.split(".")[0] == package
                   for target in set(imported_names(name, path))
                   if target.split(".")[0] in FORBIDDEN[package])
    assert not wrong


def test_every_training_library_module_has_a_layer():
    unplaced = sorted(name for name in MODULES
                      if name.split(".")[0] == "nanogpt_core" and not is_command_line(name) and layer_of(name) is None)
    assert not unplaced, f"place these in LAYERS: {unplaced}"


def test_the_training_library_imports_only_down_its_layers():
    upward = []
    for name, targets in GRAPH.items():
        if name.split(".")[0] != "nanogpt_core" or is_command_line(name):
            continue
        for target in targets:
            if None in (layer_of(name), layer_of(target)):
                continue  # unplaced modules are the subject of the test above
            if target.startswith("nanogpt_core") and layer_of(target) > layer_of(name):
                upward.append(f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} "
                              f"({LAYERS[layer_of(target)][0]})")
    assert not sorted(upward)


def test_the_checker_sees_an_upward_import(monkeypatch):
    monkeypatch.setitem(GRAPH, "nanogpt_core.model", GRAPH["nanogpt_core.model"] | {"nanogpt_core.train"})
    with pytest.raises(AssertionError, match="nanogpt_core.model .* imports nanogpt_core.train"):
        test_the_training_library_imports_only_down_its_layers()
