"""The course of a training run: its epochs, their progress and records, the final report.

:class:`~polynet.training.loop.Trainer` holds what a run is made of (data, model, optimizer,
checkpoints, evaluation); :class:`EpochLoop` drives it from its current step to the end: the
progress bar and ETA, stochastic paths switched on, the re-plan of a time budget, checkpoints
within an epoch, each epoch's evaluation and metrics row, and the final evaluation.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from polynet.training.batches import TensorTrainBatches
from polynet.training.budget import Eta, evaluation_work, evaluations_left
from polynet.training.config import TrainConfig
from polynet.training.distributed import all_sum, train_batches
from polynet.training.logs import plot_curves
from polynet.training.planning import PACE_FROM_STEP

if TYPE_CHECKING:
    from polynet.training.loop import Trainer


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


class EpochLoop:
    """Runs a :class:`~polynet.training.loop.Trainer` from its current step to the end.

    Args:
        trainer: The built (and possibly resumed) run.

    """

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        cfg = trainer.cfg
        self.eta = Eta(
            evaluation_work(cfg, trainer.val_set, len(trainer.train_indices)), cfg.batch_size
        )

    def run(self) -> TrainResult:
        """Train to the end of the configured run and evaluate the final weights."""
        t = self.trainer
        cfg, state = t.cfg, t.state
        num_epochs = math.ceil(t.total_steps / t.steps_per_epoch)
        session_images, session_start = 0, time.time()
        pace_mark: tuple[float, int] | None = None  # (step seconds, steps) where the pace starts
        if state.global_step == 0:
            params = sum(p.numel() for p in t.raw_model.parameters())
            precision = {"none": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}[cfg.amp]
            threads = torch.get_num_threads()
            processes = t.dist.world_size
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
        while state.global_step < t.total_steps:
            epoch = state.epoch
            if (
                not state.path_drop_on
                and cfg.path_drop_epoch is not None
                and epoch >= cfg.path_drop_epoch
                and cfg.path_drop > 0
            ):
                t.switch_path_drop(epoch, f"path_drop_epoch {cfg.path_drop_epoch:g}")
            order = train_batches(len(t.train_indices), cfg.batch_size, cfg.seed, epoch, t.dist)
            steps_here = min(len(order), t.total_steps - (state.global_step - state.step_in_epoch))
            start = state.step_in_epoch
            batches = [t.train_indices[b] for b in order[start:steps_here]]
            if isinstance(t.batches, TensorTrainBatches):
                stream = (t.batches(b, epoch, start + i) for i, b in enumerate(batches))
            else:
                stream = t.batches.epoch(batches, epoch)
            t.model.train()
            bar = tqdm(
                total=steps_here,
                initial=start,
                desc=f"epoch {epoch + 1}/{num_epochs}",
                disable=not (t.dist.is_main and cfg.progress),
                dynamic_ncols=True,
                leave=False,
                file=sys.stderr,
            )
            tick = step_start = time.time()
            for images, labels in stream:
                if state.global_step >= t.total_steps:  # a re-plan shortened the run
                    break
                loss, correct = t.train_step(images, labels)
                n = len(labels)
                state.add_batch(loss, correct, n)
                session_images += n * t.dist.world_size
                now = time.time()
                self.eta.step(now - step_start)
                step_start = now
                if state.global_step == PACE_FROM_STEP:
                    pace_mark = (self.eta.step_seconds, self.eta.steps)
                if state.global_step == t.plan.replan_at and pace_mark is not None:
                    # The steps' own pace since the last plan: evaluations are costed apart.
                    seconds, steps = self.eta.step_seconds, self.eta.steps
                    t.replan((seconds - pace_mark[0]) / max(1, steps - pace_mark[1]))
                    pace_mark = (seconds, steps)
                    num_epochs = math.ceil(t.total_steps / t.steps_per_epoch)
                rate = self.eta.images_per_second * t.dist.world_size
                remaining = self.eta.seconds_left(
                    t.total_steps - state.global_step,
                    evaluations_left(cfg, state.epoch, num_epochs, t.val_set is not None),
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
                    lr = t.optimizer.param_groups[0]["lr"]
                    t.log.scalars(
                        state.global_step,
                        "train",
                        dict(loss=loss, lr=lr, images_per_second=rate),
                    )
                if cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0:
                    if state.step_in_epoch < steps_here:  # the epoch end saves anyway
                        t.save()
            bar.close()
            self._end_epoch(epoch, state.step_in_epoch == len(order), time.time() - tick)
            step_start = time.time()
        result = self._finish(session_images, time.time() - session_start)
        return result

    def _end_epoch(self, epoch: int, complete: bool, seconds: float) -> None:
        t = self.trainer
        cfg, state = t.cfg, t.state
        loss_sum, correct, count = all_sum(t.dist, state.loss_sum, state.correct, state.images)
        row: dict[str, Any] = dict(
            epoch=epoch + (1 if complete else state.step_in_epoch / t.steps_per_epoch),
            step=state.global_step,
            lr=t.optimizer.param_groups[0]["lr"],
            train_loss=loss_sum / max(count, 1),
            train_top1=100 * correct / max(count, 1),
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

    def _finish(self, session_images: int, seconds: float) -> TrainResult:
        t = self.trainer
        cfg, state = t.cfg, t.state
        result = TrainResult(
            out=t.out,
            config=cfg,
            best_top1=state.best_top1,
            steps=state.global_step,
            epochs=state.global_step / t.steps_per_epoch,
            images_per_second=session_images / max(seconds, 1e-9),
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
        if t.dist.is_main:
            plot_curves(state.history, t.out / "curve.png")
        return result
