"""What a training run is made of, and how it is saved and restored.

:class:`Trainer` builds a run (process group, data, model, the one training step, the schedule,
the time-budget plan), validates its weights, saves and restores checkpoints. The loop that drives
it step by step is :mod:`polynet.training.loop`, which imports this module and not the reverse.

The output folder holds:

- ``config.yaml``: the configuration as asked (a later run into the folder must match it).
- ``plan.json``: with ``time_budget``, every plan of the run's length (the length in force is
  also saved in each checkpoint, so a resumed run continues the plan it was saved with).
- ``last.pt`` (and ``last.prev.pt``, the one before) and ``best.pt``: polynet checkpoints.
  A ``last.next.pt`` exists only if a save was interrupted between its two renames.
- ``metrics.csv`` / ``metrics.json``: one row per epoch; ``tb/``: TensorBoard events.
- ``curve.png``: loss and top-1 per epoch; ``train.log``: the messages printed.
- ``.lock``: names the process training in the folder while it runs.

Checkpoints hold the model, optimizer, scheduler, AMP scaler, the RNG states of every process,
the stochastic-path state and the position in the epoch, so a resumed run continues exactly
where the saved one stopped (bitwise on CPU in deterministic mode).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polynet.devices import training_amp
from polynet.distributed import leave
from polynet.errors import UserError
from polynet.io.checkpoint import ModelRecord
from polynet.model.network import describe_classes
from polynet.model.zoo import check_model_name, create_model
from polynet.training.budget import measure_speed
from polynet.training.config import TrainConfig
from polynet.training.logs import RunLog
from polynet.training.planning import BudgetPlan, probe_batches
from polynet.training.recipe import build_scheduler, rescheduled
from polynet.training.rundir import RunFolder
from polynet.training.setup import (
    build_data,
    data_config,
    initial_model,
    placed_for_training,
    set_threads,
    start_process,
    train_device,
    training_batches,
)
from polynet.training.state import TrainState, rng_state, set_rng_state
from polynet.training.step import StepOutput, build_step
from polynet.training.validation import Validation


class Trainer:
    """One training job, built and ready to step; :func:`polynet.training.train` runs it.

    Args:
        cfg: The run's configuration, as asked.
        model_factory: Builds ``cfg.model`` from its name and keyword arguments.

    Attributes:
        asked: The configuration as asked (``amp`` resolved): what ``config.yaml`` records.
        cfg: The configuration in force: ``asked`` with the planned length of a time budget.
        total_steps: The run's length in steps, as planned now.

    """

    def __init__(
        self, cfg: TrainConfig, model_factory: Callable[..., nn.Module] = create_model
    ) -> None:
        if model_factory is create_model and not cfg.init_from:
            check_model_name(cfg.model)  # before anything slower can fail for another reason
        self.model_factory = model_factory
        self.start_time = time.time()
        self.unflipped_top1: float | None = None  # with eval_flip: the last top-1 without
        set_threads(cfg)
        device = train_device(cfg)
        # "auto" becomes what it chose, so config.yaml records it and a resume keeps it.
        self.amp_chosen_by = "auto: " if cfg.amp == "auto" else ""
        self.asked = self.cfg = dataclasses.replace(cfg, amp=training_amp(cfg.amp, device))
        self.device, self.group = start_process(self.cfg, device)
        self.out = Path(cfg.out)
        self.folder = RunFolder(self.out, self.group.is_main)
        self.folder.claim()  # before anything is read or removed: one process per folder
        self.log = RunLog(self.out, self.group.is_main)
        try:
            self.folder.check(self.cfg)
            self.group.barrier()  # every process has checked before the main one writes
            self.folder.prepare(self.cfg)
            self.log.open_file()
            self.group.barrier()
            self._build()
        except BaseException:
            self.log.close()
            self.folder.abandon()  # a run that fails to start leaves no empty folder behind
            self.folder.release()
            raise
        # Written once data, model and checkpoint have loaded: a run that fails to start
        # leaves no config.yaml, so the corrected command is not refused as another run.
        self.folder.write_config(self.asked)
        self.log.open_writer(self.state.global_step)

    # ----------------------------------------------------------------------------------------
    # Setup

    def _build(self) -> None:
        cfg = self.cfg
        data = build_data(cfg)
        self.data, self.train_set, self.val_set = data, data.train_set, data.val_set
        self.classes, self.train_indices = data.classes, data.train_indices
        self.steps_per_epoch = data.steps_per_epoch
        model, self.model_name, self.model_kwargs = initial_model(
            cfg, self.model_factory, len(self.classes), self.log
        )
        if getattr(model, "pretrained_cfg", None) is not None:
            # A folder-trained model's classes are its own (timm's label_names), not the
            # registered data set's.
            describe_classes(model.pretrained_cfg, len(self.classes), self.classes)
        self.data_cfg = data_config(model)
        self.raw_model, self.memory_format = placed_for_training(
            cfg, model, self.device, self.group
        )
        self.batches = training_batches(cfg, data, self.data_cfg, self.group.rank)
        self.validation = Validation(
            self.device,
            self.memory_format,
            cfg.amp,
            max(1, cfg.batch_size // self.group.world_size),
            self.group,
            self.log,
        )
        self.step = build_step(self.raw_model, cfg, self.device, self.group, self.memory_format)
        self.plan = BudgetPlan(
            cfg, self.start_time, self.steps_per_epoch, self.val_set, self.train_indices, self.group
        )
        self.state = TrainState()
        saved = self.folder.latest_checkpoint(self.device, self.log) if cfg.resume else None
        if cfg.resume and saved is None:
            self.log(f"no checkpoint to resume in {self.out}; starting from the beginning")
        if saved is not None:
            self.state = TrainState.from_dict(saved["train_state"])
        if self.state.planned_epochs is not None:
            self.cfg = dataclasses.replace(cfg, epochs=self.state.planned_epochs)
        elif cfg.time_budget and saved is None:
            self._plan_length()
        self.scheduler, self.total_steps = build_scheduler(
            self.step.optimizer, self.cfg, self.steps_per_epoch
        )
        self.step.scheduler = self.scheduler
        if saved is not None:
            self._restore(saved)

    def close(self) -> None:
        """Close log files, leave the process group and free the folder."""
        self.log.close()
        leave()
        self.folder.release()

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The run's optimizer."""
        return self.step.optimizer

    @property
    def ema(self) -> nn.Module | None:
        """The moving average of the weights (None without ``ema_decay``)."""
        return self.step.ema

    @property
    def model(self) -> nn.Module:
        """What the steps call: the model, its units compiled and DDP-wrapped as configured."""
        return self.step.model

    # ----------------------------------------------------------------------------------------
    # The run's length

    def _plan_length(self) -> None:
        """Set the length so that the run ends inside ``time_budget`` on this machine."""
        cfg = self.cfg

        def probe_step() -> Any:
            # The run's own step on a throwaway copy: the run itself is untouched.
            probe = copy.deepcopy(self.raw_model)
            return build_step(probe, cfg, self.device, self.group, self.memory_format)

        speed = measure_speed(
            probe_step,
            probe_batches(cfg, self.batches, self.train_indices, self.group),
            self.validation.runner,
            self.validation.eval_batch_size,
        )
        self._set_length(self.plan.first(speed), speed.step_seconds)

    def replan(self, pace_seconds: float) -> None:
        """Fit the rest of the run to the budget at the pace of its steps so far."""
        self._set_length(self.plan.again(self.state.global_step, pace_seconds), pace_seconds)
        self.scheduler, self.total_steps = rescheduled(
            self.step.optimizer, self.scheduler, self.cfg, self.steps_per_epoch
        )
        self.step.scheduler = self.scheduler
        self.log(
            f"time budget: re-planned after {self.state.global_step} steps at "
            f"{self.cfg.batch_size / pace_seconds:.0f} training images/s: "
            f"{self.cfg.epochs:.2f} epochs ({self.total_steps:,} steps)"
        )

    def _set_length(self, steps: int, step_seconds: float) -> None:
        epochs = steps / self.steps_per_epoch
        self.cfg = dataclasses.replace(self.cfg, epochs=epochs)
        self.state.planned_epochs = epochs  # saved with the next checkpoint: a resume keeps it
        self.folder.record_plan(
            dict(
                after_step=self.state.global_step,
                training_images_per_second=round(self.cfg.batch_size / step_seconds, 1),
                epochs=epochs,
                steps=steps,
            ),
            self.asked.time_budget,
        )

    # ----------------------------------------------------------------------------------------
    # Checkpoints

    def _payload(self) -> dict[str, Any]:
        config = getattr(self.raw_model, "config", None)
        record = ModelRecord(
            self.model_name,
            # The weights that were evaluated (the average, with EMA) are what a loader gets;
            # the training weights travel separately for resuming.
            self._evaluated_model().state_dict(),
            config.to_dict() if config is not None else {},
            # Models without a config (the ablation's ResNets) are rebuilt from these.
            {} if config is not None else self.model_kwargs,
            class_names=self.classes,
            pretrained_cfg={
                k: list(v) if isinstance(v, tuple) else v
                for k, v in self.data_cfg.items()
                if isinstance(v, (str, int, float, bool, tuple, list)) or v is None
            },
        )
        return record.payload(
            train_model=self.raw_model.state_dict() if self.ema is not None else None,
            optimizer=self.step.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.step.scaler.state_dict(),
            rng=self.group.gather(rng_state()),
            train_state=self.state.to_dict(),
            config=self.asked.to_dict(),
        )

    def save(self, best: bool = False) -> None:
        """Write ``last.pt`` (keeping the previous one as ``last.prev.pt``) and maybe ``best.pt``.

        Every process takes part (RNG states are gathered); only the main one writes.
        """
        self.folder.save(self._payload(), best)
        self.group.barrier()

    def _restore(self, payload: dict[str, Any]) -> None:
        self.raw_model.load_state_dict(payload.get("train_model") or payload["model"])
        if self.ema is not None:
            self.ema.module.load_state_dict(payload["model"])
        self.step.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.step.scaler.load_state_dict(payload["scaler"])
        self.step.count = self.state.global_step
        rng = payload["rng"]
        set_rng_state(rng[self.group.rank] if self.group.rank < len(rng) else rng[0])
        if self.state.path_drop_on:
            self.raw_model.set_path_drop(self.cfg.path_drop)
        self.log(
            f"resumed {self.out} at epoch {self.state.epoch + 1}, step {self.state.global_step}"
        )

    # ----------------------------------------------------------------------------------------
    # Steps and evaluation

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        """One optimizer step on a batch (:class:`~polynet.training.step.TrainStep`)."""
        return self.step(images, labels)

    def evaluate(self, limit: int | None = None) -> tuple[float, float, int]:
        """Mean loss, top-1 (%) and image count on the validation split (all processes)."""
        if self.val_set is None:
            raise UserError("this run has no validation split to evaluate on")
        if self.cfg.bn_recalibrate:
            self.recalibrate_batchnorm(self.cfg.bn_recalibrate)
        workers = self.cfg.workers if not hasattr(self.val_set, "images") else 0
        loss, top1, count, unflipped = self.validation.validate(
            self._evaluated_model(),
            self.val_set,
            limit,
            self.data_cfg,
            workers,
            self.cfg.eval_flip,
        )
        self.unflipped_top1 = unflipped
        return loss, top1, count

    def recalibrate_batchnorm(self, num_images: int) -> None:
        """Recompute BatchNorm statistics over ``num_images`` training images (seeded choice).

        Every process uses the same images, so the statistics agree across processes.
        """
        order = torch.randperm(
            len(self.train_indices), generator=torch.Generator().manual_seed(self.cfg.seed)
        )
        indices = self.train_indices[order[:num_images]].tolist()
        self.validation.recalibrate_batchnorm(
            self._evaluated_model(), self.train_set, indices, self.data_cfg
        )

    def _evaluated_model(self) -> nn.Module:
        """The weights a run evaluates and publishes: the moving average with EMA."""
        return self.ema.module if self.ema is not None else self.raw_model

    def switch_path_drop(self, epoch: int, reason: str) -> None:
        """Turn stochastic paths on from ``epoch`` (0-based) and say why in the log."""
        self.raw_model.set_path_drop(self.cfg.path_drop)
        self.state.path_drop_on, self.state.path_drop_epoch = True, epoch
        self.log(
            f"stochastic paths on from epoch {epoch + 1} ({reason}): drop probability 0 at the "
            f"first unit rising to {self.cfg.path_drop} at the last"
        )


__all__ = ["Trainer"]
