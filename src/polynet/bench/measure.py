"""Timing the candidates' steps, the matmul peaks they are compared with, and their FLOPs."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from polynet.bench.candidates import REGISTRY
from polynet.bench.config import BenchConfig
from polynet.devices import autocast
from polynet.training.step import TrainStep


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_input(name: str, x: torch.Tensor) -> torch.Tensor:
    """``x`` in the memory layout candidate ``name`` is fed."""
    return x.contiguous(memory_format=torch.channels_last) if REGISTRY[name].channels_last else x


def _amp(name: str) -> str:
    return "bf16" if REGISTRY[name].autocast else "none"


def infer(cfg: BenchConfig, name: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One inference step of candidate ``name``; its logits."""
    with torch.inference_mode(), autocast(cfg.device, _amp(name)):
        return model(model_input(name, x))


def make_train_step(cfg: BenchConfig, name: str, model: nn.Module) -> TrainStep:
    """The training step of candidate ``name``: the one step training takes, with a cheap SGD.

    Not the paper's optimiser (RMSProp): every candidate takes the same SGD step, so the
    timings compare the networks' forward and backward passes.
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, nesterov=True)
    memory_format = torch.channels_last if REGISTRY[name].channels_last else torch.contiguous_format
    return TrainStep(
        model, optimizer, torch.device(cfg.device), _amp(name), memory_format=memory_format
    )


def round_robin(
    steps: dict[str, Callable[[], None]],
    cfg: BenchConfig,
    device: torch.device,
    first: Collection[str] = (),
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds per step for every candidate, measured one candidate after another per round.

    Args:
        steps: One step of each candidate.
        cfg: The rounds (``warmup`` untimed, then ``reps`` timed).
        device: Synchronised around every step.
        first: Candidates whose first step (which compiles) runs and is timed on its own
            before the rounds.

    Returns:
        The timed seconds of each candidate, and the first step's seconds of those in ``first``.

    """

    def timed(step: Callable[[], None]) -> float:
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        return time.perf_counter() - start

    first_s = {name: timed(steps[name]) for name in steps if name in first}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for rnd in range(cfg.warmup + cfg.reps):
        for name, step in steps.items():
            seconds = timed(step)
            if rnd >= cfg.warmup:
                times[name].append(seconds)
    return times, first_s


def matmul_peak_gflops(
    threads: int,
    device: str = "cpu",
    size: int = 2048,
    reps: int = 5,
    precision: str = "fp32",
) -> float:
    """Measure matrix-multiply GFLOP/s (GOP/s for int8) here: the best of a few square matmuls.

    fp32 and bf16 time ``torch.mm``; int8 times ``torch._int_mm`` (int8 x int8 -> int32, oneDNN's
    VNNI kernels on x86), the fastest int8 matmul this PyTorch offers. ``size`` is halved
    until one matmul takes at most a second at the rate of a 256 one: a precision
    the CPU only emulates (bf16 or int8 on AVX2, under 1 GFLOP/s) would take minutes at 2048.
    """
    torch.set_num_threads(threads)
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)

    def operands(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if precision == "int8":
            pair = [torch.randint(-128, 128, (n, n), generator=gen, dtype=torch.int8) for _ in "ab"]
        else:
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            pair = [torch.randn(n, n, generator=gen).to(dtype) for _ in "ab"]
        return pair[0].to(dev), pair[1].to(dev)

    mm = torch._int_mm if precision == "int8" else torch.mm

    def seconds(a: torch.Tensor, b: torch.Tensor) -> float:
        sync(dev)
        start = time.perf_counter()
        mm(a, b)
        sync(dev)
        return time.perf_counter() - start

    small = operands(256)
    seconds(*small)  # first call: kernel selection and allocation
    rate = 2 * 256**3 / max(seconds(*small), 1e-9)
    while size > 256 and 2 * size**3 / rate > 1.0:
        size //= 2
    a, b = operands(size)
    best = min(seconds(a, b) for _ in range(reps + 1))
    return 2 * size**3 / best / 1e9


def count_flops(model: nn.Module, x: torch.Tensor, train: bool) -> int:
    """FLOPs of one forward (``train=False``) or forward + backward, per the whole batch."""
    # Eval mode: BatchNorm takes a single image, and the convolutions' FLOPs do not change.
    model.eval()
    with FlopCounterMode(display=False) as counter:
        if train:
            F.cross_entropy(
                model(x), torch.zeros(len(x), dtype=torch.long, device=x.device)
            ).backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                model(x)
    return counter.get_total_flops()


__all__ = [
    "count_flops",
    "infer",
    "make_train_step",
    "matmul_peak_gflops",
    "model_input",
    "round_robin",
    "sync",
]
