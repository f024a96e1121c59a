"""Validation during training, through the evaluation engine, and BatchNorm recalibration.

Validation is :func:`polynet.evaluation.evaluate` with the single-crop protocol, so the top-1 a
run prints is what ``polynet eval`` reports for the same weights and images. Both run in every
process of a distributed run, on its shard (validation) or on the same images (recalibration,
so that the statistics agree), and leave the RNG streams untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from polynet.devices import autocast
from polynet.distributed import ProcessGroup
from polynet.errors import UserError
from polynet.evaluation import SingleCrop, evaluate
from polynet.evaluation.batches import single_crop_batches
from polynet.inference.fuse import inference_model


@dataclass(frozen=True)
class Validation:
    """How a run validates: where, in which precision and memory format, in which batches.

    Attributes:
        device: Where the model runs.
        memory_format: Memory format of the inputs of training-mode passes.
        amp: The run's resolved autocast (``"none"``, ``"bf16"``, ``"fp16"``).
        batch_size: Images per training-mode forward pass (per process); validation, which
            keeps no activations for a backward pass, takes four times as many.
        group: The process group.
        log: Where warnings go.

    """

    device: torch.device
    memory_format: torch.memory_format
    amp: str
    batch_size: int
    group: ProcessGroup
    log: Callable[[str], None]

    @property
    def precision(self) -> str:
        """What validation computes in: bf16 for a bf16 run, else fp32 (fp16 has no fast path)."""
        return "bf16" if self.amp == "bf16" else "fp32"

    @property
    def eval_batch_size(self) -> int:
        """Images per validation forward: no activations are kept for a backward pass."""
        return 4 * self.batch_size

    def runner(self, model: nn.Module) -> tuple[Callable, Callable]:
        """What validation runs for ``model`` (in eval mode), and the context to run it in.

        The inference-optimised copy the engine evaluates (folded norms, joined and pre-packed
        convolutions), for the time-budget probe to time.
        """
        return inference_model(model, self.precision), contextlib.nullcontext

    def validate(
        self,
        model: nn.Module,
        dataset: Dataset,
        limit: int | None,
        data_cfg: dict[str, Any],
        workers: int = 0,
        flip: bool = False,
    ) -> tuple[float, float, int, float | None]:
        """Mean loss, top-1 (%), image count and, with ``flip``, top-1 without the flips.

        Args:
            model: The weights to validate (put in eval mode).
            dataset: The validation split.
            limit: Validate the first this many images (None: all).
            data_cfg: The model's preprocessing.
            workers: Data-loader worker processes.
            flip: Average each image's logits with its mirror image's.

        Raises:
            UserError: If no validation image could be read.

        """
        result = evaluate(
            model,
            dataset,
            SingleCrop(flip=flip),
            cfg=data_cfg,
            batch_size=self.eval_batch_size,
            device=self.device,
            num_workers=workers,
            limit=limit,
            progress=False,
            precision=self.precision,
            group=self.group,
        )
        for path, reason in result.unreadable:
            self.log(f"warning: skipped unreadable validation image {path} ({reason})")
        metrics = result.metrics
        if metrics.count == 0:
            raise UserError("no readable validation image; check the validation folder")
        top1 = metrics.summary()["top1_accuracy"]
        unflipped = result.unflipped.summary()["top1_accuracy"] if result.unflipped else None
        return metrics.mean_loss, top1, metrics.count, unflipped

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
            for images, labels, _ in single_crop_batches(
                dataset, indices, data_cfg, self.batch_size
            ):
                if len(labels):
                    with autocast(self.device, self.amp):
                        model(images.to(self.device, memory_format=self.memory_format))
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        if path_drop is not None:
            model.set_path_drop(path_drop)
