"""What a training run has done so far, and the random-number state that goes with it.

:class:`TrainState` is saved in every checkpoint (``train_state``) with the RNG states of every
process, so a resumed run continues exactly where the saved one stopped.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class TrainState:
    """Progress of a run: position, stochastic paths, best accuracy and the per-epoch history.

    Attributes:
        epoch: The current epoch (0-based).
        step_in_epoch: Optimizer steps taken in the current epoch.
        global_step: Optimizer steps taken in the whole run.
        path_drop_on: Whether stochastic paths have been switched on.
        path_drop_epoch: The epoch they were switched on at.
        best_top1: Best per-epoch validation top-1 (%) so far.
        loss_sum: Sum of loss x images over the current epoch.
        correct: Correct training predictions in the current epoch.
        images: Training images seen in the current epoch.
        history: One row of metrics per finished epoch.
        planned_epochs: The length a time budget planned last (None without a budget), so a
            resumed run continues that plan.

    """

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    path_drop_on: bool = False
    path_drop_epoch: int | None = None
    best_top1: float | None = None
    loss_sum: float = 0.0
    correct: float = 0.0
    images: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    planned_epochs: float | None = None

    def advance(self) -> None:
        """Count one optimizer step."""
        self.step_in_epoch += 1
        self.global_step += 1

    def add_totals(self, loss_sum: float, correct: float, images: float) -> None:
        """Add the summed loss x images, correct predictions and images of steps taken."""
        self.loss_sum += loss_sum
        self.correct += correct
        self.images += images

    def next_epoch(self) -> None:
        """Start the next epoch's counters."""
        self.epoch += 1
        self.step_in_epoch = 0
        self.loss_sum = self.correct = self.images = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain values for a checkpoint."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainState:
        """Read :meth:`to_dict` output (and the list form of checkpoints before this class)."""
        values = dict(values)
        if "epoch_sums" in values:
            values["loss_sum"], values["correct"], values["images"] = values.pop("epoch_sums")
        return cls(**values)


def rng_state() -> dict[str, Any]:
    """The torch, numpy, Python (and CUDA) RNG states, as tensors and plain containers."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
