"""The paper's optimizer and learning-rate schedule.

RMSProp as in TensorFlow (section 4 of the paper): the squared-gradient average starts at one,
epsilon sits inside the square root and the learning rate is folded into the momentum buffer::

    ms  <- decay * ms + (1 - decay) * g^2
    mom <- momentum * mom + lr * g / sqrt(ms + eps)
    w   <- w - mom

timm's ``RMSpropTF`` implements exactly this (``tests/test_train.py`` checks one step by hand).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence

import torch
from timm.optim import RMSpropTF
from torch import nn

from polynet.training.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters into decayed weights and undecayed norms and biases (1-d tensors)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Build the optimizer named by ``cfg.optimizer`` at ``cfg.learning_rate``."""
    groups = param_groups(model, cfg.weight_decay)
    lr = cfg.learning_rate
    if cfg.optimizer == "rmsproptf":
        return RMSpropTF(groups, lr=lr, alpha=cfg.rms_decay, eps=cfg.rms_eps, momentum=cfg.momentum)
    # torch's fused kernels update every tensor in one call instead of one small kernel per
    # tensor: 5.0 -> 1.1 ms a step for the quick-start model's AdamW on two cores.
    fused = all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in model.parameters()
    )
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, fused=fused
        )
    return torch.optim.AdamW(groups, lr=lr, fused=fused)


def lr_factor(
    total_steps: int,
    schedule: str,
    decay_steps: Sequence[float],
    decay_rate: float,
    warmup_steps: float,
) -> Callable[[int], float]:
    """Return the learning-rate multiplier for step ``i`` (0-based), as a function.

    Args:
        total_steps: Run length in optimizer steps.
        schedule: ``"step"``: ``decay_rate ** (number of decay points <= i)``; ``"cosine"``:
            half a cosine from 1 to 0 over the run.
        decay_steps: Steps at which the step schedule decays (the paper: 160K, 320K, 480K).
        decay_rate: Step-decay factor (the paper: 0.1).
        warmup_steps: Linear ramp from ``1 / warmup_steps`` to 1 over the first steps.

    """
    points = sorted(decay_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:  # (a warm-up shorter than one step never exceeds the rate)
            return min(1.0, (step + 1) / warmup_steps)
        if schedule == "step":
            return decay_rate ** bisect.bisect_right(points, step)
        progress = (step - warmup_steps) / max(1.0, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def decay_points(cfg: TrainConfig, total_steps: int, steps_per_unit: float) -> list[float]:
    """Steps of the step decay: every ``lr_decay_every`` run units, else the run's fractions."""
    if cfg.lr_decay_every is None:
        return [fraction * total_steps for fraction in cfg.lr_decay_at]
    every = max(1.0, cfg.lr_decay_every * steps_per_unit)
    return [every * k for k in range(1, math.ceil(total_steps / every) + 1)]


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
) -> tuple[torch.optim.lr_scheduler.LambdaLR, int]:
    """Build a per-step scheduler for ``cfg``; also return the run length in steps.

    ``warmup`` and an explicit ``lr_decay_every`` are in steps when ``cfg.steps`` is set, else
    in epochs; the default decay points are fractions of the run either way.
    """
    per_unit = 1 if cfg.steps is not None else steps_per_epoch
    total = cfg.steps if cfg.steps is not None else max(1, round(cfg.epochs * steps_per_epoch))
    factor = lr_factor(
        total,
        cfg.lr_schedule,
        decay_points(cfg, total, per_unit),
        cfg.lr_decay_rate,
        cfg.warmup * per_unit,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor), total


def rescheduled(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    cfg: TrainConfig,
    steps_per_epoch: int,
) -> tuple[torch.optim.lr_scheduler.LambdaLR, int]:
    """The schedule of a run whose length changed, at the step ``scheduler`` has reached.

    The learning rate of the next step is the new schedule's at that step, exactly what a run
    resumed from a later checkpoint computes.

    Returns:
        The new scheduler and the new run length in steps.

    """
    new, total = build_scheduler(optimizer, cfg, steps_per_epoch)  # (sets lr to step 0's)
    new.load_state_dict(scheduler.state_dict())
    lrs = [base * fn(new.last_epoch) for base, fn in zip(new.base_lrs, new.lr_lambdas, strict=True)]
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    new._last_lr = lrs  # what get_last_lr() reports
    return new, total
