"""Evaluation batches: the one reader of images for evaluation, its collate and its shortcut.

Items that cannot be read become :class:`Unreadable` markers that travel with their batch, so a
bad file is reported and skipped, never fatal. A data set held in memory as a ``uint8`` tensor
at the model's input size (Fashion-MNIST at 28 px) is normalised a whole batch at a time: its
single-crop transform resizes and crops nothing, so the tensors are the same (tested) without
per-image PIL work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from polynet.data import UnreadableImageError, eval_transform


@dataclass
class Unreadable:
    """An item that could not be read, and why."""

    path: str
    reason: str


class EvalView(Dataset):
    """A subset of a data set with a transform; unreadable items become :class:`Unreadable`."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], transform: Callable) -> None:
        self.dataset, self.indices, self.transform = dataset, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int] | Unreadable:
        try:
            image, label = self.dataset[self.indices[i]]
        except UnreadableImageError as err:
            return Unreadable(err.path, err.reason)
        return self.transform(image), int(label)


def collate(stack: bool) -> Callable[[list], tuple[Any, torch.Tensor, list[Unreadable]]]:
    """Batch items into ``(inputs, labels, unreadable)``; ``stack`` joins the inputs."""

    def join(items: list) -> tuple[Any, torch.Tensor, list[Unreadable]]:
        bad = [item for item in items if isinstance(item, Unreadable)]
        good = [item for item in items if not isinstance(item, Unreadable)]
        inputs: Any = [x for x, _ in good]
        if stack and inputs:
            inputs = torch.stack(inputs)
        return inputs, torch.tensor([y for _, y in good], dtype=torch.long), bad

    return join


def is_tensor_identity(dataset: Dataset, cfg: dict[str, Any]) -> bool:
    """Whether ``dataset`` is a uint8 tensor whose single-crop transform only normalises."""
    images = getattr(dataset, "images", None)
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        return False
    in_chans, height, width = cfg["input_size"]
    chans = 1 if images.ndim == 3 else images.shape[1]
    same_size = tuple(images.shape[-2:]) == (height, width)
    return same_size and (cfg.get("crop_pct") or 1.0) == 1.0 and chans in (1, in_chans)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean) / std`` per channel of a batch ``(N, C, H, W)``."""
    mean_t = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def channel_stats(cfg: dict[str, Any], in_chans: int) -> tuple[list[float], list[float]]:
    """Mean and std per input channel (averaged where the config has another channel count)."""
    mean, std = list(cfg["mean"]), list(cfg["std"])
    if len(mean) != in_chans:
        mean, std = [sum(mean) / len(mean)] * in_chans, [sum(std) / len(std)] * in_chans
    return mean, std


def _tensor_batches(
    dataset: Dataset, indices: Sequence[int], cfg: dict[str, Any], batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[Unreadable]]]:
    images = dataset.images if dataset.images.ndim == 4 else dataset.images.unsqueeze(1)
    in_chans = cfg["input_size"][0]
    mean, std = channel_stats(cfg, in_chans)
    order = torch.as_tensor(list(indices), dtype=torch.long)
    targets = torch.as_tensor(dataset.targets)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        x = images[chunk].float().div_(255)
        if x.shape[1] != in_chans:  # grey -> RGB repeats, as MatchChannels does
            x = x.expand(-1, in_chans, -1, -1)
        yield normalize(x, mean, std), targets[chunk].long(), []


def single_crop_batches(
    dataset: Dataset,
    indices: Sequence[int],
    cfg: dict[str, Any],
    batch_size: int,
    workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor | list, torch.Tensor, list[Unreadable]]]:
    """Yield ``(images, labels, unreadable)`` of ``indices`` with ``cfg``'s single-crop transform.

    ``images`` is an empty list for a batch without any readable image.
    """
    if is_tensor_identity(dataset, cfg):
        yield from _tensor_batches(dataset, indices, cfg, batch_size)
        return
    yield from DataLoader(
        EvalView(dataset, indices, eval_transform(cfg)),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate(stack=True),
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(0),  # leave the global RNG untouched
    )


__all__ = [
    "EvalView",
    "Unreadable",
    "channel_stats",
    "collate",
    "is_tensor_identity",
    "normalize",
    "single_crop_batches",
]
