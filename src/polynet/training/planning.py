"""A time-budgeted run's length: planned before its first step, then again at its own pace.

The first plan uses the speed :func:`~polynet.training.budget.measure_speed` measured on a copy
of the model. The probe's pace was off by -12 % to +14 % on the development machine, and the
pace of a run's epochs drifts by up to 40 % there (50 to 72 s for the same epochs), so the run
plans again at the pace of its own steps since the last plan: first at its first checkpoint (the
end of the first epoch, or ``checkpoint_every``) but at most ``REPLAN_AFTER_STEPS`` in, then at
every ``checkpoint_every`` or epoch end, each time just before that checkpoint is written, so a
resumed run always continues the plan it was saved with. Every process runs the main process's
plan.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sized
from typing import Any

import torch

from polynet.distributed import ProcessGroup
from polynet.training.batches import train_batches
from polynet.training.budget import (
    PROBE_STEPS,
    REPLAN_AFTER_STEPS,
    REPLAN_PACE_MARGIN,
    Speed,
    plan_steps,
)
from polynet.training.config import TrainConfig

PACE_FROM_STEP = 10
"""The re-plan times the steps after this one (the first steps pay for set-up)."""


def probe_batches(
    cfg: TrainConfig, batches: Any, train_indices: torch.Tensor, group: ProcessGroup
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The run's first ``PROBE_STEPS`` training batches, for timing its steps.

    A small training set has fewer batches than the probe times: it sees them again.
    """
    order = train_batches(
        len(train_indices), cfg.batch_size, cfg.seed, 0, group.rank, group.world_size
    )
    first = [train_indices[order[i % len(order)]] for i in range(PROBE_STEPS)]
    return batches.epoch(first, 0)


class BudgetPlan:
    """How many steps fit the rest of a run's ``time_budget``, and when to ask again.

    Args:
        cfg: The run's configuration (``time_budget`` set).
        start_time: When the run started (``time.time()``); the budget counts from there.
        steps_per_epoch: Steps of one epoch.
        val_set: The validation split (its evaluations are part of the budget), or None.
        train_indices: The training images.
        group: The process group.

    Attributes:
        replan_at: The step after which :meth:`again` is due (None: never).
        note: The first plan, in words, for the run's log.

    """

    def __init__(
        self,
        cfg: TrainConfig,
        start_time: float,
        steps_per_epoch: int,
        val_set: Sized | None,
        train_indices: Sized,
        group: ProcessGroup,
    ) -> None:
        self.cfg, self.start_time, self.group = cfg, start_time, group
        self.steps_per_epoch, self.val_set, self.train_indices = (
            steps_per_epoch,
            val_set,
            train_indices,
        )
        self.speed: Speed | None = None
        self.replan_at: int | None = None
        self.every = 0  # steps between the later plans: the run's checkpoint interval
        self.note = ""

    def first(self, speed: Speed) -> int:
        """Steps of the whole run at the probe's ``speed``; sets when to plan again."""
        cfg, per_epoch = self.cfg, self.steps_per_epoch
        steps = self._steps_fitting(speed)
        self.speed = speed
        first_save = min(cfg.checkpoint_every or per_epoch, per_epoch)
        # Within the first epoch, whose batches are drawn in full, and after enough steps to
        # time them.
        if PACE_FROM_STEP + 10 <= min(REPLAN_AFTER_STEPS, first_save) and steps >= per_epoch:
            self.replan_at, self.every = min(REPLAN_AFTER_STEPS, first_save), first_save
        self.note = (
            f"time budget {cfg.time_budget:g} s: planned at "
            f"{cfg.batch_size / speed.step_seconds:.0f} training, "
            f"{1 / speed.eval_image_seconds:.0f} validation and "
            f"{1 / speed.recalibration_image_seconds:.0f} recalibration images/s (measured "
            f"here, less a margin): {steps / per_epoch:.2f} epochs ({steps:,} steps)"
        )
        return steps

    def again(self, global_step: int, pace_seconds: float) -> int:
        """Steps of the whole run, planned anew at ``pace_seconds`` a step after ``global_step``.

        The next plan is due at the next checkpoint (a multiple of ``every``).
        """
        assert self.speed is not None, "again() follows first()"
        speed = dataclasses.replace(self.speed, step_seconds=pace_seconds * REPLAN_PACE_MARGIN)
        self.replan_at = (global_step // self.every + 1) * self.every
        return global_step + self._steps_fitting(speed)

    def _steps_fitting(self, speed: Speed) -> int:
        left = self.cfg.time_budget - (time.time() - self.start_time)
        steps = plan_steps(
            self.cfg, speed, left, self.steps_per_epoch, self.val_set, self.train_indices
        )
        return int(self.group.from_main(steps))  # every process runs the main one's plan


__all__ = ["PACE_FROM_STEP", "BudgetPlan", "probe_batches"]
