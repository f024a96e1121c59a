"""Training batches whose randomness depends only on (seed, epoch, position).

Every random choice of the augmentation is drawn from a generator seeded by the sample's (or
batch's) position in the run, never from a shared stream. A run resumed mid-epoch therefore sees
exactly the batches the uninterrupted run saw, whatever the number of DataLoader workers.

Each epoch is a fresh permutation of the training images, the same on every process
(:func:`train_batches`). Two paths: data sets held in memory as a ``uint8`` tensor
(Fashion-MNIST) are cropped, flipped and normalised a whole batch at a time on tensors, with
no per-image PIL work and no worker processes; image folders are decoded and augmented per
image in DataLoader workers. Evaluation batches are :mod:`polynet.evaluation.batches`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, default_collate

from polynet.data import UnreadableImageError, train_transform
from polynet.evaluation.batches import channel_stats, normalize


def position_seed(seed: int, epoch: int, position: int) -> int:
    """Return a 63-bit seed for one position of one epoch of a run."""
    return ((seed * 1_000_003 + epoch) * 2_147_483_659 + position) & (2**63 - 1)


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """Return the shuffled sample order of an epoch, identical on every process."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=generator)


def train_batches(
    num_samples: int, global_batch: int, seed: int, epoch: int, rank: int, world_size: int
) -> list[torch.Tensor]:
    """Return the index batches of process ``rank`` for one training epoch.

    The epoch is ``num_samples // global_batch`` global batches of a fresh permutation (the
    last incomplete one is dropped, so every step has the same global batch on every process);
    process ``r`` takes images ``r * b .. (r + 1) * b`` of each, ``b = global_batch /
    world_size``.
    """
    local = global_batch // world_size
    order = epoch_permutation(num_samples, seed, epoch)
    start = rank * local
    return [
        order[s * global_batch + start : s * global_batch + start + local]
        for s in range(num_samples // global_batch)
    ]


class TensorTrainBatches:
    """Batched random-resized-crop and flip of an in-memory ``uint8`` image tensor.

    The crop of each image is drawn as in the paper (area fraction in ``scale``, log-uniform
    aspect ratio in ``ratio``, clamped to the image instead of re-drawn) and applied with one
    bilinear ``grid_sample`` for the whole batch.

    Args:
        images: ``uint8`` tensor (N, H, W) or (N, C, H, W).
        targets: ``int64`` labels (N,).
        data_cfg: ``input_size`` (C, H, W), ``mean``, ``std`` of the model.
        scale: Crop area range.
        ratio: Crop aspect-ratio range.
        hflip: Flip probability.
        seed: Run seed.
        rank: Process rank (each process draws different crops).

    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        data_cfg: dict[str, Any],
        scale: tuple[float, float],
        ratio: tuple[float, float],
        hflip: float,
        seed: int,
        rank: int = 0,
    ) -> None:
        self.images = images if images.ndim == 4 else images.unsqueeze(1)
        self.targets = targets
        self.in_chans, self.height, self.width = data_cfg["input_size"]
        self.mean, self.std = channel_stats(data_cfg, self.in_chans)
        self.scale, self.ratio, self.hflip = scale, ratio, hflip
        self.seed, self.rank = seed, rank

    def __call__(
        self, indices: torch.Tensor, epoch: int, step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the augmented batch of ``indices`` at ``(epoch, step)``."""
        g = torch.Generator().manual_seed(position_seed(self.seed, epoch, step * 64 + self.rank))
        x = self.images[indices].float().div_(255)
        if x.shape[1] != self.in_chans:  # grey -> RGB repeats; RGB -> grey takes luma
            x = x.expand(-1, self.in_chans, -1, -1) if x.shape[1] == 1 else _luma(x)
        n = x.shape[0]
        area = torch.empty(n).uniform_(*self.scale, generator=g)
        log_ratio = torch.empty(n).uniform_(
            math.log(self.ratio[0]), math.log(self.ratio[1]), generator=g
        )
        aspect = log_ratio.exp()
        # Half-widths in normalised coordinates: the crop spans w x h of the [-1, 1] square.
        w = (area * aspect).sqrt().clamp(max=1.0)
        h = (area / aspect).sqrt().clamp(max=1.0)
        cx = (torch.rand(n, generator=g) * 2 - 1) * (1 - w)
        cy = (torch.rand(n, generator=g) * 2 - 1) * (1 - h)
        flip = torch.where(torch.rand(n, generator=g) < self.hflip, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
        theta[:, 1, 1], theta[:, 1, 2] = h, cy
        grid = F.affine_grid(theta, [n, self.in_chans, self.height, self.width], False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return normalize(x, self.mean, self.std), self.targets[indices]

    def epoch(
        self, batches: Sequence[torch.Tensor], epoch: int, start: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the batches of an epoch from its step ``start`` on, made one at a time."""
        for i, indices in enumerate(batches):
            yield self(indices, epoch, start + i)


def _luma(x: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


class _SeededItems(Dataset):
    """Items transformed under a torch seed fixed by (seed, epoch, index).

    An unreadable image is replaced by the next readable one (so every batch keeps its size,
    which keeps distributed processes in step) and its path is reported with the batch.
    """

    def __init__(self, dataset: Dataset, transform: Any, seed: int, epoch: int) -> None:
        self.dataset, self.transform, self.seed, self.epoch = dataset, transform, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int, list[str]]:
        skipped = []
        for attempt in range(len(self.dataset)):
            i = (index + attempt) % len(self.dataset)
            try:
                img, label = self.dataset[i]
            except UnreadableImageError as err:
                skipped.append(f"{err.path} ({err.reason})")
                continue
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(position_seed(self.seed, self.epoch, i))
                return self.transform(img), label, skipped
        raise ValueError("no readable image in the training set")


def _collate_with_skips(items: list[tuple[Any, int, list[str]]]) -> tuple[Any, Any, list[str]]:
    images, labels = default_collate([(x, y) for x, y, _ in items])
    return images, labels, [path for _, _, skipped in items for path in skipped]


class FolderTrainBatches:
    """Per-image decoding and augmentation of an image-folder data set in DataLoader workers.

    Args:
        dataset: Items ``(pil_image, label)``.
        data_cfg: Model data config plus ``scale``, ``ratio``, ``hflip``.
        seed: Run seed.
        workers: Worker processes.

    """

    def __init__(self, dataset: Dataset, data_cfg: dict[str, Any], seed: int, workers: int):
        self.dataset, self.transform = dataset, train_transform(data_cfg)
        self.seed, self.workers = seed, workers
        self.skipped: list[str] = []

    def epoch(
        self, batches: Sequence[torch.Tensor], epoch: int, start: int = 0
    ) -> Iterator[tuple[Any, Any]]:
        """Yield ``(images, labels)`` for ``batches`` of an epoch, in order.

        Augmentation is seeded per image, so where in the epoch ``batches`` start (``start``)
        changes nothing.
        """
        if not batches:
            return
        loader = DataLoader(
            _SeededItems(self.dataset, self.transform, self.seed, epoch),
            batch_sampler=[b.tolist() for b in batches],
            num_workers=self.workers,
            collate_fn=_collate_with_skips,
            # Workers draw nothing from the main generator: seeding is per image.
            generator=torch.Generator().manual_seed(self.seed),
            persistent_workers=False,
        )
        for images, labels, skipped in loader:
            for path in skipped:
                print(
                    f"polynet: warning: skipped unreadable training image {path}", file=sys.stderr
                )
            self.skipped += skipped
            yield images, labels
