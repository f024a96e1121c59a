"""The settings of one benchmark run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from polynet.bench.candidates import REGISTRY, Selection, select
from polynet.errors import UserError


@dataclass
class BenchConfig:
    """What to measure.

    Attributes:
        image_size: Square input side in pixels.
        batch_size: Images per timed step.
        threads: ``torch.set_num_threads`` (and ONNX Runtime's intra-op threads) for every
            measurement.
        reps: Timed rounds (each round runs every candidate once); the median is reported.
        warmup: Untimed rounds first.
        candidates: Names from :data:`polynet.bench.candidates.REGISTRY`; None: the default
            candidates of ``precision``.
        precision: ``"auto"``, ``"all"`` or a comma list of ``fp32``, ``bf16``, ``int8``: the
            precisions measured (see :func:`polynet.bench.candidates.select`).
        train: Measure training steps (forward, backward, SGD step).
        infer: Measure inference steps.
        memory: Measure peak memory per candidate in a fresh subprocess.
        device: ``"cpu"`` or ``"cuda"``.
        compile: Add the ``torch.compile``'d candidates of the chosen precisions.
        quick: Tiny sizes for a smoke test (numbers are meaningless).
        width_mult: Width multiplier of our model; the port and timm are always full width, so
            anything but 1.0 breaks the comparison (used by quick mode).
        seed: Seeds the weights, the input batch and the int8 calibration batches.
        notes: Lines the run adds to its report.

    """

    image_size: int = 331
    batch_size: int = 4
    threads: int = 2
    reps: int = 3
    warmup: int = 1
    candidates: tuple[str, ...] | None = None
    precision: str = "auto"
    train: bool = True
    infer: bool = True
    memory: bool = True
    device: str = "cpu"
    compile: bool = False
    quick: bool = False
    width_mult: float = 1.0
    seed: int = 0
    notes: list[str] = field(default_factory=list)

    @classmethod
    def quick_config(cls, **overrides: Any) -> BenchConfig:
        """Tiny sizes: 75 px, batch 2, one round, a 1/16-width PolyNet."""
        args = dict(image_size=75, batch_size=2, reps=1, warmup=0, quick=True, width_mult=0.0625)
        return cls(**{**args, **overrides})

    def selection(self) -> Selection:
        """The candidates and precisions this run measures."""
        return select(self.candidates, self.precision, self.device, self.compile)

    def check(self) -> Selection:
        """Raise a UserError naming a bad setting and the fix; else the selection."""
        if self.device not in ("cpu", "cuda"):
            raise UserError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise UserError("device='cuda' but no CUDA GPU is visible; use --device cpu")
        if self.image_size < 75:
            raise UserError(
                f"image_size must be at least 75 (the ImageNet stem), got {self.image_size}"
            )
        if self.batch_size < 1 or self.reps < 1 or self.threads < 1 or self.warmup < 0:
            raise UserError("batch_size, reps and threads must be at least 1, warmup at least 0")
        if not (self.train or self.infer):
            raise UserError("nothing to measure: drop --no-train or --no-infer")
        selection = self.selection()
        if not self.rows(selection):
            raise UserError(
                f"nothing to measure: {', '.join(selection.names)} have no "
                f"{'training' if self.train else 'inference'} rows; drop --no-train or --no-infer"
            )
        return selection

    def rows(self, selection: Selection) -> list[tuple[str, str]]:
        """``(candidate, mode)`` pairs measured, inference first."""
        modes = [m for m, on in (("infer", self.infer), ("train", self.train)) if on]
        return [(n, m) for m in modes for n in selection.names if m in REGISTRY[n].modes]


__all__ = ["BenchConfig"]
