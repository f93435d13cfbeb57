"""The distillation methods, side by side, and the registry that names them. Each module says only what is
particular to its method.

- ``dmd2``: DMD2 (Yin et al. 2024): distribution matching + two-time-scale fake score + optional GAN.
- ``dmd``: DMD (Yin et al. 2023): distribution matching + regression on teacher ODE pairs.
- ``progressive``: Progressive Distillation (Salimans & Ho 2022): rounds that halve the step count.

Everything they share (teacher loading, caches, accelerate, adapters, checkpoints and resume, EMA, validation,
export, progress, NaN handling) is in :mod:`fewstep.training.loop.trainer`. A new method is one class (a
:class:`~.base.Method`) and one :func:`register_method` call: ``fewstep train``, ``fewstep demo`` and the model
card read everything else from the class.
"""

from __future__ import annotations

import functools

from .base import Method


@functools.cache
def _registry() -> dict[str, type]:
    """--method KEY → class, in the order of ``--help``: built on first use with the built-ins (imported here, not
    above, so that importing this package stays cheap), then added to by :func:`register_method`."""
    from .dmd import DMD
    from .dmd2 import DMD2
    from .progressive import Progressive

    return {cls.key: cls for cls in (DMD2, DMD, Progressive)}


def register_method(cls: type) -> type:
    """Make ``cls`` (a :class:`~.base.Method` subclass) ``fewstep train --method cls.key``; usable as a decorator."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"register_method({cls!r}): give a subclass of fewstep.training.methods.base.Method")
    methods = _registry()
    if cls.key in methods:
        raise ValueError(f"a method {cls.key!r} is already registered ({methods[cls.key].__qualname__})")
    methods[cls.key] = cls
    return cls


def unregister_method(key: str) -> None:
    """Forget the method registered as ``key``."""
    del _registry()[key]


def registered_methods() -> dict[str, type]:
    """--method KEY → method class, in registration order (dmd2, dmd, progressive, then any added)."""
    return dict(_registry())


def method_names() -> tuple[str, ...]:
    """The ``--method`` choices, in registration order (dmd2, dmd, progressive, then any added)."""
    return tuple(_registry())


def method_class(name: str) -> type:
    """The class of the method called ``name``; its ``config_class`` holds its options."""
    methods = _registry()
    if name not in methods:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(methods)}")
    return methods[name]


def get_method(name: str):
    """The method called ``name`` (``fewstep train --method NAME``), ready for the trainer."""
    return method_class(name)()
