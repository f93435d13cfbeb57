"""fewstep: turn Stable Diffusion models into one-step and few-step generators.

This file is both the Python package root and the entry point ComfyUI imports when the repository sits in
``custom_nodes/``. Keep it cheap: no diffusers, transformers or ComfyUI imports at import time.
"""

import sys

__version__ = "0.1.0"


async def comfy_entrypoint():
    """ComfyUI's V3 node-pack entry point: the FewStep and Distillation++ nodes (``nodes/comfy_nodes.py``)."""
    import comfyui_version  # ComfyUI's own top-level module

    from .nodes.comfyui_support import comfyui_version_problem

    problem = comfyui_version_problem(comfyui_version.__version__)
    if problem:
        raise RuntimeError(problem)
    from .nodes.comfy_nodes import FewStepExtension

    return FewStepExtension()


def _warn_old_comfyui() -> None:
    """ComfyUI releases without the V3 node API skip this pack with a vague message; say what to do instead."""
    comfyui = sys.modules.get("comfyui_version")  # set only inside a running ComfyUI; never imported here
    if comfyui is not None:
        from .nodes.comfyui_support import comfyui_version_problem

        problem = comfyui_version_problem(getattr(comfyui, "__version__", None))
        if problem:
            import logging

            logging.error(problem)


_warn_old_comfyui()
