"""The distillation methods, side by side. Each module says only what is particular to its method.

- ``dmd2``: DMD2 (Yin et al. 2024): distribution matching + two-time-scale fake score + optional GAN.
- ``dmd``: DMD (Yin et al. 2023): distribution matching + regression on teacher ODE pairs.
- ``progressive``: Progressive Distillation (Salimans & Ho 2022): rounds that halve the step count.

Everything they share (teacher loading, caches, accelerate, adapters, checkpoints and resume, EMA, validation,
export, progress, NaN handling) is in :mod:`fewstep.training.trainer`.
"""
