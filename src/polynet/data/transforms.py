"""Transforms after the paper: random crops for training, a model's single crop for evaluation.

:func:`train_transform` is a random crop of 8-100 % of the area with aspect ratio 3/4-4/3,
bilinear resize, horizontal flip; :func:`eval_transform` is the resize and centre crop of a
model's ``pretrained_cfg``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image
from timm.data import resolve_data_config
from timm.data.transforms_factory import transforms_imagenet_eval
from torchvision import transforms as T


def _channels(cfg: dict[str, Any]) -> int:
    size = cfg.get("input_size", (3, 224, 224))
    return int(cfg.get("in_chans", size[0] if isinstance(size, Sequence) else 3))


def _image_size(cfg: dict[str, Any]) -> tuple[int, int]:
    size = cfg.get("input_size", 224)
    if isinstance(size, int):
        return size, size
    return int(size[-2]), int(size[-1])


class MatchChannels:
    """Convert images to the model's channel count.

    Grey to RGB repeats the channel; RGB to grey is Pillow's luma conversion.

    Args:
        in_chans: The model's input channels (1 or 3).

    """

    def __init__(self, in_chans: int) -> None:
        if in_chans not in (1, 3):
            raise ValueError(f"image transforms support 1 or 3 input channels, got {in_chans}")
        self.mode = "L" if in_chans == 1 else "RGB"

    def __call__(self, img: Image.Image) -> Image.Image:
        """Return ``img`` in mode ``"L"`` or ``"RGB"``."""
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r})"


def _stats(cfg: dict[str, Any], in_chans: int) -> tuple[list[float], list[float]]:
    mean, std = list(cfg.get("mean", (0.5,))), list(cfg.get("std", (0.5,)))
    if len(mean) != in_chans:  # e.g. single-channel statistics for a 3-channel model
        mean = [sum(mean) / len(mean)] * in_chans
        std = [sum(std) / len(std)] * in_chans
    return mean, std


def train_transform(cfg: dict[str, Any]) -> T.Compose:
    """Build the paper's training augmentation for a model or data config.

    Random crop of ``scale`` (default 8-100 %) of the area with aspect ratio ``ratio`` (default
    3/4-4/3), resized (bilinear) to ``input_size``, horizontal flip with probability ``hflip``
    (default 0.5), then tensor and normalisation. All randomness comes from torch's generator,
    so seeding torch makes it reproducible.

    Args:
        cfg: ``input_size`` (int or (C, H, W)), ``mean``, ``std``, optionally ``in_chans``,
            ``scale``, ``ratio``, ``hflip``, ``interpolation``.

    """
    in_chans = _channels(cfg)
    mean, std = _stats(cfg, in_chans)
    interpolation = T.InterpolationMode(cfg.get("interpolation", "bilinear"))
    steps = [
        MatchChannels(in_chans),
        T.RandomResizedCrop(
            _image_size(cfg),
            scale=tuple(cfg.get("scale", (0.08, 1.0))),
            ratio=tuple(cfg.get("ratio", (3 / 4, 4 / 3))),
            interpolation=interpolation,
        ),
    ]
    if cfg.get("hflip", 0.5) > 0:
        steps.append(T.RandomHorizontalFlip(cfg.get("hflip", 0.5)))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


def eval_transform(cfg: dict[str, Any]) -> T.Compose:
    """Build the evaluation transform of a ``pretrained_cfg`` (resize, centre crop, normalise).

    ``crop_mode`` ``"center"`` resizes the short side to ``size / crop_pct`` then centre-crops;
    ``"squash"`` resizes both sides to ``size / crop_pct`` (ignoring aspect) then centre-crops.

    Args:
        cfg: A ``pretrained_cfg`` or data config (``input_size``, ``crop_pct``, ``crop_mode``,
            ``interpolation``, ``mean``, ``std``).

    """
    data_cfg = resolve_data_config(pretrained_cfg=dict(cfg))
    in_chans = _channels(cfg)
    mean, std = _stats({**cfg, **data_cfg}, in_chans)
    size = _image_size(data_cfg)
    crop_pct = data_cfg.get("crop_pct") or 1.0
    # timm floors size / crop_pct; round it first so that 331 / (331 / 378) gives 378, not 377.
    crop_pct = size[0] / round(size[0] / crop_pct)
    timm_eval = transforms_imagenet_eval(
        img_size=size,
        crop_pct=crop_pct * (1 - 1e-9),
        crop_mode=data_cfg.get("crop_mode") or "center",
        interpolation=data_cfg.get("interpolation", "bilinear"),
        mean=tuple(mean),
        std=tuple(std),
    )
    return T.Compose([MatchChannels(in_chans), *timm_eval.transforms])
