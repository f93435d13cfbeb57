"""The distillation methods, side by side. Each module says only what is particular to its method.

- ``dmd2``: DMD2 (Yin et al. 2024): distribution matching + two-time-scale fake score + optional GAN.
- ``dmd``: DMD (Yin et al. 2023): distribution matching + regression on teacher ODE pairs.
- ``progressive``: Progressive Distillation (Salimans & Ho 2022): rounds that halve the step count.

Everything they share (teacher loading, caches, accelerate, adapters, checkpoints and resume, EMA, validation,
export, progress, NaN handling) is in :mod:`fewstep.training.loop.trainer`.
"""

METHOD_NAMES = ("dmd2", "dmd", "progressive")


def get_method(name: str):
    """The method called ``name`` (``fewstep train --method NAME``); its ``config_class`` holds its options."""
    if name == "dmd2":
        from .dmd2 import DMD2 as method
    elif name == "dmd":
        from .dmd import DMD as method
    elif name == "progressive":
        from .progressive import Progressive as method
    else:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHOD_NAMES)}")
    return method()
