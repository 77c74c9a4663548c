"""The library's layers: no import circle among covseg's modules, and nothing below the model store reaches
MLflow or Prefect. Imports inside functions count (a lazy import hides a circle, it does not remove it)."""
import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
# The model and data layers: CT, data, networks, metrics, contracts. They know no tracking, registry or server.
LOWER = ["names", "errors", "params", "atomic", "shell", "data", "ingest", "preprocessing", "model", "evaluation",
         "plots", "submission", "scans", "validation", "calibration"]
UPPER = {"tracking", "modelstore", "serving", "registry", "provenance", "gate", "promotion", "locks"}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """covseg module -> the modules it imports anywhere in its body (covseg's and third parties' top names)."""
    graph = {}
    for path in sorted((SRC / "covseg").rglob("*.py")):
        name, found = module_name(path), set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                found.add(base)
                found |= {f"{base}.{a.name}" for a in node.names}  # `from covseg import tracking`
        graph[name] = found
    return {m: {i for i in found if i in graph or not i.startswith("covseg")} - {m} for m, found in graph.items()}


def covseg_edges(graph) -> dict[str, set[str]]:
    # a package's __init__ runs before its modules: `covseg` itself is imported by everything and imports nothing
    return {m: {i for i in deps if i in graph and i != "covseg"} for m, deps in graph.items()}


def closure(graph, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_no_import_circle():
    edges = covseg_edges(imports())
    circles = sorted(m for m in edges if m in closure(edges, m))
    assert not circles, f"modules on an import circle: {circles}"


@pytest.mark.parametrize("layer", LOWER)
def test_model_and_data_layers_know_no_tracking_registry_or_orchestration(layer):
    graph = imports()
    reached = closure(graph, f"covseg.{layer}")
    upward = sorted(m for m in reached if m.split(".")[0] in {"mlflow", "prefect"}
                    or m.removeprefix("covseg.") in UPPER)
    assert not upward, f"covseg.{layer} reaches {upward}"


def test_tracking_knows_runs_not_models():
    reached = closure(covseg_edges(imports()), "covseg.tracking")
    assert not reached & {"covseg.model", "covseg.serving", "covseg.modelstore"}, reached


def test_the_graph_sees_imports_inside_functions():
    graph = imports()
    assert "covseg.modelstore" in graph["covseg.training"]  # `from covseg.modelstore import load` in warm_start
    assert "covseg.stages.register" in graph["covseg.cli"]
