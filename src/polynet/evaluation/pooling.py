"""Top-k pooling of crop scores: the paper's way of combining multi-crop predictions."""

from __future__ import annotations

import math
from typing import Literal

import torch

ScoreType = Literal["softmax", "logits"]
SCORE_TYPES: tuple[str, ...] = ("softmax", "logits")
DEFAULT_TOP_FRACTION = 0.3


def crop_scores(logits: torch.Tensor, score: ScoreType = "softmax") -> torch.Tensor:
    """Turn a model's logits ``(..., classes)`` into the scores that are pooled."""
    if score == "softmax":
        return logits.float().softmax(dim=-1)
    if score == "logits":
        return logits.float()
    raise ValueError(f"score must be one of {', '.join(SCORE_TYPES)}, got {score!r}")


def pooled_count(num_crops: int, fraction: float) -> int:
    """How many crops top-k pooling averages: ``ceil(fraction * num_crops)``, at least 1.

    With the paper's 30 % of 36 crops this is 11.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"top fraction must be in (0, 1], got {fraction}")
    # The small tolerance keeps exact fractions exact (e.g. 0.25 of 36 is 9, not 10).
    return max(1, math.ceil(fraction * num_crops - 1e-9))


def top_k_pool(
    scores: torch.Tensor, fraction: float = DEFAULT_TOP_FRACTION, dim: int = -2
) -> torch.Tensor:
    """For each class independently, the mean of its highest ``fraction`` of crop scores.

    Args:
        scores: Crop scores, e.g. ``(crops, classes)`` or ``(images, crops, classes)``.
        fraction: Share of crops averaged, in (0, 1]; 1 is plain averaging.
        dim: The crop dimension, reduced away.

    Returns:
        ``scores`` with ``dim`` removed.

    """
    k = pooled_count(scores.shape[dim], fraction)
    return scores.topk(k, dim=dim).values.mean(dim=dim)


def pool_multi_scale(scores: torch.Tensor, fraction: float = DEFAULT_TOP_FRACTION) -> torch.Tensor:
    """Top-k pool within each scale, then average over scales.

    Args:
        scores: Crop scores ``(..., scales, crops, classes)``.
        fraction: Share of crops averaged within a scale.

    Returns:
        Image scores ``(..., classes)``.

    """
    if scores.ndim < 3:
        raise ValueError(f"expected (..., scales, crops, classes), got {tuple(scores.shape)}")
    return top_k_pool(scores, fraction, dim=-2).mean(dim=-2)
