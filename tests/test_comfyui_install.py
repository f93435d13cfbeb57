"""Installing the node pack into a ComfyUI environment stays light: nothing for ComfyUI-Manager to pip-install
(it runs a pack's requirements.txt and install.py), and the nodes import only torch, ComfyUI and fewstep's own
pure-torch modules (checked statically over every import the entry point can reach, also inside functions)."""

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMFYUI_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "latent_preview", "comfyui_version",
                   "folder_paths", "node_helpers", "nodes"}  # fmt: skip
ALLOWED = COMFYUI_MODULES | {"torch"} | set(sys.stdlib_module_names)


def _file_of(module: str) -> Path:
    """A fewstep module's file (``fewstep.nodes.x`` → nodes/x.py; a package → its __init__.py)."""
    path = REPO.joinpath(*module.split(".")[1:])
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _reachable_imports(start: str) -> tuple[set[str], set[str]]:
    """fewstep modules reachable from ``start`` (with their parent packages) and the other top-level modules they
    import."""
    seen, external, queue = set(), set(), [start]
    while queue:
        module = queue.pop()
        parts = module.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            parent = ".".join(parts[:i])
            if parent not in seen:
                seen.add(parent)
                queue.append(parent)
        path = _file_of(module)
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                external.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [f"{target}.{a.name}" for a in node.names if _file_of(f"{target}.{a.name}").exists()]
                queue.extend(n for n in [target, *names] if n not in seen)
            elif isinstance(node, ast.ImportFrom):
                external.add(node.module.split(".")[0])
    return seen, external - {"fewstep", "__future__"}


def test_no_requirements_txt_or_install_py_for_comfyui_manager_to_run():
    assert not (REPO / "requirements.txt").exists() and not (REPO / "install.py").exists()


def test_the_node_pack_imports_only_torch_and_comfyui():
    modules, external = _reachable_imports("fewstep.nodes.comfy_nodes")
    assert "fewstep.nodes.comfy_sampling" in modules and "fewstep.core.schedule" in modules
    assert not any(m.startswith(("fewstep.training", "fewstep.pipelines")) for m in modules)
    assert external <= ALLOWED, sorted(external - ALLOWED)
