"""A training job from start to end: ``train(cfg)``, and the loop that drives its steps.

:class:`~polynet.training.trainer.Trainer` builds what a run is made of and saves and restores
it; :class:`TrainingLoop` drives it from its current step to the end: the progress bar and
ETA, stochastic paths switched on, the re-plans of a time budget, checkpoints within an epoch,
each epoch's evaluation and metrics row, and the final evaluation.

Steps leave their loss and correct counts on the device; the loop reads them back (one
collective over the processes, one host synchronisation) only where it reports or saves:
every ``log_every`` steps, before a checkpoint and at the end of an epoch. A non-finite loss
found there stops the run before anything is saved.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from polynet.distributed import launch_env
from polynet.errors import UserError
from polynet.model.zoo import create_model
from polynet.training.batches import train_batches
from polynet.training.budget import Eta, evaluation_work, evaluations_left
from polynet.training.config import TrainConfig, build_config
from polynet.training.logs import plot_curves
from polynet.training.planning import PACE_FROM_STEP
from polynet.training.rundir import RUN_FILES, resumed_config
from polynet.training.step import StepTotals
from polynet.training.trainer import Trainer

__all__ = [
    "RUN_FILES",
    "TrainResult",
    "Trainer",
    "TrainingDiverged",
    "TrainingLoop",
    "plot_curves",
    "train",
]


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    """What a finished run reports.

    Attributes:
        out: The output folder.
        config: The run's configuration as asked (a resumed run's is the saved one).
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


def given_settings(config: TrainConfig | Mapping[str, Any] | None) -> dict[str, Any]:
    """The settings a caller named: a mapping's keys, or those a :class:`TrainConfig` was given.

    ``TrainConfig(out=RUN, resume=True)`` names ``out`` and ``resume`` only, so a resume
    compares nothing else with the saved run; a value named explicitly counts even where it
    equals the default.
    """
    if isinstance(config, TrainConfig):
        return {k: getattr(config, k) for k in config.given}
    return dict(config or {})


def train(
    config: TrainConfig | Mapping[str, Any] | None = None,
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
            :func:`~polynet.model.zoo.create_model` unless a workflow trains other networks too (the
            ablation's ResNet baselines).
        **overrides: Config keys that win over ``config``.

    Returns:
        The run's :class:`TrainResult`.

    Raises:
        ValueError: For bad settings, a folder holding another run, or a diverged loss.

    """
    explicit = {**given_settings(config), **overrides}
    if launch_env().restart > 0:
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
        return TrainingLoop(trainer).run()
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


class TrainingLoop:
    """Runs a :class:`~polynet.training.trainer.Trainer` from its current step to the end.

    Args:
        trainer: The built (and possibly resumed) run.

    """

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        cfg = trainer.cfg
        self.eta = Eta(
            evaluation_work(cfg, trainer.val_set, len(trainer.train_indices)), cfg.batch_size
        )
        self.totals = StepTotals(trainer.device)
        self.last_loss = math.nan  # mean training loss since the last read, for the log

    def run(self) -> TrainResult:
        """Train to the end of the planned run and evaluate the final weights."""
        t = self.trainer
        state = t.state
        session_start = time.time()
        self.session_images = 0
        self.pace_mark: tuple[float, int] | None = None  # (step seconds, steps) of the last plan
        if state.global_step == 0:
            self._announce()
        while state.global_step < t.total_steps:
            self._epoch()
        return self._finish(time.time() - session_start)

    def _announce(self) -> None:
        t, cfg = self.trainer, self.trainer.cfg
        params = sum(p.numel() for p in t.raw_model.parameters())
        precision = {"none": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}[cfg.amp]
        threads = torch.get_num_threads()
        processes = t.group.world_size
        t.log(
            f"training {t.model_name} ({params:,} parameters) on {cfg.data}: "
            f"{len(t.train_indices):,} images, {t.total_steps:,} steps of "
            f"{cfg.batch_size} ({t.total_steps / t.steps_per_epoch:.3g} epochs), lr "
            f"{cfg.learning_rate:g}, {processes} process{'es' if processes != 1 else ''} on "
            f"{t.device} ({threads} thread{'s' if threads != 1 else ''}, "
            f"{t.amp_chosen_by}{precision})"
        )
        if t.plan.note:
            t.log(t.plan.note)

    def _steps_this_epoch(self, epoch_steps: int) -> int:
        """Steps of the current epoch that the plan in force runs (the bar's total)."""
        t = self.trainer
        return min(epoch_steps, t.state.step_in_epoch + t.total_steps - t.state.global_step)

    def _epoch(self) -> None:
        """Run the current epoch to its end, or to the run's end if that comes first.

        The epoch's batches are its whole permutation from where it stands: a re-plan that
        lengthens the run goes on through them, so no sample is skipped or repeated.
        """
        t = self.trainer
        cfg, state, epoch = t.cfg, t.state, t.state.epoch
        if (
            not state.path_drop_on
            and cfg.path_drop_epoch is not None
            and epoch >= cfg.path_drop_epoch
            and cfg.path_drop > 0
        ):
            t.switch_path_drop(epoch, f"path_drop_epoch {cfg.path_drop_epoch:g}")
        order = train_batches(
            len(t.train_indices), cfg.batch_size, cfg.seed, epoch, t.group.rank, t.group.world_size
        )
        start = state.step_in_epoch
        stream = t.batches.epoch([t.train_indices[b] for b in order[start:]], epoch, start)
        t.model.train()
        bar = tqdm(
            total=self._steps_this_epoch(len(order)),
            initial=start,
            desc=f"epoch {epoch + 1}/{math.ceil(t.total_steps / t.steps_per_epoch)}",
            disable=not (t.group.is_main and cfg.progress),
            dynamic_ncols=True,
            leave=False,
            file=sys.stderr,
        )
        tick = step_start = time.time()
        for images, labels in stream:
            self.totals.add(t.train_step(images, labels), state.global_step + 1)
            state.advance()
            self.session_images += len(labels) * t.group.world_size
            now = time.time()
            self.eta.step(now - step_start)
            step_start = now
            self._maybe_replan(bar, len(order))
            bar.update(1)
            ends_epoch = state.step_in_epoch == len(order) or state.global_step >= t.total_steps
            saves = bool(cfg.checkpoint_every) and state.global_step % cfg.checkpoint_every == 0
            if ends_epoch or saves or state.global_step % cfg.log_every == 0:
                self._read_totals(bar, len(order))
            if saves and not ends_epoch:  # the epoch end saves anyway
                t.save()
            if ends_epoch:
                break
        bar.close()
        self._end_epoch(epoch, state.step_in_epoch == len(order), time.time() - tick)

    def _maybe_replan(self, bar: tqdm, epoch_steps: int) -> None:
        t, state = self.trainer, self.trainer.state
        if state.global_step == PACE_FROM_STEP:
            self.pace_mark = (self.eta.step_seconds, self.eta.steps)
        if state.global_step == t.plan.replan_at and self.pace_mark is not None:
            # The steps' own pace since the last plan: evaluations are costed apart.
            seconds, steps = self.eta.step_seconds, self.eta.steps
            t.replan((seconds - self.pace_mark[0]) / max(1, steps - self.pace_mark[1]))
            self.pace_mark = (seconds, steps)
            bar.total = self._steps_this_epoch(epoch_steps)
            bar.set_description(
                f"epoch {state.epoch + 1}/{math.ceil(t.total_steps / t.steps_per_epoch)}"
            )

    def _read_totals(self, bar: tqdm, epoch_steps: int) -> None:
        """Bring the steps' sums to the host (all processes); stop on a non-finite loss."""
        t, state = self.trainer, self.trainer.state
        loss_sum, correct, images, bad = self.totals.read(t.group)
        if bad is not None:
            step, loss = bad
            where = f"at step {step} (epoch {state.epoch + 1})"
            raise TrainingDiverged(divergence_message(loss, where, t.folder.newest_saved()))
        state.add_totals(loss_sum, correct, images)
        self.last_loss = loss_sum / max(images, 1)
        rate = self.eta.images_per_second * t.group.world_size
        remaining = self.eta.seconds_left(
            t.total_steps - state.global_step,
            evaluations_left(
                t.cfg,
                state.epoch,
                math.ceil(t.total_steps / t.steps_per_epoch),
                t.val_set is not None,
            ),
        )
        bar.set_postfix(
            loss=f"{state.loss_sum / max(state.images, 1):.3f}",
            acc=f"{100 * state.correct / max(state.images, 1):.1f}",
            img_s=f"{rate:.0f}",
            eta=f"{remaining / 60:.1f}m",
            refresh=False,
        )
        if state.global_step % t.cfg.log_every == 0:
            lr = t.optimizer.param_groups[0]["lr"]
            t.log.scalars(
                state.global_step,
                "train",
                dict(loss=self.last_loss, lr=lr, images_per_second=rate),
            )

    def _end_epoch(self, epoch: int, complete: bool, seconds: float) -> None:
        t = self.trainer
        cfg, state = t.cfg, t.state
        count = max(state.images, 1)
        row: dict[str, Any] = dict(
            epoch=epoch + (1 if complete else state.step_in_epoch / t.steps_per_epoch),
            step=state.global_step,
            lr=t.optimizer.param_groups[0]["lr"],
            train_loss=state.loss_sum / count,
            train_top1=100 * state.correct / count,
            path_drop=t.raw_model.path_drop_rate,
            seconds=seconds,
        )
        is_best = False
        last_epoch = state.global_step >= t.total_steps
        if (
            t.val_set is not None
            and cfg.eval_every
            and ((epoch + 1) % cfg.eval_every == 0 or last_epoch)
        ):
            started = time.time()
            row["val_loss"], row["val_top1"], row["val_images"] = t.evaluate(cfg.val_subset)
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
                t.switch_path_drop(
                    epoch + 1, f"train-val top-1 gap {gap:.1f} > {cfg.path_drop_gap:g}"
                )
        state.history.append(row)
        val = (
            f", val loss {row['val_loss']:.4f}, val top-1 {row['val_top1']:.2f}%"
            if "val_top1" in row
            else ""
        )
        t.log(
            f"epoch {round(row['epoch'], 2):g}: train loss {row['train_loss']:.4f}, train top-1 "
            f"{row['train_top1']:.2f}%{val}, lr {row['lr']:.4g}, {seconds:.0f} s"
        )
        t.log.scalars(
            state.global_step, "epoch", {k: v for k, v in row.items() if k not in ("epoch", "step")}
        )
        state.next_epoch()
        t.save(best=is_best)
        t.log.metrics(state.history)

    def _finish(self, seconds: float) -> TrainResult:
        t = self.trainer
        cfg, state = t.cfg, t.state
        result = TrainResult(
            out=t.out,
            config=t.asked,
            best_top1=state.best_top1,
            steps=state.global_step,
            epochs=state.global_step / t.steps_per_epoch,
            images_per_second=self.session_images / max(seconds, 1e-9),
            seconds=seconds,
            history=list(state.history),
        )
        if t.val_set is not None and cfg.final_eval:  # on the whole split unless val_subset
            last = state.history[-1] if state.history else {}
            if last.get("step") == state.global_step and "val_top1" in last:
                # The last epoch already evaluated these weights on the same images.
                result.final_loss, result.final_top1 = last["val_loss"], last["val_top1"]
                result.val_images = last["val_images"]
            else:
                result.final_loss, result.final_top1, result.val_images = t.evaluate(cfg.val_subset)
            flip = ""
            if cfg.eval_flip and t.unflipped_top1 is not None:
                flip = f" with test-time flips ({t.unflipped_top1:.2f}% without)"
            t.log(
                f"final weights: top-1 {result.final_top1:.2f}% on the {result.val_images:,} "
                f"{'test' if 'mnist' in cfg.data.lower() else 'validation'} images{flip}"
            )
        t.folder.write_result(
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
        if t.group.is_main:
            plot_curves(state.history, t.out / "curve.png")
        return result
