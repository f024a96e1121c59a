"""Constants shared by the training, data and reliability tests."""

import pytest

import polynet.data

FASHION = polynet.data.fashion_mnist_dir()
needs_fashion = pytest.mark.skipif(
    not (FASHION / "train-images-idx3-ubyte.gz").is_file(), reason="dataset-fashion-mnist missing"
)
# A PolyNet small enough for a training step in milliseconds: 2-way, poly-2 and 2-way units.
TINY = dict(width_mult=0.03125, spec="A: 2-way | B: poly-2 | C: 2-way")
