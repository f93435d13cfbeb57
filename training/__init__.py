"""Training layer: DMD2 (model-agnostic loop + Stable Diffusion trainer), DMD and Progressive Distillation.

Nothing is imported here eagerly, so ``import fewstep.training.dmd2_loop`` stays free of diffusers.
"""
