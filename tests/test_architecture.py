"""The layers of docs/architecture.md, enforced: fewstep's import graph (built with ``ast``, every import counted,
those inside functions too) has no cycle and no arrow that points up a layer; no function grows past 100 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
NOT_PACKAGE = {"tests", "workflows", "docs", ".venv", "build", "dist", ".git"}
MAX_FUNCTION_LINES = 100
# diffusers' pipeline __call__ reads as one numbered script (the style fewstep follows), so the two pipelines' own
# __call__ are the exception.
LONG_FUNCTIONS_ALLOWED = {("pipelines/fewstep_sd.py", "__call__"), ("pipelines/fewstep_sdxl.py", "__call__")}


def package_files() -> dict[str, Path]:
    """Module name (``fewstep.training.loop.trainer``) → file, for every module of the package."""
    modules = {}
    for path in PACKAGE_ROOT.rglob("*.py"):
        relative = path.relative_to(PACKAGE_ROOT)
        if relative.parts[0] in NOT_PACKAGE or any(part.startswith(".") for part in relative.parts):
            continue
        parts = list(relative.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(["fewstep", *parts])] = path
    return modules


def imported_modules(module: str, path: Path, known: set[str]) -> set[str]:
    """The fewstep modules ``module`` imports (a name imported from a package counts as its submodule if it is one)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                if f"{target}.{alias.name}" in known:
                    found.add(f"{target}.{alias.name}")
                elif target in known:
                    found.add(target)
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    files = package_files()
    return {module: imported_modules(module, path, set(files)) for module, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def in_layer(module: str, *layers: str) -> bool:
    return any(module == f"fewstep.{layer}" or module.startswith(f"fewstep.{layer}.") for layer in layers)


# (what imports, what it may not import, why)
FORBIDDEN = [
    (("core",), lambda target: not in_layer(target, "core"), "the math layer imports nothing else of fewstep"),
    (("pipelines",), lambda target: not in_layer(target, "core", "pipelines"),
     "pipelines import only core/ (a pushed Hub repo carries them without fewstep)"),
    (("nodes",), lambda target: not in_layer(target, "core", "nodes"),
     "ComfyUI nodes import only core/ (the pack loads without the training dependencies)"),
    (("training",), lambda target: in_layer(target, "commands", "cli", "benchmarks", "digits", "toy"),
     "the trainer is a library: it never reaches a front end, a benchmark or the embedded default"),
    (("digits", "toy"), lambda target: in_layer(target, "commands", "cli", "benchmarks"),
     "the embedded defaults never reach the command line or the benchmarks"),
]  # fmt: skip


def test_the_import_graph_sees_known_arrows():
    graph = import_graph()
    assert "fewstep.core.schedule" in graph["fewstep.core.sampling"]
    assert "fewstep.training.loop.trainer" in graph["fewstep.training.methods.dmd2"]
    assert "fewstep.training.loop.interrupts" in graph["fewstep.cli"]  # a relative import at module level
    assert "fewstep.nodes.comfy_nodes" in graph["fewstep"]  # an import inside a function


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_fewstep_has_no_import_cycles():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("importers, forbidden, why", FORBIDDEN, ids=[" ".join(rule[0]) for rule in FORBIDDEN])
def test_no_import_points_up_a_layer(importers, forbidden, why):
    bad = sorted(
        f"{module} → {target}"
        for module, targets in import_graph().items()
        if in_layer(module, *importers)
        for target in targets
        if forbidden(target)
    )
    assert bad == [], why


def test_file_format_constants_live_where_trainer_and_pipelines_can_both_import_them():
    from fewstep.core import lora_format
    from fewstep.pipelines import common
    from fewstep.training.publish import lora_files

    for name in ("DIFFUSERS_LORA_WEIGHT_NAME", "KOHYA_WEIGHT_NAME", "RECIPE_FILE", "lora_family_of_state_dict"):
        assert getattr(common, name) is getattr(lora_format, name) is getattr(lora_files, name)


def test_no_function_is_over_100_lines():
    long = []
    for path in package_files().values():
        relative = path.relative_to(PACKAGE_ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and (relative, node.name) not in LONG_FUNCTIONS_ALLOWED:
                    long.append(f"{relative}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


def unresolved_imports() -> list[str]:
    """``module: target`` for every fewstep import (inside functions too) that names no module of the package: an
    import that only fails when its function runs (a benchmark, a rarely used command)."""
    files = package_files()
    known = set(files)
    missing = []
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            if target not in known:
                missing.append(f"{module}: {target}")
    return sorted(missing)


def test_every_relative_import_names_a_module_of_the_package():
    assert unresolved_imports() == []
