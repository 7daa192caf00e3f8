"""The package's shape: which modules import which. Layers import downwards only, and the library and the training
CLI do not load the serving engine."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import cllm

PACKAGE = Path(cllm.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that path imports anywhere in it, a function's deferred import too: deferring an
    import hides a circle from the interpreter, not from the reader."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                above = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(above + ([node.module] if node.module else []))
            # `from . import tensor_files` names a module; `from .model import GPT` a name in one
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names}
    return (found & modules) - {name}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: imported_modules(path, set(paths)) for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports (its modules in order, the first repeated at the end), or None."""
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> list[str] | None:
        if name in path:
            return path[path.index(name):] + [name]
        if name in done:
            return None
        for imported in sorted(graph[name]):
            cycle = visit(imported, path + [name])
            if cycle:
                return cycle
        done.add(name)
        return None

    return next(filter(None, (visit(name, []) for name in sorted(graph))), None)


def test_the_graph_sees_deferred_imports():
    graph = import_graph()
    assert "cllm.model" in graph["cllm.checkpoint"] and "cllm.errors" in graph["cllm.model"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_module_imports_one_that_imports_it_back():
    """checkpoint -> formats.hf -> checkpoint was one: what both need (ModelFileError) now lives below both."""
    cycle = find_cycle(import_graph())
    assert cycle is None, f"an import circle: {' -> '.join(cycle)}"


@pytest.mark.parametrize("entry", ["cllm", "cllm.tools.train_model", "cllm.sync_model", "cllm.openai_format"])
def test_the_library_and_the_training_cli_do_not_load_the_serving_engine(entry):
    loaded = subprocess.run([sys.executable, "-c", f"import sys, {entry}; print(sorted(sys.modules))"],
                            capture_output=True, text=True, check=True).stdout
    assert "'cllm.serving'" not in loaded


def test_the_serving_engine_is_still_where_callers_find_it():
    from cllm import AsyncModel, EngineStalled, Overloaded
    from cllm.generate import Completion
    from cllm.serving import AsyncModel as served
    from cllm.serving import Completion as served_completion

    assert AsyncModel is served and served_completion is Completion
    assert {EngineStalled.__module__, Overloaded.__module__} == {"cllm.serving"}
    assert {"AsyncModel", "EngineStalled", "Overloaded"} <= set(dir(cllm))
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = cllm.no_such_name
