"""fewstep's ComfyUI node pack (V3 schema), loaded through ``comfy_entrypoint`` in the repository root.

- ``sigma_space``: the adapter between ComfyUI's sigma space and ``fewstep.core``'s x_t space (no ComfyUI import);
- ``comfyui_support``: which ComfyUI versions the pack supports (no ComfyUI import);
- ``comfy_sampling``: the FewStep KSAMPLER and the Distillation++ GUIDER inside ComfyUI's sampling machinery;
- ``comfy_nodes``: the nodes (FewStep Scheduler / Sampler / KSampler, Distillation++ Guider / KSampler).

Importing this package imports nothing from ComfyUI; only the entry point imports the ``comfy_*`` modules.
"""
