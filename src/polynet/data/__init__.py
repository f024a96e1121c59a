"""Data: the data sets (:mod:`.datasets`) and the paper's transforms (:mod:`.transforms`)."""

from polynet.data.datasets import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_ENV,
    INSTALL_HINT,
    MAX_IMAGE_PIXELS,
    MIN_IMAGE_SIDE,
    FashionMNIST,
    ImageFolder,
    UnreadableImageError,
    build_dataset,
    fashion_mnist_dir,
    read_image,
)
from polynet.data.transforms import MatchChannels, eval_transform, train_transform

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_ENV",
    "INSTALL_HINT",
    "MAX_IMAGE_PIXELS",
    "MIN_IMAGE_SIDE",
    "FashionMNIST",
    "ImageFolder",
    "MatchChannels",
    "UnreadableImageError",
    "build_dataset",
    "eval_transform",
    "fashion_mnist_dir",
    "read_image",
    "train_transform",
]
