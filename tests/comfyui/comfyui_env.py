"""Set up an in-process ComfyUI from ``COMFYUI_PATH`` for the integration tests (skipped when it is unset).

The fewstep repository is loaded the way users install it: as a folder in ``custom_nodes/`` (a symlink here).
"""

from __future__ import annotations

import asyncio
import atexit
import importlib.machinery
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import types
from contextlib import contextmanager
from pathlib import Path

import pytest

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
SKIP_REASON = (
    "COMFYUI_PATH is not set: the ComfyUI integration tests need a ComfyUI checkout "
    "(run COMFYUI_PATH=/path/to/ComfyUI pytest tests/comfyui)"
)
REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_NODE_IDS = (
    "FewStepScheduler", "FewStepSampler", "FewStepKSampler", "DistillationPPGuider", "DistillationPPKSampler"
)  # fmt: skip

_state: dict = {}


@contextmanager
def _torchvision_stand_in():
    """ComfyUI imports torchvision at import time (Stable Cascade, Cosmos), but no torchvision wheel matches the
    CPU torch of this test environment; SD1.5/SDXL never call it. An empty stand-in lets ComfyUI import, and is
    removed again so that transformers and diffusers, which check for torchvision, still see it as absent."""
    if importlib.util.find_spec("torchvision") is not None:
        yield
        return
    names = ("torchvision", "torchvision.transforms", "torchvision.models")
    for name in names:
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        sys.modules[name] = module
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    sys.modules["torchvision"].models = sys.modules["torchvision.models"]
    try:
        yield
    finally:
        for name in names:
            sys.modules.pop(name, None)


def _start_comfyui(work: Path):
    """Import ComfyUI on the CPU with its folders under ``work`` and load its nodes, fewstep's included."""
    from comfy.cli_args import args

    args.cpu = True
    import folder_paths
    import utils.extra_config  # noqa: F401  (main.py imports ComfyUI's utils package before nodes.py shadows it)

    (work / "custom_nodes").mkdir()
    (work / "custom_nodes" / "fewstep").symlink_to(REPO_ROOT, target_is_directory=True)
    folder_paths.folder_names_and_paths["custom_nodes"] = ([str(work / "custom_nodes")], set())
    (work / "models" / "loras").mkdir(parents=True)
    folder_paths.add_model_folder_path("loras", str(work / "models" / "loras"), is_default=True)
    folder_paths.set_output_directory(str(work / "output"))
    folder_paths.set_temp_directory(str(work / "temp"))
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    return nodes


def require_comfyui() -> dict:
    """Skip the calling test module without COMFYUI_PATH; else start ComfyUI once (CPU) with fewstep loaded.

    Returns ``nodes`` (ComfyUI's nodes module), ``custom_nodes_dir`` (holding the ``fewstep`` link), ``loras_dir``
    (LoraLoader's folder) and ``output_dir`` (SaveImage's).
    """
    if not COMFYUI_PATH:
        pytest.skip(SKIP_REASON, allow_module_level=True)
    if _state:
        return _state
    import torch

    torch.set_num_threads(1)
    import diffusers  # noqa: F401  (they decide now, before the torchvision stand-in, that torchvision is absent)
    import transformers.image_utils  # noqa: F401

    sys.path.insert(0, str(Path(COMFYUI_PATH).resolve()))
    work = Path(tempfile.mkdtemp(prefix="fewstep-comfyui-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    with _torchvision_stand_in():
        nodes = _start_comfyui(work)
    _state.update(
        nodes=nodes,
        custom_nodes_dir=work / "custom_nodes",
        loras_dir=work / "models" / "loras",
        output_dir=work / "output",
    )
    return _state


@contextmanager
def captured_logs():
    """Collect the root logger's records while the block runs (ComfyUI logs through ``logging.warning``)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logging.getLogger().addHandler(handler)
    try:
        yield records
    finally:
        logging.getLogger().removeHandler(handler)
