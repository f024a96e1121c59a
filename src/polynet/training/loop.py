"""The training loop: data, model, recipe, logging, checkpoints, resume and distributed runs.

``train(cfg)`` runs a whole job and returns a :class:`TrainResult`. The output folder holds:

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
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from polynet.devices import training_amp
from polynet.errors import UserError
from polynet.network import compile_units, describe_classes
from polynet.training.batches import TensorTrainBatches
from polynet.training.budget import (
    PROBE_STEPS,
    REPLAN_AFTER_STEPS,
    REPLAN_PACE_MARGIN,
    Eta,
    evaluation_work,
    measure_speed,
    plan_steps,
)
from polynet.training.config import TrainConfig, build_config
from polynet.training.distributed import (
    DistInfo,
    all_sum,
    barrier,
    eval_indices,
    init_distributed,
    shutdown_distributed,
    train_batches,
)
from polynet.training.ema import ModelEma
from polynet.training.evaluation import Evaluator
from polynet.training.logs import RunLog, plot_curves
from polynet.training.recipe import build_optimizer, build_scheduler, rescheduled
from polynet.training.rundir import RUN_FILES, RunFolder, resumed_config
from polynet.training.setup import (
    build_data,
    data_config,
    initial_model,
    set_threads,
    train_device,
    training_batches,
)
from polynet.training.state import TrainState, rng_state, seed_everything, set_rng_state
from polynet.zoo import check_model_name, create_model

__all__ = ["RUN_FILES", "TrainResult", "Trainer", "TrainingDiverged", "plot_curves", "train"]


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    """What a finished run reports.

    Attributes:
        out: The output folder.
        config: The run's whole configuration (a resumed run's is the saved one).
        final_top1: Top-1 (%) of the final weights on the whole validation split (or None).
        final_loss: Mean loss there.
        val_images: Images in that evaluation.
        best_top1: Best per-epoch validation top-1 (%).
        steps: Optimizer steps run in total.
        epochs: Epochs run (fractional for a step-limited run).
        images_per_second: Training throughput of this process's session.
        seconds: Wall time of this session.
        history: Per-epoch metrics.

    """

    out: Path
    config: TrainConfig
    final_top1: float | None = None
    final_loss: float | None = None
    val_images: int = 0
    best_top1: float | None = None
    steps: int = 0
    epochs: float = 0.0
    images_per_second: float = 0.0
    seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


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


_PACE_FROM_STEP = 10  # a re-plan times the steps after this one (the first pay for set-up)


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
        self.plan_note = ""  # the time budget's plan, logged after the run's first line
        self.replan_at: int | None = None  # the step after which the plan is made again
        set_threads(cfg)
        self.device = train_device(cfg)
        # "auto" becomes what it chose, so config.yaml records it and a resume keeps it.
        self.amp_chosen_by = "auto: " if cfg.amp == "auto" else ""
        cfg = self.cfg = dataclasses.replace(cfg, amp=training_amp(cfg.amp, self.device))
        self.dist: DistInfo = init_distributed(self.device)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        if cfg.sync_bn and self.dist.enabled and self.device.type != "cuda":
            raise UserError("sync_bn needs CUDA (SyncBatchNorm has no CPU version); drop --sync-bn")
        if cfg.batch_size % self.dist.world_size:
            raise UserError(
                f"batch_size {cfg.batch_size} does not split evenly over "
                f"{self.dist.world_size} processes; use a multiple of {self.dist.world_size}"
            )
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        seed_everything(cfg.seed + self.dist.rank)
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
        self.raw_model = model.to(self.device)
        self.data_cfg = data_config(model)
        channels_last = (
            cfg.channels_last if cfg.channels_last is not None else self.device.type == "cuda"
        )
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.raw_model.to(memory_format=self.memory_format)
        model = self.raw_model
        if cfg.sync_bn and self.dist.enabled:
            model = self.raw_model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if cfg.compile:
            model = compile_units(model)  # regional: the units compile in place
        if self.dist.enabled:
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.model = model
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
        order = train_batches(len(self.train_indices), cfg.batch_size, cfg.seed, 0, self.dist)
        # A small training set has fewer batches than the probe times: it sees them again.
        first = [self.train_indices[order[i % len(order)]] for i in range(PROBE_STEPS)]
        if isinstance(self.batches, TensorTrainBatches):
            probe_batches = (self.batches(b, 0, i) for i, b in enumerate(first))
        else:
            probe_batches = self.batches.epoch(first, 0)
        speed = measure_speed(
            self.raw_model,
            lambda m: build_optimizer(m, cfg),
            probe_batches,
            self._autocast,
            self.device,
            self.memory_format,
            self.evaluator.runner,
            self.evaluator.eval_batch_size,
        )
        left = cfg.time_budget - (time.time() - self.start_time)
        steps = plan_steps(cfg, speed, left, self.steps_per_epoch, self.val_set, self.train_indices)
        # Every process runs the main process's plan.
        steps = int(all_sum(self.dist, float(steps) if self.dist.is_main else 0.0)[0])
        self.cfg = dataclasses.replace(cfg, epochs=steps / self.steps_per_epoch)
        self.speed = speed
        first_save = min(cfg.checkpoint_every or self.steps_per_epoch, self.steps_per_epoch)
        # Re-planned within the first epoch, whose batches are drawn in full.
        if _PACE_FROM_STEP + 10 <= min(REPLAN_AFTER_STEPS, first_save) and (
            steps >= self.steps_per_epoch
        ):
            self.replan_at = min(REPLAN_AFTER_STEPS, first_save)
        self.plan_note = (
            f"time budget {cfg.time_budget:g} s: planned at "
            f"{cfg.batch_size / speed.step_seconds:.0f} training, "
            f"{1 / speed.eval_image_seconds:.0f} validation and "
            f"{1 / speed.recalibration_image_seconds:.0f} recalibration images/s (measured "
            f"here, less a margin): {self.cfg.epochs:.2f} epochs ({steps:,} steps)"
        )

    def _replan(self, pace_seconds: float) -> None:
        """Fit the rest of the run to the budget at the pace of its steps so far."""
        cfg, state = self.cfg, self.state
        speed = dataclasses.replace(self.speed, step_seconds=pace_seconds * REPLAN_PACE_MARGIN)
        left = cfg.time_budget - (time.time() - self.start_time)
        more = plan_steps(cfg, speed, left, self.steps_per_epoch, self.val_set, self.train_indices)
        more = int(all_sum(self.dist, float(more) if self.dist.is_main else 0.0)[0])
        epochs = (state.global_step + more) / self.steps_per_epoch
        self.cfg = dataclasses.replace(cfg, epochs=epochs)
        self.scheduler, self.total_steps = rescheduled(
            self.optimizer, self.scheduler, self.cfg, self.steps_per_epoch
        )
        self.folder.write_config(self.cfg)  # before any checkpoint: a resume continues this plan
        self.replan_at = None
        self.log(
            f"time budget: re-planned after {state.global_step} steps at "
            f"{cfg.batch_size / pace_seconds:.0f} training images/s: {self.cfg.epochs:.2f} "
            f"epochs ({self.total_steps:,} steps)"
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

    def _switch_path_drop(self, epoch: int, reason: str) -> None:
        self.raw_model.set_path_drop(self.cfg.path_drop)
        self.state.path_drop_on, self.state.path_drop_epoch = True, epoch
        self.log(
            f"stochastic paths on from epoch {epoch + 1} ({reason}): drop probability 0 at the "
            f"first unit rising to {self.cfg.path_drop} at the last"
        )

    def _train_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
        images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        labels = labels.to(self.device, non_blocking=True)
        with self._autocast():
            logits = self.model(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.label_smoothing)
        loss_value = loss.item()
        finite = all_sum(self.dist, float(math.isfinite(loss_value)))[0] == self.dist.world_size
        if not finite:
            raise TrainingDiverged(self._divergence_message(loss_value))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.raw_model, step=self.state.global_step + 1)
        correct = (logits.detach().argmax(1) == labels).sum().item()
        return loss_value, correct

    def _divergence_message(self, loss: float) -> str:
        where = f"at step {self.state.global_step + 1} (epoch {self.state.epoch + 1})"
        saved = self.folder.newest_saved()
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

    def run(self) -> TrainResult:
        """Train to the end of the configured run and evaluate the final weights."""
        cfg, state = self.cfg, self.state
        num_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        session_images, session_start = 0, time.time()
        self.eta = Eta(evaluation_work(cfg, self.val_set, len(self.train_indices)), cfg.batch_size)
        if state.global_step == 0:
            params = sum(p.numel() for p in self.raw_model.parameters())
            precision = {"none": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}[cfg.amp]
            self.log(
                f"training {self.model_name} ({params:,} parameters) on {cfg.data}: "
                f"{len(self.train_indices):,} images, {self.total_steps:,} steps of "
                f"{cfg.batch_size} ({self.total_steps / self.steps_per_epoch:.3g} epochs), lr "
                f"{cfg.learning_rate:g}, {self.dist.world_size} process(es) on {self.device} "
                f"({torch.get_num_threads()} threads, {self.amp_chosen_by}{precision})"
            )
            if self.plan_note:
                self.log(self.plan_note)
        while state.global_step < self.total_steps:
            epoch = state.epoch
            if (
                not state.path_drop_on
                and cfg.path_drop_epoch is not None
                and epoch >= cfg.path_drop_epoch
                and cfg.path_drop > 0
            ):
                self._switch_path_drop(epoch, f"path_drop_epoch {cfg.path_drop_epoch:g}")
            order = train_batches(
                len(self.train_indices), cfg.batch_size, cfg.seed, epoch, self.dist
            )
            steps_here = min(
                len(order), self.total_steps - (state.global_step - state.step_in_epoch)
            )
            start = state.step_in_epoch
            batches = [self.train_indices[b] for b in order[start:steps_here]]
            if isinstance(self.batches, TensorTrainBatches):
                stream = (self.batches(b, epoch, start + i) for i, b in enumerate(batches))
            else:
                stream = self.batches.epoch(batches, epoch)
            self.model.train()
            bar = tqdm(
                total=steps_here,
                initial=start,
                desc=f"epoch {epoch + 1}/{num_epochs}",
                disable=not (self.dist.is_main and cfg.progress),
                dynamic_ncols=True,
                leave=False,
                file=sys.stderr,
            )
            tick = step_start = pace_mark = time.time()
            for images, labels in stream:
                if state.global_step >= self.total_steps:  # a re-plan shortened the run
                    break
                loss, correct = self._train_step(images, labels)
                n = len(labels)
                state.add_batch(loss, correct, n)
                session_images += n * self.dist.world_size
                now = time.time()
                self.eta.step(now - step_start)
                step_start = now
                if state.global_step == _PACE_FROM_STEP:
                    pace_mark = now
                if state.global_step == self.replan_at:
                    self._replan((now - pace_mark) / (state.global_step - _PACE_FROM_STEP))
                    num_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
                rate = self.eta.images_per_second * self.dist.world_size
                remaining = self.eta.seconds_left(
                    self.total_steps - state.global_step, self._evaluations_left(num_epochs)
                )
                bar.update(1)
                bar.set_postfix(
                    loss=f"{state.loss_sum / state.images:.3f}",
                    acc=f"{100 * state.correct / state.images:.1f}",
                    img_s=f"{rate:.0f}",
                    eta=f"{remaining / 60:.1f}m",
                    refresh=False,
                )
                if state.global_step % cfg.log_every == 0:
                    lr = self.optimizer.param_groups[0]["lr"]
                    self.log.scalars(
                        state.global_step,
                        "train",
                        dict(loss=loss, lr=lr, images_per_second=rate),
                    )
                if cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0:
                    if state.step_in_epoch < steps_here:  # the epoch end saves anyway
                        self.save()
            bar.close()
            self._end_epoch(epoch, state.step_in_epoch == len(order), time.time() - tick)
            step_start = time.time()
        result = self._finish(session_images, time.time() - session_start)
        return result

    def _evaluations_left(self, num_epochs: int) -> int:
        """Per-epoch evaluations from the current epoch (included) to the end of the run."""
        every = self.cfg.eval_every
        if not every or self.val_set is None:
            return 0
        epochs = range(self.state.epoch, num_epochs)
        return sum(1 for e in epochs if (e + 1) % every == 0 or e == num_epochs - 1)

    def _end_epoch(self, epoch: int, complete: bool, seconds: float) -> None:
        cfg, state = self.cfg, self.state
        loss_sum, correct, count = all_sum(self.dist, state.loss_sum, state.correct, state.images)
        row: dict[str, Any] = dict(
            epoch=epoch + (1 if complete else state.step_in_epoch / self.steps_per_epoch),
            step=state.global_step,
            lr=self.optimizer.param_groups[0]["lr"],
            train_loss=loss_sum / max(count, 1),
            train_top1=100 * correct / max(count, 1),
            path_drop=self.raw_model.path_drop_rate,
            seconds=seconds,
        )
        is_best = False
        last_epoch = state.global_step >= self.total_steps
        if (
            self.val_set is not None
            and cfg.eval_every
            and ((epoch + 1) % cfg.eval_every == 0 or last_epoch)
        ):
            started = time.time()
            row["val_loss"], row["val_top1"], row["val_images"] = self.evaluate(cfg.val_subset)
            self.eta.evaluated(time.time() - started)
            is_best = state.best_top1 is None or row["val_top1"] > state.best_top1
            if is_best:
                state.best_top1 = row["val_top1"]
            gap = row["train_top1"] - row["val_top1"]
            if (
                cfg.path_drop_gap is not None
                and not state.path_drop_on
                and cfg.path_drop > 0
                and gap > cfg.path_drop_gap
                and not last_epoch
            ):
                self._switch_path_drop(
                    epoch + 1, f"train-val top-1 gap {gap:.1f} > {cfg.path_drop_gap:g}"
                )
        state.history.append(row)
        val = (
            f", val loss {row['val_loss']:.4f}, val top-1 {row['val_top1']:.2f}%"
            if "val_top1" in row
            else ""
        )
        self.log(
            f"epoch {round(row['epoch'], 2):g}: train loss {row['train_loss']:.4f}, train top-1 "
            f"{row['train_top1']:.2f}%{val}, lr {row['lr']:.4g}, {seconds:.0f} s"
        )
        self.log.scalars(
            state.global_step, "epoch", {k: v for k, v in row.items() if k not in ("epoch", "step")}
        )
        state.next_epoch()
        self.save(best=is_best)
        self.log.metrics(state.history)

    def _finish(self, session_images: int, seconds: float) -> TrainResult:
        cfg, state = self.cfg, self.state
        result = TrainResult(
            out=self.out,
            config=cfg,
            best_top1=state.best_top1,
            steps=state.global_step,
            epochs=state.global_step / self.steps_per_epoch,
            images_per_second=session_images / max(seconds, 1e-9),
            seconds=seconds,
            history=list(state.history),
        )
        if self.val_set is not None and cfg.final_eval:  # on the whole split unless val_subset
            last = state.history[-1] if state.history else {}
            if last.get("step") == state.global_step and "val_top1" in last:
                # The last epoch already evaluated these weights on the same images.
                result.final_loss, result.final_top1 = last["val_loss"], last["val_top1"]
                result.val_images = last["val_images"]
            else:
                result.final_loss, result.final_top1, result.val_images = self.evaluate(
                    cfg.val_subset
                )
            flip = ""
            if cfg.eval_flip and self.unflipped_top1 is not None:
                flip = f" with test-time flips ({self.unflipped_top1:.2f}% without)"
            self.log(
                f"final weights: top-1 {result.final_top1:.2f}% on the {result.val_images:,} "
                f"{'test' if 'mnist' in cfg.data.lower() else 'validation'} images{flip}"
            )
        self.folder.write_result(
            dict(
                final_top1=result.final_top1,
                final_loss=result.final_loss,
                val_images=result.val_images,
                best_top1=result.best_top1,
                steps=result.steps,
                images_per_second=result.images_per_second,
                seconds=seconds,
            )
        )
        if self.dist.is_main:
            plot_curves(state.history, self.out / "curve.png")
        return result
