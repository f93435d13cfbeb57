"""The code a pushed Hub repo carries, so that ``custom_pipeline="USER/NAME"`` works without fewstep installed.

The family's pipeline file becomes ``pipeline.py``; every fewstep module it needs (transitively: the math layer's
schedule, sampling and Distillation++, the pipelines' shared helpers, the LoRA file helpers) is copied next to it
as ``fewstep_<module>.py``, and each ``fewstep`` import is rewritten into a relative one
(``from .fewstep_schedule import NoiseSchedule``). diffusers fetches the modules a Hub pipeline file imports
relatively from the same repo. The source of truth stays in this package: the copies exist only in the pushed
folder, written at push time.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "fewstep"
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
PIPELINE_MODULES = {"sd15": "fewstep.pipelines.fewstep_sd", "sdxl": "fewstep.pipelines.fewstep_sdxl"}
PUSHED_PIPELINE_FILE = "pipeline.py"


def _source_file(module: str) -> Path:
    path = PACKAGE_ROOT.joinpath(*module.split(".")[1:]).with_suffix(".py")
    if not path.is_file():  # a package (``__init__``) would drag in everything it re-exports
        raise RuntimeError(f"pushed code must import fewstep modules, not packages: {module}")
    return path


def _fewstep_imports(module: str, tree: ast.Module) -> list[tuple[ast.ImportFrom, str]]:
    """``from fewstep.x.y import ...`` and ``from ..x.y import ...`` statements, with the absolute module."""
    package = module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == PACKAGE for a in node.names):
            raise RuntimeError(f"{module}: write `from fewstep.x import name`, not `import fewstep.x`")
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        if target.split(".")[0] == PACKAGE:
            found.append((node, target))
    return found


def copied_name(module: str) -> str:
    """The flat module name of a fewstep module inside the pushed repo: ``fewstep.core.schedule`` → ``fewstep_schedule``."""
    return f"{PACKAGE}_{module.rsplit('.', 1)[-1]}"


def _import_line(node: ast.ImportFrom, target: str, indent: str) -> str:
    names = [a.name if a.asname is None else f"{a.name} as {a.asname}" for a in node.names]
    head = f"{indent}from .{copied_name(target)} import "
    if len(head) + len(", ".join(names)) <= 110:
        return head + ", ".join(names)
    return head + "(\n" + "".join(f"{indent}    {name},\n" for name in names) + f"{indent})"


def _rewrite(module: str, text: str, tree: ast.Module) -> str:
    lines = text.splitlines()
    for node, target in sorted(_fewstep_imports(module, tree), key=lambda item: -item[0].lineno):
        indent = lines[node.lineno - 1][: node.col_offset]
        lines[node.lineno - 1 : node.end_lineno] = _import_line(node, target, indent).splitlines()
    return "\n".join(lines) + "\n"


def _header(module: str) -> str:
    relative = _source_file(module).relative_to(PACKAGE_ROOT).as_posix()
    return f"# Copied by `fewstep push` from fewstep's {relative}, with its fewstep imports made relative.\n"


def pushed_code(family: str) -> dict[str, str]:
    """File name → text of every code file the pushed repo of a ``family`` run holds (``pipeline.py`` first)."""
    root = PIPELINE_MODULES[family]
    modules, queue = [root], [root]
    while queue:
        module = queue.pop()
        tree = ast.parse(_source_file(module).read_text(encoding="utf-8"))
        for _, target in _fewstep_imports(module, tree):
            if target not in modules:
                _source_file(target)
                modules.append(target)
                queue.append(target)
    names = [copied_name(m) for m in modules[1:]]
    if len(set(names)) != len(names):
        raise RuntimeError(f"two fewstep modules would be copied under one name: {sorted(names)}")
    files = {}
    for module in modules:
        text = _source_file(module).read_text(encoding="utf-8")
        rewritten = _rewrite(module, text, ast.parse(text))
        if module == root:
            rewritten = _import_every_copy(rewritten, modules[1:])
            files[PUSHED_PIPELINE_FILE] = _header(module) + rewritten
        else:
            files[f"{copied_name(module)}.py"] = _header(module) + rewritten
    return files


def _import_every_copy(text: str, modules: list[str]) -> str:
    """diffusers copies only the modules that a *local* pipeline file imports itself (a Hub repo's are followed
    recursively), so ``pipeline.py`` names every copied module; the ones it does not use are imported for that."""
    tree = ast.parse(text)
    imported = {node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.level == 1}
    missing = [copied_name(m) for m in modules if copied_name(m) not in imported]
    if not missing:
        return text
    last = max(node.end_lineno for node in tree.body if isinstance(node, ast.ImportFrom) and node.level == 1)
    lines = text.splitlines()
    extra = [
        "# diffusers copies only the modules a local pipeline file imports itself; these are used by the ones above",
        *(f"from .{name} import __name__ as _{name}  # noqa: F401" for name in missing),
    ]
    lines[last:last] = extra
    return "\n".join(lines) + "\n"


def write_pushed_code(family: str, folder: str | Path) -> list[Path]:
    """Write ``pipeline.py`` and its copied fewstep modules into the upload ``folder``."""
    written = []
    for name, text in pushed_code(family).items():
        path = Path(folder) / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
