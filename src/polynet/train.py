"""Python API for training (the ``polynet train`` command calls the same function).

Example::

    from polynet.train import train
    result = train(preset="fashion-mnist", out="runs/fmnist")
    print(result.final_top1)

The implementation lives in :mod:`polynet.training` (config, recipe, batches, loop,
distributed).
"""

from polynet.training import (
    PRESETS,
    TrainConfig,
    TrainingDiverged,
    TrainResult,
    build_config,
    train,
)

__all__ = ["PRESETS", "TrainConfig", "TrainResult", "TrainingDiverged", "build_config", "train"]
