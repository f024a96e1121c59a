"""Training: the paper's recipe (RMSProp, step decay, stochastic paths) on real data.

See :func:`polynet.training.train` for the entry point and :class:`TrainConfig` for the settings.
"""

from polynet.training.config import (
    PRESETS,
    TrainConfig,
    build_config,
    defines_run,
    load_yaml,
    run_identity,
)
from polynet.training.loop import TrainingDiverged, TrainResult, train
from polynet.training.recipe import build_optimizer, build_scheduler, lr_factor

__all__ = [
    "PRESETS",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "build_config",
    "build_optimizer",
    "build_scheduler",
    "load_yaml",
    "lr_factor",
    "defines_run",
    "run_identity",
    "train",
]
