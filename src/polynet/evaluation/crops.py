"""The paper's multi-crop geometry: 3 squares x (4 corners, centre, whole) x mirror per scale.

PolyNet (section 5) evaluates "as described in GoogLeNet": for each scale the image's shorter
side is resized to the scale; the left, centre and right squares (top, centre and bottom for a
portrait image) are taken; from each square the four corner crops and the centre crop at the
model's input size, plus the whole square resized to the input size; and the horizontal mirror
of each of these. That is 3 x 6 x 2 = 36 crops per scale.

The geometry is defined once, by :func:`multi_crop_boxes`; :func:`multi_crop` cuts a resized
image tensor along those boxes as one batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from polynet.data import MatchChannels

CROPS_PER_SCALE = 36
DEFAULT_NUM_SCALES = 8
# Shorter-side scales relative to the input size: 16/14 ... 23/14 (1.14x ... 1.64x). With a
# 224 px input this gives 256, 272, ..., 368, covering GoogLeNet's 256/288/320/352; with the
# released 331 px model the first scale is its 378 px single-crop resize; with 28 px
# Fashion-MNIST models 32, 34, ..., 46.
DEFAULT_SCALE_RATIOS = tuple((16 + i) / 14 for i in range(DEFAULT_NUM_SCALES))
POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right", "centre", "whole")


@dataclass(frozen=True)
class CropBox:
    """One crop, in pixel coordinates of the image resized to the scale.

    Attributes:
        top: First row.
        left: First column.
        height: Rows covered (the input size, or the square's side for ``"whole"``).
        width: Columns covered.
        square: ``"left"``, ``"centre"`` or ``"right"`` (landscape or square images) or
            ``"top"``, ``"centre"`` or ``"bottom"`` (portrait images).
        position: One of ``top-left``, ``top-right``, ``bottom-left``, ``bottom-right``,
            ``centre`` and ``whole`` (the square resized to the input size).
        mirrored: Whether the crop is flipped left-right after cutting.

    """

    top: int
    left: int
    height: int
    width: int
    square: str
    position: str
    mirrored: bool


def default_scales(input_size: int, count: int = DEFAULT_NUM_SCALES) -> tuple[int, ...]:
    """Return the default multi-crop scales (shorter-side lengths) for an input size.

    The paper uses 8 scales without listing them; these are ``round(input_size * r)`` for
    ``r`` in 16/14, 17/14, ..., 23/14 (see :data:`DEFAULT_SCALE_RATIOS`).

    Args:
        input_size: The model's square input side.
        count: How many scales, at most 8.

    """
    if not 1 <= count <= DEFAULT_NUM_SCALES:
        raise ValueError(f"count must be in 1..{DEFAULT_NUM_SCALES}, got {count}")
    return tuple(round(input_size * r) for r in DEFAULT_SCALE_RATIOS[:count])


def check_scales(scales: Sequence[int], input_size: int) -> tuple[int, ...]:
    """Validate multi-crop scales: integers no smaller than the input size, no repeats."""
    scales = tuple(int(s) for s in scales)
    if not scales:
        raise ValueError("give at least one multi-crop scale")
    too_small = [s for s in scales if s < input_size]
    if too_small:
        raise ValueError(
            f"multi-crop scales {too_small} are smaller than the model's {input_size} px "
            f"input; use scales of at least {input_size}"
        )
    if len(set(scales)) != len(scales):
        raise ValueError(f"multi-crop scales repeat a value: {list(scales)}")
    return scales


def _centre_offset(outer: int, inner: int) -> int:
    # The same rounding as torchvision's center_crop, so the centre crop of a square is the
    # crop a single-crop centre protocol takes.
    return int(round((outer - inner) / 2.0))


def multi_crop_boxes(height: int, width: int, input_size: int) -> list[CropBox]:
    """Return the 36 crop boxes of one scale, for an image already resized to that scale.

    Order: the 18 unmirrored crops (square by square, in :data:`POSITIONS` order within each
    square), then their 18 mirrors in the same order.

    Args:
        height: Rows of the resized image.
        width: Columns of the resized image (``min(height, width)`` is the scale).
        input_size: The model's square input side; at most the shorter side.

    """
    side = min(height, width)
    if input_size > side:
        raise ValueError(
            f"cannot cut {input_size} px crops from a {height}x{width} image; resize its "
            f"shorter side to at least {input_size}"
        )
    spare = max(height, width) - side
    portrait = height > width
    names = ("top", "centre", "bottom") if portrait else ("left", "centre", "right")
    offsets = (0, _centre_offset(spare, 0), spare)
    far, mid = side - input_size, _centre_offset(side, input_size)
    corners = {
        "top-left": (0, 0),
        "top-right": (0, far),
        "bottom-left": (far, 0),
        "bottom-right": (far, far),
        "centre": (mid, mid),
    }
    boxes = []
    for mirrored in (False, True):
        for name, offset in zip(names, offsets, strict=True):
            top0, left0 = (offset, 0) if portrait else (0, offset)
            for position in POSITIONS:
                if position == "whole":
                    boxes.append(CropBox(top0, left0, side, side, name, position, mirrored))
                else:
                    dy, dx = corners[position]
                    box = CropBox(
                        top0 + dy, left0 + dx, input_size, input_size, name, position, mirrored
                    )
                    boxes.append(box)
    return boxes


def distinct_crops(boxes: Sequence[CropBox]) -> tuple[list[int], list[int]]:
    """Find crops that cover the same pixels, so each is evaluated only once.

    On a square image the left, centre and right squares coincide, so only 12 of the 36 crops
    differ; the model's scores are identical for the copies, and pooling over the expanded
    scores gives exactly the result of evaluating all 36.

    Args:
        boxes: The boxes of one scale.

    Returns:
        ``keep``, the index of the first box of each distinct crop, and ``inverse``, for every
        box the position of its crop in ``keep`` (so ``scores[inverse]`` restores all boxes).

    """
    first: dict[tuple[int, int, int, int, bool], int] = {}
    keep, inverse = [], []
    for i, box in enumerate(boxes):
        key = (box.top, box.left, box.height, box.width, box.mirrored)
        if key not in first:
            first[key] = len(keep)
            keep.append(i)
        inverse.append(first[key])
    return keep, inverse


def multi_crop(
    image: torch.Tensor,
    input_size: int,
    interpolation: InterpolationMode = InterpolationMode.BILINEAR,
) -> torch.Tensor:
    """Cut the 36 crops of :func:`multi_crop_boxes` from an image resized to one scale.

    Args:
        image: A float image ``(C, H, W)`` whose shorter side is the scale.
        input_size: The model's square input side.
        interpolation: How whole squares are resized to the input size.

    Returns:
        The crops, ``(36, C, input_size, input_size)``, in :func:`multi_crop_boxes` order.

    """
    if image.ndim != 3:
        raise ValueError(f"expected one image (C, H, W), got shape {tuple(image.shape)}")
    boxes = multi_crop_boxes(image.shape[-2], image.shape[-1], input_size)[: CROPS_PER_SCALE // 2]
    cut = [image[:, b.top : b.top + b.height, b.left : b.left + b.width] for b in boxes]
    whole = [i for i, b in enumerate(boxes) if b.position == "whole"]
    # The three whole squares are resized together, as one batch.
    resized = TF.resize(
        torch.stack([cut[i] for i in whole]),
        [input_size, input_size],
        interpolation,
        antialias=True,
    )
    for i, square in zip(whole, resized, strict=True):
        cut[i] = square
    crops = torch.stack(cut)
    return torch.cat([crops, crops.flip(-1)])


class MultiScaleResize:
    """PIL image -> one ``uint8`` tensor per scale, shorter side resized to the scale.

    Runs in data-loader workers, so the images a batch carries are already small: memory per
    image is bounded by the scales, not by the original resolution. Very large images are
    first box-reduced (fast, integer factor) to no less than twice the largest scale.

    Args:
        scales: Shorter-side lengths.
        in_chans: Channels the model expects (1 or 3).
        interpolation: Resize filter.

    """

    def __init__(
        self,
        scales: Sequence[int],
        in_chans: int = 3,
        interpolation: InterpolationMode = InterpolationMode.BILINEAR,
    ) -> None:
        self.scales = tuple(scales)
        self.match_channels = MatchChannels(in_chans)
        self.interpolation = interpolation

    def __call__(self, image: Image.Image | torch.Tensor) -> list[torch.Tensor]:
        """Resize one image to every scale."""
        if not isinstance(image, Image.Image):
            image = TF.to_pil_image(image)
        image = self.match_channels(image)
        factor = min(image.size) // (2 * max(self.scales))
        if factor >= 2:
            image = image.reduce(factor)
        return [
            TF.pil_to_tensor(TF.resize(image, [s], self.interpolation, antialias=True))
            for s in self.scales
        ]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(scales={list(self.scales)}, {self.match_channels}, "
            f"interpolation={self.interpolation.value})"
        )
