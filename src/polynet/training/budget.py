"""Fitting a run to a time budget, and an ETA that counts the evaluations still to come.

A run given ``time_budget`` seconds measures, before it starts, how long one training step and
one evaluated image take on this machine (on a throwaway copy of the model, so the run itself
is untouched), and sets its length so that training, the per-epoch evaluations and the final
one end inside the budget. The plan is then fixed: it is written into the run's
``config.yaml`` as ``epochs``, so a resumed run keeps it on any machine.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from polynet.training.config import TrainConfig

# Slack kept free of the budget for the final checkpoint, the curve and the report, and the
# cost of every epoch's end (a checkpoint and the metrics files) besides its evaluation.
RESERVE_SECONDS = 5.0
EPOCH_END_SECONDS = 0.5
PACE_MARGIN = 1.15
_WARMUP_STEPS, _TIMED_STEPS = 5, 10  # the first steps pay for oneDNN set-up
PROBE_STEPS = _WARMUP_STEPS + _TIMED_STEPS
"""Training batches :func:`measure_speed` needs."""


@dataclass(frozen=True)
class Speed:
    """Measured cost of the work a run repeats.

    Attributes:
        step_seconds: One training step (forward, backward, optimizer) of one batch.
        eval_image_seconds: One image through the model in evaluation mode.

    """

    step_seconds: float
    eval_image_seconds: float


def measure_speed(
    model: nn.Module,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    autocast: Callable[[], torch.autocast],
    device: torch.device,
    memory_format: torch.memory_format,
) -> Speed:
    """Time training steps and evaluation forwards on a copy of ``model``.

    Args:
        model: The run's model (left untouched: a deep copy is trained).
        make_optimizer: Builds the run's optimizer for a model.
        batches: At least ``_WARMUP_STEPS + _TIMED_STEPS`` training batches.
        autocast: The run's autocast context.
        device: Where the model runs.
        memory_format: The run's memory format.

    """
    probe = copy.deepcopy(model).train()
    optimizer = make_optimizer(probe)
    times, images = [], None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        start = time.perf_counter()  # a step's time includes making its batch, as in training
        for i, (images, labels) in enumerate(batches):
            if i == _WARMUP_STEPS + _TIMED_STEPS:
                break
            images = images.to(device, memory_format=memory_format)
            labels = labels.to(device)
            with autocast():
                loss = F.cross_entropy(probe(images).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            _sync(device)
            now = time.perf_counter()
            if i >= _WARMUP_STEPS:
                times.append(now - start)
            start = now
        probe.eval()
        eval_times = []
        with torch.no_grad(), autocast():
            for i in range(3):
                _sync(device)
                start = time.perf_counter()
                probe(images)
                _sync(device)
                if i:
                    eval_times.append(time.perf_counter() - start)
    # The median is robust to one interrupted step; the margin covers the sustained pace of a
    # whole run, which on this 2-core machine was up to 14 % below 15 probe steps' (and up to
    # 12 % above it): a budget is a limit, so the plan errs on the short side.
    step = sorted(times)[len(times) // 2] * PACE_MARGIN
    return Speed(step, min(eval_times) * PACE_MARGIN / len(images))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def planned_steps(
    speed: Speed,
    seconds: float,
    steps_per_epoch: int,
    eval_images_per_epoch: int,
    final_eval_images: int,
) -> int:
    """The most optimizer steps whose training and evaluations fit in ``seconds``.

    Args:
        speed: What :func:`measure_speed` measured.
        seconds: Time left for the run.
        steps_per_epoch: Steps of one epoch.
        eval_images_per_epoch: Images evaluated after every epoch (validation and BatchNorm
            recalibration), 0 without per-epoch evaluation.
        final_eval_images: Images of the final evaluation if it is not an epoch's.

    """
    per_epoch = eval_images_per_epoch * speed.eval_image_seconds + EPOCH_END_SECONDS
    per_step = speed.step_seconds + per_epoch / max(1, steps_per_epoch)
    usable = seconds - RESERVE_SECONDS - final_eval_images * speed.eval_image_seconds
    return max(1, math.floor(usable / per_step))


def eval_images_per_epoch(cfg: TrainConfig, val_set: Sized | None, train_images: int) -> int:
    """Images a run evaluates per epoch on average (validation plus BatchNorm recalibration)."""
    if val_set is None or not cfg.eval_every:
        return 0
    val = min(cfg.val_subset or len(val_set), len(val_set))
    return math.ceil((val + min(cfg.bn_recalibrate, train_images)) / cfg.eval_every)


def plan_steps(
    cfg: TrainConfig,
    speed: Speed,
    seconds: float,
    steps_per_epoch: int,
    val_set: Sized | None,
    train_indices: Sized,
) -> int:
    """The run length in steps that fits ``seconds`` with ``cfg``'s evaluations."""
    final = 0
    if cfg.final_eval and val_set is not None and not cfg.eval_every:
        final = min(cfg.val_subset or len(val_set), len(val_set))
    per_epoch = eval_images_per_epoch(cfg, val_set, len(train_indices))
    return planned_steps(speed, seconds, steps_per_epoch, per_epoch, final)


class Eta:
    """Time left in a run: the training steps at their measured pace plus the evaluations.

    The pace counts only training steps (an evaluation does not slow it down) and the
    evaluations are costed from the last one measured, or from the training pace before the
    first (a forward pass is about a third of a training step), so the estimate is right from
    the first steps of the first epoch.
    """

    def __init__(self, eval_images_per_epoch: int, batch_size: int) -> None:
        self.eval_images = eval_images_per_epoch
        self.batch_size = batch_size
        self.step_seconds = 0.0
        self.steps = 0
        self.eval_seconds: float | None = None

    def step(self, seconds: float) -> None:
        """Count one training step that took ``seconds``."""
        self.step_seconds += seconds
        self.steps += 1

    def evaluated(self, seconds: float) -> None:
        """Record how long an epoch's evaluation took."""
        self.eval_seconds = seconds

    @property
    def images_per_second(self) -> float:
        """Training throughput (training steps only)."""
        return self.steps * self.batch_size / max(self.step_seconds, 1e-9)

    def seconds_left(self, steps_left: int, evaluations_left: int) -> float:
        """Estimated seconds until the run ends."""
        per_step = self.step_seconds / max(1, self.steps)
        per_eval = self.eval_seconds
        if per_eval is None:
            per_eval = self.eval_images * per_step / self.batch_size / 3
        return steps_left * per_step + evaluations_left * per_eval
