"""Classification metrics accumulated over batches: top-k counts and a confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from polynet.distributed import ProcessGroup

DEFAULT_TOPK = (1, 5)


def topk_correct(scores: torch.Tensor, targets: torch.Tensor, ks: Sequence[int]) -> list[int]:
    """Count the samples whose target is among the ``k`` highest scores, for each ``k``.

    Ties are broken by :func:`torch.topk`; ``k`` larger than the number of classes counts every
    sample as correct.

    Args:
        scores: Class scores (logits or probabilities), shape ``(N, num_classes)``.
        targets: True class indices, shape ``(N,)``.
        ks: The ``k`` values, e.g. ``(1, 5)``.

    Returns:
        One count per ``k``.

    """
    if scores.ndim != 2 or targets.shape != scores.shape[:1]:
        raise ValueError(
            f"expected scores (N, classes) and targets (N,), got {tuple(scores.shape)} and "
            f"{tuple(targets.shape)}"
        )
    max_k = min(max(ks), scores.shape[1])
    ranked = scores.topk(max_k, dim=1).indices  # (N, max_k), best first
    hits = ranked.eq(targets.to(ranked.device).unsqueeze(1))
    # A target appears at most once in a row, so the cumulative sum is 1 from its rank on.
    hit_by_rank = hits.cumsum(dim=1).clamp_(max=1).sum(dim=0)  # (max_k,)
    return [int(hit_by_rank[min(k, max_k) - 1]) for k in ks]


class ClassificationMetrics:
    """Running top-k counts and confusion matrix for single-label classification.

    Rows of the confusion matrix are true classes and columns are top-1 predictions. The
    state is three integer tensors, so it can be summed across processes
    (:meth:`all_reduce`) or across runs (:meth:`merge`).

    Args:
        num_classes: Number of classes.
        ks: The top-k values to count (1 must be included).

    """

    def __init__(self, num_classes: int, ks: Sequence[int] = DEFAULT_TOPK) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if 1 not in ks or min(ks) < 1:
            raise ValueError(f"ks must be positive and include 1, got {tuple(ks)}")
        self.num_classes = num_classes
        self.ks = tuple(ks)
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
        self.correct = torch.zeros(len(self.ks), dtype=torch.long)
        self.loss_sum = torch.zeros((), dtype=torch.float64)  # cross-entropy, where counted

    @property
    def count(self) -> int:
        """Number of samples seen."""
        return int(self.confusion.sum())

    def update(self, scores: torch.Tensor, targets: torch.Tensor, loss: bool = False) -> None:
        """Add a batch of class scores ``(N, num_classes)`` and true labels ``(N,)``.

        With ``loss``, the scores are logits and their summed cross-entropy is counted too.
        """
        if scores.shape[-1] != self.num_classes:
            raise ValueError(
                f"scores have {scores.shape[-1]} classes but the data set has "
                f"{self.num_classes}; evaluate a model trained on this data set"
            )
        scores, targets = scores.detach().cpu(), targets.detach().cpu().long()
        if loss:
            self.loss_sum += F.cross_entropy(scores.float(), targets, reduction="sum").double()
        self.correct += torch.tensor(topk_correct(scores, targets, self.ks))
        pairs = targets * self.num_classes + scores.argmax(dim=1)
        self.confusion += torch.bincount(pairs, minlength=self.num_classes**2).view_as(
            self.confusion
        )

    def merge(self, other: ClassificationMetrics) -> None:
        """Add the counts of another accumulator over the same classes."""
        if (other.num_classes, other.ks) != (self.num_classes, self.ks):
            raise ValueError("cannot merge metrics over different classes or k values")
        self.confusion += other.confusion
        self.correct += other.correct
        self.loss_sum += other.loss_sum

    def all_reduce(self, group: ProcessGroup) -> None:
        """Sum the counts over the processes of ``group``."""
        # float64 holds the integer counts exactly (up to 2**53 images).
        state = torch.cat([self.confusion.flatten(), self.correct, self.loss_sum.view(1)])
        state = group.all_sum(state.double()).cpu()
        n = self.num_classes**2
        self.confusion.copy_(state[:n].view_as(self.confusion).long())
        self.correct.copy_(state[n : n + len(self.ks)].long())
        self.loss_sum.copy_(state[-1])

    @property
    def mean_loss(self) -> float:
        """Mean cross-entropy over the counted samples (NaN when none was counted)."""
        n = self.count
        return float(self.loss_sum) / n if n else float("nan")

    def topk_accuracy(self) -> dict[int, float]:
        """Top-k accuracy (0-1) per ``k``; NaN when nothing was counted."""
        n = self.count
        counts = self.correct.tolist()
        return {k: (c / n if n else float("nan")) for k, c in zip(self.ks, counts, strict=True)}

    def per_class_accuracy(self) -> list[float | None]:
        """Top-1 accuracy of each true class; ``None`` for classes with no samples."""
        totals = self.confusion.sum(dim=1)
        return [
            int(self.confusion[i, i]) / int(totals[i]) if totals[i] else None
            for i in range(self.num_classes)
        ]

    def summary(self) -> dict[str, float | int]:
        """``images``, ``top{k}_accuracy`` and ``top{k}_error`` (in %) for each ``k``."""
        out: dict[str, float | int] = {"images": self.count}
        for k, acc in self.topk_accuracy().items():
            out[f"top{k}_accuracy"] = 100.0 * acc
            out[f"top{k}_error"] = 100.0 * (1.0 - acc)
        return out
