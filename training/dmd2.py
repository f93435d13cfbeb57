"""``fewstep.training.dmd2``: the DMD2 entry points, kept at their original import path.

The method lives in :mod:`fewstep.training.methods.dmd2`, the trainer all methods share in
:mod:`fewstep.training.trainer`.
"""

from .methods.dmd2 import (  # noqa: F401  (re-exported)
    DMD2TrainConfig,
    check_option_combinations,
    effective_batch_warning,
    train_dmd2,
)
from .trainer import AdapterEMA, TrainingError, auto_mixed_precision, lr_factor  # noqa: F401  (re-exported)


def make_config(cli: dict, config_file: str | None = None) -> DMD2TrainConfig:
    """YAML then CLI (CLI wins); values typed and checked, unknown keys rejected."""
    from .trainer import make_config as make

    return make(DMD2TrainConfig, cli, config_file)
