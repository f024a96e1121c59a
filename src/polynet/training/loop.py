"""A training job: data, model, recipe, logging, checkpoints, resume and distributed runs.

``train(cfg)`` runs a whole job and returns a :class:`TrainResult`. :class:`Trainer` builds
what the run is made of and saves and restores it; :class:`~polynet.training.epochs.EpochLoop`
drives its epochs, and :class:`~polynet.training.planning.BudgetPlan` sets a time-budgeted run's
length. The output folder holds:

- ``config.yaml``: the resolved configuration (a later run into the folder must match it).
- ``last.pt`` (and ``last.prev.pt``, the one before) and ``best.pt``: polynet checkpoints.
  A ``last.next.pt`` exists only if a save was interrupted between its two renames.
- ``metrics.csv`` / ``metrics.json``: one row per epoch; ``tb/``: TensorBoard events.
- ``curve.png``: loss and top-1 per epoch; ``train.log``: the messages printed.

Checkpoints hold the model, optimizer, scheduler, AMP scaler, the RNG states of every process,
the stochastic-path state and the position in the epoch, so a resumed run continues exactly
where the saved one stopped (bitwise on CPU in deterministic mode).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from polynet.devices import training_amp
from polynet.errors import UserError
from polynet.network import describe_classes
from polynet.training.budget import measure_speed
from polynet.training.config import TrainConfig, build_config
from polynet.training.distributed import (
    all_sum,
    barrier,
    eval_indices,
    shutdown_distributed,
)
from polynet.training.ema import ModelEma
from polynet.training.epochs import EpochLoop, TrainResult
from polynet.training.evaluation import Evaluator
from polynet.training.logs import RunLog, plot_curves
from polynet.training.planning import BudgetPlan, probe_batches
from polynet.training.recipe import build_optimizer, build_scheduler, rescheduled
from polynet.training.rundir import RUN_FILES, RunFolder, resumed_config
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
from polynet.zoo import check_model_name, create_model

__all__ = ["RUN_FILES", "TrainResult", "Trainer", "TrainingDiverged", "plot_curves", "train"]


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def train(
    config: TrainConfig | dict[str, Any] | None = None,
    model_factory: Callable[..., nn.Module] = create_model,
    **overrides: Any,
) -> TrainResult:
    """Train a model; see :class:`~polynet.training.config.TrainConfig` for every setting.

    With ``resume=True`` the run saved in ``out`` continues from its own configuration; the
    settings given here may differ from it only in how the run is carried out (threads,
    progress, ...), see :func:`~polynet.training.rundir.resumed_config`.

    Args:
        config: A config, or a mapping of config keys (``preset`` and ``config_file`` allowed).
        model_factory: Builds ``cfg.model`` from its name and keyword arguments; the registry's
            :func:`~polynet.zoo.create_model` unless a workflow trains other networks too (the
            ablation's ResNet baselines).
        **overrides: Config keys that win over ``config``.

    Returns:
        The run's :class:`TrainResult`.

    Raises:
        ValueError: For bad settings, a folder holding another run, or a diverged loss.

    """
    if isinstance(config, TrainConfig):
        defaults = TrainConfig()
        explicit = {
            k: v for k, v in config.to_dict().items() if v != getattr(defaults, k) or k == "out"
        }
    else:
        explicit = dict(config or {})
    explicit.update(overrides)
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        # torchrun restarted the workers after a failure: continue this run from its last
        # checkpoint (--overwrite would otherwise delete what the first attempt trained).
        explicit.update(resume=True, overwrite=False)
    if explicit.get("resume"):
        cfg = resumed_config(explicit)
    elif isinstance(config, TrainConfig) and not overrides:
        cfg = config
    else:
        cfg = build_config(**explicit)
    trainer = Trainer(cfg, model_factory)
    try:
        return trainer.run()
    finally:
        trainer.close()


def divergence_message(loss: float, where: str, saved: Path | None) -> str:
    """What to do when the loss became ``loss`` at ``where``; ``saved``: the last checkpoint."""
    if saved is None:
        return (
            f"the training loss became {loss} {where}, before any checkpoint was saved; "
            "start again with a lower learning rate (--lr) or check the data"
        )
    return (
        f"the training loss became {loss} {where}; stopped without saving (the last good "
        f"checkpoint is {saved}): check the data, or train on from those weights with a "
        f"lower learning rate in a new run (--init-from {saved} --lr ... --out ...)"
    )


class Trainer:
    """One training job; :func:`train` is the usual entry point."""

    def __init__(
        self, cfg: TrainConfig, model_factory: Callable[..., nn.Module] = create_model
    ) -> None:
        if model_factory is create_model and not cfg.init_from:
            check_model_name(cfg.model)  # before anything slower can fail for another reason
        self.model_factory = model_factory
        self.cfg = cfg
        self.start_time = time.time()
        self.unflipped_top1: float | None = None  # with eval_flip: the last top-1 without
        set_threads(cfg)
        self.device = train_device(cfg)
        # "auto" becomes what it chose, so config.yaml records it and a resume keeps it.
        self.amp_chosen_by = "auto: " if cfg.amp == "auto" else ""
        cfg = self.cfg = dataclasses.replace(cfg, amp=training_amp(cfg.amp, self.device))
        self.device, self.dist = start_process(cfg, self.device)
        self.out = Path(cfg.out)
        self.folder = RunFolder(self.out, self.dist.is_main)
        self.log = RunLog(self.out, self.dist.is_main)
        self.folder.check(cfg)
        barrier(self.dist)  # every process has checked before the main one writes
        self.folder.prepare(cfg)
        self.log.open_file()
        barrier(self.dist)
        try:
            self._build_data()
            self._build_model()
            self.optimizer = build_optimizer(self.model, cfg)
            self.plan = BudgetPlan(
                cfg,
                self.start_time,
                self.steps_per_epoch,
                self.val_set,
                self.train_indices,
                self.dist,
            )
            if cfg.time_budget and not (cfg.resume and self.folder.newest_saved()):
                self._plan_length()  # a resumed run keeps the length planned at its start
                cfg = self.cfg
            self.scheduler, self.total_steps = build_scheduler(
                self.optimizer, cfg, self.steps_per_epoch
            )
            self.scaler = torch.amp.GradScaler(
                self.device.type, enabled=cfg.amp == "fp16" and self.device.type == "cuda"
            )
            self.state = TrainState()
            if cfg.resume:
                self._resume()
        except BaseException:
            self.log.close()
            self.folder.abandon()  # a run that fails to start leaves no empty folder behind
            raise
        # Written once data, model and checkpoint have loaded: a run that fails to start
        # leaves no config.yaml, so the corrected command is not refused as another run.
        self.folder.write_config(cfg)
        self.log.open_writer(self.state.global_step)

    # ----------------------------------------------------------------------------------------
    # Setup

    def _build_data(self) -> None:
        data = build_data(self.cfg)
        self.train_set, self.val_set, self.classes = data.train_set, data.val_set, data.classes
        self.train_indices, self.steps_per_epoch = data.train_indices, data.steps_per_epoch
        self.data = data

    def _build_model(self) -> None:
        cfg = self.cfg
        model, self.model_name, self.model_kwargs = initial_model(
            cfg, self.model_factory, len(self.classes), self.log
        )
        if getattr(model, "pretrained_cfg", None) is not None:
            # A folder-trained model's classes are its own (timm's label_names), not the
            # registered data set's.
            describe_classes(model.pretrained_cfg, len(self.classes), self.classes)
        self.data_cfg = data_config(model)
        self.model, self.raw_model, self.memory_format = placed_for_training(
            cfg, model, self.device, self.dist
        )
        self.ema = None
        if cfg.ema_decay:
            # timm's EMA with its warm-up: early averages do not drag the random init along.
            self.ema = ModelEma(self.raw_model, decay=cfg.ema_decay, use_warmup=True)
        self.batches: Any = training_batches(cfg, self.data, self.data_cfg, self.dist.rank)
        self.evaluator = Evaluator(
            self.device,
            self.memory_format,
            self._autocast,
            max(1, cfg.batch_size // self.dist.world_size),
            self.dist,
            self.log,
            precision={"none": "fp32", "bf16": "bf16"}.get(cfg.amp, cfg.amp),
        )

    def close(self) -> None:
        """Close log files and leave the process group."""
        self.log.close()
        shutdown_distributed()

    def _plan_length(self) -> None:
        """Set ``epochs`` so that the run ends inside ``time_budget`` on this machine."""
        cfg = self.cfg
        speed = measure_speed(
            self.raw_model,
            lambda m: build_optimizer(m, cfg),
            probe_batches(cfg, self.batches, self.train_indices, self.dist),
            self._autocast,
            self.device,
            self.memory_format,
            self.evaluator.runner,
            self.evaluator.eval_batch_size,
        )
        self.cfg = dataclasses.replace(cfg, epochs=self.plan.first(speed) / self.steps_per_epoch)

    def replan(self, pace_seconds: float) -> None:
        """Fit the rest of the run to the budget at the pace of its steps so far."""
        steps = self.plan.again(self.state.global_step, pace_seconds)
        self.cfg = dataclasses.replace(self.cfg, epochs=steps / self.steps_per_epoch)
        self.scheduler, self.total_steps = rescheduled(
            self.optimizer, self.scheduler, self.cfg, self.steps_per_epoch
        )
        self.folder.write_config(self.cfg)  # before any checkpoint: a resume continues this plan
        self.log(
            f"time budget: re-planned after {self.state.global_step} steps at "
            f"{self.cfg.batch_size / pace_seconds:.0f} training images/s: "
            f"{self.cfg.epochs:.2f} epochs ({self.total_steps:,} steps)"
        )

    # ----------------------------------------------------------------------------------------
    # Checkpoints

    def _payload(self) -> dict[str, Any]:
        rng = rng_state()
        if self.dist.enabled:
            every: list[Any] = [None] * self.dist.world_size
            dist.all_gather_object(every, rng)
        else:
            every = [rng]
        config = getattr(self.raw_model, "config", None)
        return dict(
            model_name=self.model_name,
            model_config=config.to_dict() if config is not None else {},
            # Models without a config (the ablation's ResNets) are rebuilt from these.
            model_kwargs={} if config is not None else self.model_kwargs,
            # The weights that were evaluated (the average, with EMA) are what a loader gets;
            # the training weights travel separately for resuming.
            model=self._evaluated_model().state_dict(),
            train_model=self.raw_model.state_dict() if self.ema is not None else None,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            rng=every,
            train_state=self.state.to_dict(),
            config=self.cfg.to_dict(),
            class_names=self.classes,
            pretrained_cfg={
                k: list(v) if isinstance(v, tuple) else v
                for k, v in self.data_cfg.items()
                if isinstance(v, (str, int, float, bool, tuple, list)) or v is None
            },
        )

    def save(self, best: bool = False) -> None:
        """Write ``last.pt`` (keeping the previous one as ``last.prev.pt``) and maybe ``best.pt``.

        Every process takes part (RNG states are gathered); only the main one writes.
        """
        self.folder.save(self._payload(), best)
        barrier(self.dist)

    def _resume(self) -> None:
        payload = self.folder.latest_checkpoint(self.device, self.log)
        if payload is None:
            self.log(f"no checkpoint to resume in {self.out}; starting from the beginning")
            return
        self.raw_model.load_state_dict(payload.get("train_model") or payload["model"])
        if self.ema is not None:
            self.ema.module.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.scaler.load_state_dict(payload["scaler"])
        self.state = TrainState.from_dict(payload["train_state"])
        rng = payload["rng"]
        set_rng_state(rng[self.dist.rank] if self.dist.rank < len(rng) else rng[0])
        if self.state.path_drop_on:
            self.raw_model.set_path_drop(self.cfg.path_drop)
        self.log(
            f"resumed {self.out} at epoch {self.state.epoch + 1}, step {self.state.global_step}"
        )

    # ----------------------------------------------------------------------------------------
    # Evaluation

    def evaluate(self, limit: int | None = None) -> tuple[float, float, int]:
        """Mean loss, top-1 (%) and image count on the validation split (all processes)."""
        assert self.val_set is not None
        if self.cfg.bn_recalibrate:
            self.recalibrate_batchnorm(self.cfg.bn_recalibrate)
        # Without the DDP wrapper: processes may run different numbers of evaluation batches.
        model = self._evaluated_model() if self.dist.enabled or self.ema else self.model
        n = len(self.val_set) if limit is None else min(limit, len(self.val_set))
        workers = self.cfg.workers if not hasattr(self.val_set, "images") else 0
        loss, top1, count, unflipped = self.evaluator.validate(
            model,
            self.val_set,
            eval_indices(n, self.dist),
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
        self.evaluator.recalibrate_batchnorm(
            self._evaluated_model(), self.train_set, indices, self.data_cfg
        )

    def _evaluated_model(self) -> nn.Module:
        """The weights a run evaluates and publishes: the moving average with EMA."""
        return self.ema.module if self.ema is not None else self.raw_model

    def _autocast(self) -> torch.autocast:
        enabled = self.cfg.amp != "none"  # bf16 on a CPU too; fp16 there is refused at setup
        dtype = torch.bfloat16 if self.cfg.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype, enabled=enabled)

    # ----------------------------------------------------------------------------------------
    # Training

    def switch_path_drop(self, epoch: int, reason: str) -> None:
        """Turn stochastic paths on from ``epoch`` (0-based) and say why in the log."""
        self.raw_model.set_path_drop(self.cfg.path_drop)
        self.state.path_drop_on, self.state.path_drop_epoch = True, epoch
        self.log(
            f"stochastic paths on from epoch {epoch + 1} ({reason}): drop probability 0 at the "
            f"first unit rising to {self.cfg.path_drop} at the last"
        )

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
        """One optimizer step on a batch: its mean loss and correct predictions.

        Raises:
            TrainingDiverged: If the loss is not finite in any process (nothing is updated).

        """
        images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        labels = labels.to(self.device, non_blocking=True)
        with self._autocast():
            logits = self.model(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.label_smoothing)
        loss_value = loss.item()
        finite = all_sum(self.dist, float(math.isfinite(loss_value)))[0] == self.dist.world_size
        if not finite:
            where = f"at step {self.state.global_step + 1} (epoch {self.state.epoch + 1})"
            raise TrainingDiverged(
                divergence_message(loss_value, where, self.folder.newest_saved())
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.raw_model, step=self.state.global_step + 1)
        correct = (logits.detach().argmax(1) == labels).sum().item()
        return loss_value, correct

    def run(self) -> TrainResult:
        """Train to the end of the configured run and evaluate the final weights."""
        return EpochLoop(self).run()
