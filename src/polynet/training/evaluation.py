"""Evaluation during training: validation top-1 and BatchNorm recalibration.

Both run in every process of a distributed run on its shard (validation) or on the same images
(recalibration, so that the statistics agree), and leave the RNG streams untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from polynet.errors import UserError
from polynet.fuse import inference_model
from polynet.training.batches import eval_batches
from polynet.training.distributed import DistInfo, all_sum


@dataclass(frozen=True)
class Evaluator:
    """How a run evaluates: where, in which precision and memory format, in which batches.

    Attributes:
        device: Where the model runs.
        memory_format: Memory format of the inputs.
        autocast: The run's autocast context factory (training-mode passes, and validation
            in a precision the fast path does not take).
        batch_size: Images per training-mode forward pass (per process); validation, which
            keeps no activations for a backward pass, takes four times as many.
        dist: The process group.
        log: Where warnings go.
        precision: ``"fp32"`` or ``"bf16"``: validation runs the inference-optimised copy of
            the model in it (:func:`polynet.fuse.inference_model`); anything else (fp16)
            runs the model itself under ``autocast``.

    """

    device: torch.device
    memory_format: torch.memory_format
    autocast: Callable[[], torch.autocast]
    batch_size: int
    dist: DistInfo
    log: Callable[[str], None]
    precision: str = "fp32"

    @property
    def eval_batch_size(self) -> int:
        """Images per validation forward: no activations are kept for a backward pass."""
        return 4 * self.batch_size

    def runner(self, model: nn.Module) -> tuple[Callable, Callable]:
        """What validation runs for ``model`` (in eval mode), and the context to run it in.

        Folded norms and joined convolutions (pre-packed, in bf16 where the run trains in it)
        evaluate a small model several times faster than the model as trained.
        """
        if self.precision in ("fp32", "bf16"):
            return inference_model(model, self.precision), contextlib.nullcontext
        return model, self.autocast

    @torch.no_grad()
    def validate(
        self,
        model: nn.Module,
        dataset: Dataset,
        indices: Sequence[int],
        data_cfg: dict[str, Any],
        workers: int = 0,
        flip: bool = False,
    ) -> tuple[float, float, int, float | None]:
        """Mean loss, top-1 (%), image count and, with ``flip``, top-1 without the flips.

        With ``flip`` each image's logits are averaged with its mirror image's (test-time
        flip augmentation).

        Raises:
            UserError: If no validation image could be read.

        """
        runner, context = self.runner(model.eval())
        loss_sum = correct = count = plain_correct = 0.0
        for images, labels, skipped in eval_batches(
            dataset, indices, data_cfg, self.eval_batch_size, workers
        ):
            for path in skipped:
                self.log(f"warning: skipped unreadable validation image {path}")
            if images is None:
                continue
            images = images.to(self.device, memory_format=self.memory_format)
            labels = labels.to(self.device)
            with context():
                logits = runner(images).float()
                if flip:  # the mirror image votes too
                    plain_correct += (logits.argmax(1) == labels).sum().item()
                    logits = (logits + runner(images.flip(-1)).float()) / 2
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(1) == labels).sum().item()
            count += len(labels)
        loss_sum, correct, count, plain_correct = all_sum(
            self.dist, loss_sum, correct, count, plain_correct
        )
        if count == 0:
            raise UserError("no readable validation image; check the validation folder")
        unflipped = 100.0 * plain_correct / count if flip else None
        return loss_sum / count, 100.0 * correct / count, int(count), unflipped

    @torch.no_grad()
    def recalibrate_batchnorm(
        self,
        model: nn.Module,
        dataset: Dataset,
        indices: Sequence[int],
        data_cfg: dict[str, Any],
    ) -> None:
        """Replace BatchNorm running statistics by their plain average over ``indices``.

        Stochastic paths are off meanwhile and the RNG state is restored afterwards.
        """
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms:
            return
        momenta = [m.momentum for m in norms]
        path_drop = getattr(model, "path_drop_rate", None)
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
        if path_drop is not None:
            model.set_path_drop(0.0)
        model.train()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            for images, _, _ in eval_batches(dataset, indices, data_cfg, self.batch_size, 0):
                if images is not None:
                    with self.autocast():
                        model(images.to(self.device, memory_format=self.memory_format))
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        if path_drop is not None:
            model.set_path_drop(path_drop)
