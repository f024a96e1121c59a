"""Time per training iteration of a study's configs: one interleaved pass, cached in timing.json.

All configs live in one process and take turns, so a drift of the machine's speed affects all
alike; the pass is one measurement of one machine, which is what makes its times comparable.
``OUT/timing.json`` records the setup (batch, optimizer, device, threads, precision, world
size, rounds) and, per config, a fingerprint of its model and that setup, the median seconds
per iteration and the samples of every round.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from polynet.ablation.results import fingerprint, write_json
from polynet.ablation.studies import StudyConfig, create_study_model
from polynet.devices import resolve_device
from polynet.distributed import SINGLE, is_main_process, world_size
from polynet.training import TrainConfig, run_identity
from polynet.training.step import build_step

TIMING_FILE = "timing.json"


def autocast_of(cfg: TrainConfig) -> str:
    """The autocast a recipe trains under here: ``"none"``, ``"bf16"`` or ``"fp16"``.

    The training API resolves ``amp`` (its default included) for this machine in
    ``run_identity``; the timing pass and the evaluation follow its choice, so a study never
    hard-codes a precision of its own.
    """
    return run_identity(cfg)["amp"]


def input_size(model: torch.nn.Module) -> tuple[int, int, int]:
    """Channels, height and width of one input image of ``model``."""
    size = model.pretrained_cfg["input_size"]
    return (int(getattr(model, "in_chans", size[0])), int(size[1]), int(size[2]))


def measure_iteration_times(
    configs: Sequence[StudyConfig],
    cfg: TrainConfig,
    num_classes: int,
    rounds: int = 3,
    iters: int = 2,
) -> dict[str, list[float]]:
    """Seconds per training iteration of every config, measured round-robin in one process.

    Every config takes the run's own step (:class:`~polynet.training.step.TrainStep`: the
    recipe's optimizer, precision, label smoothing and moving average) on the same fixed batch;
    configs take turns (``iters`` iterations each) for ``rounds`` rounds after one warm-up
    round, so a drift of the machine's speed affects all configs alike.

    Args:
        configs: The configs to time.
        cfg: The recipe (batch size, optimizer, device, threads, precision).
        num_classes: Classifier outputs.
        rounds: Measured rounds.
        iters: Iterations per config and round.

    Returns:
        Per config name, one mean seconds-per-iteration per measured round.

    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    # Each process times its own share of a global batch, without a process group: the pass
    # compares the networks, and one process's step is the same on every process.
    batch = max(1, cfg.batch_size // world_size())
    recipe = dataclasses.replace(cfg, amp=autocast_of(cfg), compile=False)
    steps, inputs = {}, {}
    generator = torch.Generator().manual_seed(0)
    for config in configs:
        model = create_study_model(config.model, **config.model_kwargs, num_classes=num_classes)
        model.to(device).train()
        # The run's own step: its optimizer, label smoothing, moving average and precision.
        steps[config.name] = build_step(model, recipe, device, SINGLE, torch.contiguous_format)
        size = input_size(model)
        if size not in inputs:
            images = torch.randn(batch, *size, generator=generator)
            labels = torch.randint(num_classes, (batch,), generator=generator)
            inputs[size] = (images.to(device), labels.to(device))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: dict[str, list[float]] = {c.name: [] for c in configs}
    for round_index in range(rounds + 1):
        for config in configs:
            step = steps[config.name]
            images, labels = inputs[input_size(step.raw_model)]
            sync()
            start = time.perf_counter()
            for _ in range(iters):
                step(images, labels)
            sync()
            if round_index:  # round 0 warms up caches, allocators and autotuning
                times[config.name].append((time.perf_counter() - start) / iters)
    return times


def _setup(cfg: TrainConfig, rounds: int, iters: int) -> dict[str, Any]:
    return dict(
        batch_size=cfg.batch_size,
        optimizer=cfg.optimizer,
        device=str(resolve_device(cfg.device)),
        threads=cfg.threads,
        amp=autocast_of(cfg),
        world_size=world_size(),
        step="run",  # the run's own step (with its moving average), not a bare one
        rounds=rounds,
        iters=iters,
    )


def _entry_fingerprint(model: str, model_kwargs: dict[str, Any], setup: dict[str, Any]) -> str:
    return fingerprint([model, model_kwargs, setup])


def load_or_measure(
    out: Path,
    configs: Sequence[StudyConfig],
    cfg: TrainConfig,
    num_classes: int,
    rounds: int,
    iters: int,
    *,
    rerun: bool = False,
    say: Any = print,
) -> None:
    """Make ``out/timing.json`` hold one pass over ``configs``: reuse it, or time them all.

    A pass is reused when every config has an entry for its model and this setup; otherwise
    every config is timed again (times from two passes are not comparable).

    Args:
        out: The study folder.
        configs: The configs to time.
        cfg: The recipe (see :func:`measure_iteration_times`).
        num_classes: Classifier outputs.
        rounds: Measured rounds.
        iters: Iterations per config and round.
        rerun: Time again even when the pass could be reused.
        say: Where to report that a pass starts.

    """
    path = out / TIMING_FILE
    setup = _setup(cfg, rounds, iters)
    wanted = {c.name: _entry_fingerprint(c.model, c.model_kwargs, setup) for c in configs}
    saved = json.loads(path.read_text()) if path.is_file() else {}
    cached = saved.get("configs", {})
    if not rerun and all(cached.get(n, {}).get("fingerprint") == f for n, f in wanted.items()):
        return
    say(
        f"timing {len(configs)} config{'s' if len(configs) != 1 else ''}: {rounds} interleaved "
        f"round{'s' if rounds != 1 else ''} of {iters} iteration{'s' if iters != 1 else ''} at "
        f"batch {cfg.batch_size} on {setup['device']}"
    )
    start = time.perf_counter()
    times = measure_iteration_times(configs, cfg, num_classes, rounds, iters)
    seconds = time.perf_counter() - start
    # Configs of an earlier pass stay; they count only where measured under this setup.
    entries = {k: v for k, v in cached.items() if k not in times}
    entries.update(
        {
            name: dict(
                fingerprint=wanted[name],
                seconds_per_iter=statistics.median(samples),
                samples=samples,
            )
            for name, samples in times.items()
        }
    )
    if is_main_process():
        write_json(path, dict(setup=setup, seconds=seconds, configs=entries))


def attach_times(rows: Sequence[dict[str, Any]], out: Path) -> float | None:
    """Set each row's ``seconds_per_iter`` from ``out/timing.json`` (None where not timed).

    An entry counts only when it was measured for the row's model under the pass's setup.

    Returns:
        Seconds the timing pass took (None when unknown).

    """
    path = out / TIMING_FILE
    saved = json.loads(path.read_text()) if path.is_file() else {}
    setup, entries = saved.get("setup", {}), saved.get("configs", {})
    for row in rows:
        entry = entries.get(row["config"], {})
        current = entry.get("fingerprint") == _entry_fingerprint(
            row["model"], row["model_kwargs"], setup
        )
        row["seconds_per_iter"] = entry.get("seconds_per_iter") if current else None
    return saved.get("seconds")
