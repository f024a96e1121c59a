"""Classify images with a trained model: its evaluation preprocessing, top-k labels.

For 1000-class models the labels are ImageNet's class names (timm ships them); for other
models they are the names a weights file records, or class indices.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from timm.data import ImageNetInfo
from torch import nn

from polynet.data import eval_transform, read_image
from polynet.devices import resolve_precision
from polynet.inference.fuse import inference_model

IMAGENET_CLASSES = 1000
CALIBRATION_IMAGES = 16  # int8: at least this many of the given images set activation ranges


@dataclass(frozen=True)
class Prediction:
    """One of an image's top-k classes."""

    index: int
    label: str
    probability: float


def class_labels(num_classes: int, names: Sequence[str] | None = None) -> list[str]:
    """Return a readable label per class: given names, ImageNet's, or ``class <i>``."""
    if names is not None:
        if len(names) != num_classes:
            raise ValueError(f"{len(names)} class names for a {num_classes}-class model")
        return list(names)
    if num_classes == IMAGENET_CLASSES:
        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(num_classes)]
    return [f"class {i}" for i in range(num_classes)]


@torch.no_grad()
def predict(
    model: nn.Module,
    images: Sequence[str | os.PathLike],
    top_k: int = 5,
    labels: Sequence[str] | None = None,
    batch_size: int = 8,
    precision: str = "fp32",
    runtime: str = "torch",
) -> list[list[Prediction]]:
    """Top-k classes of each image, preprocessed as the model's ``pretrained_cfg`` says.

    Args:
        model: A classifier with a ``pretrained_cfg`` (e.g. from
            :func:`polynet.io.loading.load_model`).
        images: Image files (any format PIL reads).
        top_k: Classes per image (at most the number of classes).
        labels: Class names; by default :func:`class_labels`.
        batch_size: Images per forward pass.
        precision: ``"fp32"`` (the model as it is), ``"bf16"`` or ``"int8"`` (the model's
            inference copy, see :func:`polynet.inference.fuse.inference_model`; int8 is calibrated
            on the
            first ``2 * batch_size`` images given, at least 16 when there are that many), or
            ``"auto"`` (:func:`polynet.devices.default_precision` of the model's device).
        runtime: ``"torch"`` or ``"onnxruntime"`` (the inference copy exported to ONNX and run
            by ONNX Runtime on the CPU; see :func:`polynet.inference.fuse.optimize_for_inference`).

    Returns:
        For each image, its ``top_k`` predictions, most probable first.

    Raises:
        ValueError: For an unreadable image or a ``top_k`` out of range.

    """
    num_classes = model.num_classes
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    top_k = min(top_k, num_classes)
    labels = class_labels(num_classes, labels)
    transform = eval_transform(model.pretrained_cfg)
    model.eval()
    device = next(model.parameters()).device
    precision = resolve_precision(precision, device, runtime)
    runner = model
    if precision != "fp32" or runtime != "torch":
        calibration = None
        if precision == "int8":
            count = max(2 * batch_size, CALIBRATION_IMAGES)
            images_in = [transform(read_image(p)) for p in images[:count]]
            calibration = [
                torch.stack(images_in[i : i + batch_size])
                for i in range(0, len(images_in), batch_size)
            ]
        runner = inference_model(model, precision, calibration, runtime=runtime)
    results: list[list[Prediction]] = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([transform(read_image(p)) for p in images[start : start + batch_size]])
        probs = runner(batch.to(device)).float().softmax(dim=-1).cpu()
        top = probs.topk(top_k, dim=-1)
        for values, indices in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            results.append(
                [Prediction(i, labels[i], p) for p, i in zip(values, indices, strict=True)]
            )
    return results
