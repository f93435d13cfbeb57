"""fewstep: turn Stable Diffusion models into one-step and few-step generators.

This file is both the Python package root and the entry point ComfyUI imports when the repository sits in
``custom_nodes/``. Keep it cheap: no diffusers, transformers or ComfyUI imports at import time.
"""

__version__ = "0.1.0"
