"""One training step, the same wherever a step is taken or timed.

:class:`TrainStep` is what a run's loop calls, what the time-budget probe times on a copy of the
model, what the ablation's timing pass and the bench time: forward under the run's autocast,
cross-entropy with the run's label smoothing, backward (gradients all-reduced by DDP in a
process group), the gradient scaler, optional clipping, the optimizer, the learning-rate
schedule and the moving average of the weights.

A step returns its loss and correct count as tensors on the device and reads nothing back to
the host: :class:`StepTotals` adds them up there, and the loop reads the totals when it logs,
saves or ends an epoch. A non-finite loss is remembered with its step, so the run stops at the
next read, before anything is saved.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from polynet.devices import autocast
from polynet.distributed import ProcessGroup
from polynet.model.regional import compile_units
from polynet.training.config import TrainConfig
from polynet.training.ema import ModelEma
from polynet.training.recipe import build_optimizer


@dataclass(frozen=True)
class StepOutput:
    """What one step computed, left on the device.

    Attributes:
        loss: Mean loss of the batch (0-dim, detached).
        correct: Correct top-1 predictions (0-dim integer tensor).
        images: Images in the batch.

    """

    loss: torch.Tensor
    correct: torch.Tensor
    images: int


class TrainStep:
    """One optimizer step on a batch.

    Args:
        model: What the step calls (the model, compiled or DDP-wrapped as the run is).
        optimizer: Steps the parameters of ``raw_model``.
        device: Where the batch goes.
        amp: Resolved autocast precision: ``"none"``, ``"bf16"`` or ``"fp16"``.
        raw_model: The model itself (what the EMA averages); ``model`` by default.
        label_smoothing: Cross-entropy label smoothing.
        ema: Moving average of ``raw_model``'s weights, updated after every step.
        memory_format: Memory format of the inputs.
        clip_grad: Clip the gradients' global L2 norm to this (None: no clipping).
        scheduler: Stepped after every optimizer step (None: a fixed learning rate).

    Attributes:
        count: Steps taken (the EMA's warm-up counts them); set it when resuming.

    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        amp: str = "none",
        *,
        raw_model: nn.Module | None = None,
        label_smoothing: float = 0.0,
        ema: ModelEma | None = None,
        memory_format: torch.memory_format = torch.contiguous_format,
        clip_grad: float | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ) -> None:
        self.model, self.raw_model = model, raw_model if raw_model is not None else model
        self.optimizer, self.scheduler, self.ema = optimizer, scheduler, ema
        self.device, self.amp, self.memory_format = device, amp, memory_format
        self.label_smoothing, self.clip_grad = label_smoothing, clip_grad
        # fp16 needs loss scaling; bf16 keeps fp32's exponent range and does not.
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        self.count = 0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        """Take one step on ``(images, labels)``; nothing is read back to the host."""
        images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        labels = labels.to(self.device, non_blocking=True)
        with autocast(self.device, self.amp):
            logits = self.model(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()
        self.count += 1
        if self.ema is not None:
            self.ema.update(self.raw_model, step=self.count)
        correct = (logits.detach().argmax(1) == labels).sum()
        return StepOutput(loss.detach(), correct, len(labels))


class StepTotals:
    """Loss, correct predictions and images summed over steps on the device, read when asked.

    A non-finite loss is remembered with the 1-based step it happened at (the first one).

    Args:
        device: Where the sums are kept.

    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._sums = torch.zeros(3, dtype=torch.float64, device=device)
        self._bad = torch.zeros(2, dtype=torch.float64, device=device)  # (step, loss)

    def add(self, out: StepOutput, step: int) -> None:
        """Count one step's output (``step``: the run's step number, from 1).

        Python numbers enter as kernel arguments, never as new device tensors: a tensor made
        from a host value on a GPU would be a copy that waits for the queue at every step.
        """
        loss = out.loss.to(torch.float64)
        finite = torch.isfinite(loss)
        self._sums[0] += torch.where(finite, loss * out.images, 0.0)
        self._sums[1] += out.correct
        self._sums[2] += out.images
        first = (~finite) & (self._bad[0] == 0)
        self._bad[0] = torch.where(first, float(step), self._bad[0])
        self._bad[1] = torch.where(first, loss, self._bad[1])

    def read(self, group: ProcessGroup) -> tuple[float, float, float, tuple[int, float] | None]:
        """Sum over processes and reset: loss x images, correct, images, and the first bad step.

        The bad step is ``(step, loss)`` of the earliest non-finite loss in any process, or None.
        Every process calls this at the same steps (it is a collective).
        """
        totals = group.all_sum(torch.cat([self._sums, self._bad[:1]])).tolist()
        bad = None
        if totals[3]:
            found = [tuple(b) for b in group.gather(self._bad.tolist()) if b[0]]
            step, loss = min(found)
            bad = (int(step), loss)
        self._sums.zero_()
        self._bad.zero_()
        return totals[0], totals[1], totals[2], bad


def wrap_for_training(
    raw: nn.Module, cfg: TrainConfig, device: torch.device, group: ProcessGroup
) -> nn.Module:
    """What a step calls for ``raw``: its units compiled and DDP-wrapped as ``cfg`` says."""
    model = raw
    if cfg.compile:
        model = compile_units(model)  # regional: the units compile in place
    if group.enabled:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    return model


def build_step(
    raw: nn.Module,
    cfg: TrainConfig,
    device: torch.device,
    group: ProcessGroup,
    memory_format: torch.memory_format,
    *,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
) -> TrainStep:
    """The step of a run with ``cfg`` (``amp`` resolved) for the model ``raw``, already placed.

    Everything a run's step does comes from here, so the time-budget probe and the ablation's
    timing pass take the very step the run takes: the optimizer, the moving average (timm's,
    with its warm-up, so early averages do not drag the random init along), label smoothing,
    the loss scaler, compilation and the process group's gradient all-reduce.
    """
    optimizer = (make_optimizer or (lambda m: build_optimizer(m, cfg)))(raw)
    ema = ModelEma(raw, decay=cfg.ema_decay, use_warmup=True) if cfg.ema_decay else None
    return TrainStep(
        wrap_for_training(raw, cfg, device, group),
        optimizer,
        device,
        cfg.amp,
        raw_model=raw,
        label_smoothing=cfg.label_smoothing,
        ema=ema,
        memory_format=memory_format,
    )


__all__ = ["StepOutput", "StepTotals", "TrainStep", "build_step", "wrap_for_training"]
