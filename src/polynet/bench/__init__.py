"""Throughput, memory and MAC benchmarks of PolyNet against the released port and timm.

Every timed configuration ("candidate", :mod:`polynet.bench.candidates`) lives in one process and
is measured round-robin with the same threads and the same input batch, so that a busy machine
slows all of them alike and their *ratios* stay meaningful. Each candidate computes in one
precision (fp32, bf16 or int8) and its achieved GFLOP/s are divided by the matmul peak of that
precision, measured in the same run. Peak memory is measured per candidate in a fresh subprocess
(:mod:`polynet.bench.memory`). The report ends with the like-for-like targets as ratios of the
run (:mod:`polynet.bench.report`).

Run ``polynet bench`` (or ``python benchmarks/run_bench.py``); ``--quick`` uses tiny sizes and
is only a smoke test.
"""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from polynet.bench.build import build_candidates, naive_units
from polynet.bench.candidates import PRECISIONS, REGISTRY, Candidate, Selection, select
from polynet.bench.config import BenchConfig
from polynet.bench.measure import (
    count_flops,
    infer,
    make_train_step,
    matmul_peak_gflops,
    model_input,
    round_robin,
)
from polynet.bench.memory import measure_memory, measure_memory_here
from polynet.bench.report import evaluate_targets, targets, to_markdown
from polynet.devices import default_precision, native_bf16

CANDIDATES = tuple(REGISTRY)
"""Every candidate name, in the order rows are listed."""


def _machine(cfg: BenchConfig) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = dict(
        cpu=cpu,
        logical_cpus=os.cpu_count(),
        threads=cfg.threads,
        torch=torch.__version__,
        python=platform.python_version(),
    )
    if cfg.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _peaks(cfg: BenchConfig, precisions: list[str], best: dict[str, float]) -> dict[str, float]:
    """The matmul peak of each precision, the best of this measurement and ``best``'s."""
    peaks = dict(best)
    for precision in precisions:
        try:
            gflops = matmul_peak_gflops(cfg.threads, cfg.device, precision=precision)
        except RuntimeError as err:  # no int8 matmul in this build: its rows get no fraction
            if precision not in best:
                cfg.notes.append(f"no {precision} matmul peak here ({str(err).splitlines()[0]})")
            continue
        peaks[precision] = max(gflops, best.get(precision, 0.0))
    return peaks


def _time(
    cfg: BenchConfig,
    mode: str,
    models: dict[str, torch.nn.Module],
    x: torch.Tensor,
    target: torch.Tensor,
) -> dict[str, dict[str, Any]]:
    """Rows of one mode: every candidate's step times, interleaved."""
    device = torch.device(cfg.device)
    if mode == "train":
        train_steps = {n: make_train_step(cfg, n, m) for n, m in models.items()}
        steps = {n: (lambda s=s: s(x, target)) for n, s in train_steps.items()}
    else:
        steps = {n: (lambda n=n, m=m: infer(cfg, n, m, x)) for n, m in models.items()}
    for model in models.values():
        model.train(mode == "train")
    compiled = {n for n in models if REGISTRY[n].compiled}
    times, first = round_robin(steps, cfg, device, first=compiled)
    rows = {}
    for name, seconds in times.items():
        c = REGISTRY[name]
        rows[f"{name}/{mode}"] = dict(
            candidate=name, mode=mode, precision=c.precision, runtime=c.runtime, seconds=seconds
        )
        if name in first:
            rows[f"{name}/{mode}"]["compile_s"] = first[name]
    return rows


def _memory(cfg: BenchConfig, results: dict[str, dict[str, Any]], log: Callable) -> None:
    skipped = []
    for key, row in results.items():
        c = REGISTRY[row["candidate"]]
        if c.compiled or c.runtime != "torch":
            skipped.append(key)
            continue
        log(f"peak memory: {key}")
        row.update(measure_memory(cfg, row["candidate"], row["mode"]))
    if skipped:
        cfg.notes.append(
            f"peak memory not measured for {', '.join(skipped)}: a fresh process would build "
            "them again (export, quantize or compile: minutes each; benchmarks/memory.py "
            "measures one)"
        )


def run_benchmark(cfg: BenchConfig, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Measure every candidate; returns a JSON-ready report (see :func:`to_markdown`)."""
    selection = cfg.check()
    torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    log(f"precision {', '.join(selection.precisions)} ({selection.why})")
    if "bf16" in selection.precisions and not native_bf16(device):
        cfg.notes.append("no native bf16 on this device: the bf16 rows are emulated")
    log(f"building {', '.join(selection.names)}")
    models = build_candidates(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, generator=gen).to(device)
    target = torch.randint(0, 1000, (cfg.batch_size,), generator=gen).to(device)
    rows = cfg.rows(selection)
    precisions = [p for p in PRECISIONS if any(REGISTRY[n].precision == p for n, _ in rows)]
    peaks = _peaks(cfg, precisions, {})

    results: dict[str, dict[str, Any]] = {}
    for mode in ("infer", "train"):
        names = [n for n, m in rows if m == mode]
        if names:
            log(f"{mode}: {len(names)} candidates x {cfg.warmup + cfg.reps} rounds")
            results.update(_time(cfg, mode, {n: models[n] for n in names}, x, target))
    peaks = _peaks(cfg, precisions, peaks)  # best of before and after

    log("counting FLOPs")
    one = x[:1]
    counts: dict[tuple[str, str], int] = {}  # autocast does not change what is computed
    for row in results.values():
        name, mode = row["candidate"], row["mode"]
        key = (REGISTRY[name].base, mode)
        if key not in counts:
            # ONNX Runtime runs outside torch's FLOP counter: count the fp32 graph it came from.
            counted = getattr(models[name], "source_model", models[name])
            counts[key] = count_flops(counted, model_input(name, one), mode == "train")
        flops = counts[key]
        seconds = statistics.median(row["seconds"])
        row["images_per_s"] = cfg.batch_size / seconds
        row["gmacs_per_image"] = flops / 2 / 1e9
        row["gflops_per_s"] = flops * cfg.batch_size / seconds / 1e9
        peak = peaks.get(row["precision"])
        row["fraction_of_matmul_peak"] = row["gflops_per_s"] / peak if peak else None
    del models

    if cfg.memory:
        _memory(cfg, results, log)
    base = {mode: results.get(f"port/{mode}") for mode in ("infer", "train")}
    for row in results.values():
        ref = base[row["mode"]]
        if ref is not None:
            row["speed_vs_port"] = row["images_per_s"] / ref["images_per_s"]
            if "peak_mib" in row and "peak_mib" in ref:
                row["memory_vs_port"] = row["peak_mib"] / ref["peak_mib"]
        if "peak_mib" in row and cfg.device == "cpu":
            # What the steps add to the resident model: gradients, optimizer state, activations.
            row["step_mib"] = row["peak_mib"] - row["before_mib"]
    default = default_precision(device)
    return dict(
        machine=_machine(cfg),
        config={k: v for k, v in asdict(cfg).items() if k != "notes"},
        precision=dict(
            requested=cfg.precision,
            measured=list(selection.precisions),
            why=selection.why,
            default=default,
        ),
        matmul_peak_gflops=peaks,
        notes=cfg.notes,
        results=list(results.values()),
        targets=evaluate_targets(list(results.values()), default),
    )


__all__ = [
    "CANDIDATES",
    "PRECISIONS",
    "REGISTRY",
    "BenchConfig",
    "Candidate",
    "Selection",
    "build_candidates",
    "count_flops",
    "infer",
    "matmul_peak_gflops",
    "measure_memory",
    "measure_memory_here",
    "naive_units",
    "run_benchmark",
    "select",
    "targets",
    "to_markdown",
]
