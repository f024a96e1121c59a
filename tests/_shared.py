"""Constants and helpers shared by the training, data and reliability tests."""

import json

import pytest

import polynet.data

FASHION = polynet.data.fashion_mnist_dir()
needs_fashion = pytest.mark.skipif(
    not (FASHION / "train-images-idx3-ubyte.gz").is_file(), reason="dataset-fashion-mnist missing"
)
# A PolyNet small enough for a training step in milliseconds: 2-way, poly-2 and 2-way units.
TINY = dict(width_mult=0.03125, spec="A: 2-way | B: poly-2 | C: 2-way")


def cli_flags(values: dict) -> list[str]:
    """``polynet train`` flags for config values (``batch_size=8`` -> ``--batch-size 8``)."""
    argv = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, tuple):
            argv += [flag, *map(str, value)]
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        elif value is not None:
            argv += [flag, str(value)]
    return argv
