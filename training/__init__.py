"""Training layer: the shared trainer (``trainer``), the methods side by side (``methods/``: DMD2, DMD,
Progressive Distillation), DMD2's model-agnostic loop (``dmd2_loop``), teacher loading, adapters, data, LoRA files.

Nothing is imported here eagerly, so ``import fewstep.training.loop.dmd2_loop`` stays free of diffusers.
"""
