"""Fitting a run to a time budget, and an ETA that counts the evaluations still to come.

A run given ``time_budget`` seconds measures, before it starts, how long one of its training
steps and one evaluated image take on this machine (the run's own step, on a throwaway copy
of the model, so the run itself is untouched), and sets its length so that training, the
per-epoch evaluations and the final one end inside the budget; the run re-plans at its own
pace at its checkpoints (:mod:`polynet.training.planning`). Each plan is saved with the run's
checkpoints and listed in its ``plan.json``, so a resumed run keeps the last one anywhere.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass

import torch
from torch import nn

from polynet.devices import autocast
from polynet.training.config import TrainConfig
from polynet.training.step import TrainStep

# Slack kept free of the budget for the final checkpoint, the curve and the report, and the
# cost of every epoch's end (a checkpoint and the metrics files) besides its evaluation.
RESERVE_SECONDS = 5.0
EPOCH_END_SECONDS = 0.5
PACE_MARGIN = 1.15
# The plan is made again at the pace of the run's own steps (the probe's pace was off by -12 %
# to +14 % on this machine, 110 steps' pace by -8 %, and epochs drift by up to 40 %): at the
# first checkpoint but at most this many steps in, then at every checkpoint (polynet.training.
# planning), each time just before it is written, so a resume continues the plan it saved.
REPLAN_AFTER_STEPS = 1000
REPLAN_PACE_MARGIN = 1.04
_WARMUP_STEPS, _TIMED_STEPS = 5, 10  # the first steps pay for oneDNN set-up
PROBE_STEPS = _WARMUP_STEPS + _TIMED_STEPS
"""Training batches :func:`measure_speed` needs."""


@dataclass(frozen=True)
class Speed:
    """Measured cost of the work a run repeats.

    Attributes:
        step_seconds: One training step (forward, backward, optimizer) of one batch.
        eval_image_seconds: One image (one view: a flip counts again) through validation's
            model, the inference-optimised copy at validation's batch size.
        recalibration_image_seconds: One image through the training-mode model without
            gradients (BatchNorm recalibration).

    """

    step_seconds: float
    eval_image_seconds: float
    recalibration_image_seconds: float


@dataclass(frozen=True)
class EvalWork:
    """What one evaluation of a run passes through the model.

    Attributes:
        views: Validation forwards: images, twice with test-time flips.
        recalibration: Training images of the BatchNorm recalibration.

    """

    views: int
    recalibration: int

    def seconds(self, speed: Speed) -> float:
        """How long the evaluation takes at ``speed``."""
        return (
            self.views * speed.eval_image_seconds
            + self.recalibration * speed.recalibration_image_seconds
        )


def measure_speed(
    make_step: Callable[[], TrainStep],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    validation: Callable[[nn.Module], tuple[Callable, Callable]],
    eval_batch_size: int,
) -> Speed:
    """Time the run's own training step, recalibration and validation forwards on a copy.

    Args:
        make_step: Builds the run's step (:func:`~polynet.training.step.build_step`) on a
            throwaway copy of its model: the same forward, loss, scaler, optimizer, moving
            average and gradient all-reduce as the run's steps.
        batches: At least ``_WARMUP_STEPS + 1`` training batches (``PROBE_STEPS`` to time
            all the steps the probe times).
        validation: Maps a model in eval mode to what validation runs and its context
            (:meth:`~polynet.training.validation.Validation.runner`).
        eval_batch_size: Images per validation forward.

    """
    step = make_step()
    probe, device = step.raw_model.train(), step.device
    times, images = [], None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        start = time.perf_counter()  # a step's time includes making its batch, as in training
        for i, (images, labels) in enumerate(batches):
            if i == _WARMUP_STEPS + _TIMED_STEPS:
                break
            step(images, labels)
            _sync(device)
            now = time.perf_counter()
            if i >= _WARMUP_STEPS:
                times.append(now - start)
            start = now
        if not times:
            raise ValueError(f"measure_speed needs more than {_WARMUP_STEPS} training batches")
        images = images.to(device, memory_format=step.memory_format)
        with torch.no_grad():
            with autocast(device, step.amp):
                recalibration = _best_time(lambda: probe(images), device) / len(images)
            runner, context = validation(probe.eval())
            views = images.repeat(math.ceil(eval_batch_size / len(images)), 1, 1, 1)
            views = views[:eval_batch_size].contiguous(memory_format=step.memory_format)
            with context():
                view = _best_time(lambda: runner(views), device) / len(views)
    # The median is robust to one interrupted step; the margin covers the sustained pace of a
    # whole run, which on this 2-core machine was up to 14 % below 15 probe steps' (and up to
    # 12 % above it): a budget is a limit, so the plan errs on the short side.
    step_seconds = sorted(times)[len(times) // 2] * PACE_MARGIN
    return Speed(step_seconds, view * PACE_MARGIN, recalibration * PACE_MARGIN)


def _best_time(work: Callable[[], object], device: torch.device) -> float:
    """The fastest of two timed calls of ``work`` after an untimed one."""
    best = math.inf
    for i in range(3):
        _sync(device)
        start = time.perf_counter()
        work()
        _sync(device)
        if i:
            best = min(best, time.perf_counter() - start)
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def planned_steps(
    speed: Speed,
    seconds: float,
    steps_per_epoch: int,
    per_epoch: EvalWork,
    final: EvalWork,
) -> int:
    """The most optimizer steps whose training and evaluations fit in ``seconds``.

    Args:
        speed: What :func:`measure_speed` measured.
        seconds: Time left for the run.
        steps_per_epoch: Steps of one epoch.
        per_epoch: Evaluation work per epoch, on average (none without per-epoch evaluation).
        final: The final evaluation's work if it is not an epoch's.

    """
    epoch_end = per_epoch.seconds(speed) + EPOCH_END_SECONDS
    per_step = speed.step_seconds + epoch_end / max(1, steps_per_epoch)
    usable = seconds - RESERVE_SECONDS - final.seconds(speed)
    return max(1, math.floor(usable / per_step))


def evaluation_work(cfg: TrainConfig, val_set: Sized | None, train_images: int) -> EvalWork:
    """What one of the run's evaluations passes through the model."""
    if val_set is None:
        return EvalWork(0, 0)
    val = min(cfg.val_subset or len(val_set), len(val_set))
    return EvalWork(val * (2 if cfg.eval_flip else 1), min(cfg.bn_recalibrate, train_images))


def epoch_work(cfg: TrainConfig, val_set: Sized | None, train_images: int) -> EvalWork:
    """Evaluation work per epoch, on average over ``eval_every`` epochs."""
    if not cfg.eval_every:
        return EvalWork(0, 0)
    one = evaluation_work(cfg, val_set, train_images)
    every = cfg.eval_every
    return EvalWork(math.ceil(one.views / every), math.ceil(one.recalibration / every))


def plan_steps(
    cfg: TrainConfig,
    speed: Speed,
    seconds: float,
    steps_per_epoch: int,
    val_set: Sized | None,
    train_indices: Sized,
) -> int:
    """The run length in steps that fits ``seconds`` with ``cfg``'s evaluations."""
    final = EvalWork(0, 0)
    if cfg.final_eval and not cfg.eval_every:
        final = evaluation_work(cfg, val_set, len(train_indices))
    per_epoch = epoch_work(cfg, val_set, len(train_indices))
    return planned_steps(speed, seconds, steps_per_epoch, per_epoch, final)


def evaluations_left(cfg: TrainConfig, epoch: int, num_epochs: int, validates: bool) -> int:
    """Per-epoch evaluations from ``epoch`` (0-based, included) to the end of the run."""
    if not cfg.eval_every or not validates:
        return 0
    every = cfg.eval_every
    return sum(1 for e in range(epoch, num_epochs) if (e + 1) % every == 0 or e == num_epochs - 1)


class Eta:
    """Time left in a run: the training steps at their measured pace plus the evaluations.

    The pace counts only training steps (an evaluation does not slow it down) and the
    evaluations are costed from the last one measured, or from the training pace before the
    first (a forward pass is about a third of a training step), so the estimate is right from
    the first steps of the first epoch.
    """

    def __init__(self, evaluation: EvalWork, batch_size: int) -> None:
        self.eval_images = evaluation.views + evaluation.recalibration
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
