"""Peak memory of one candidate's steps, measured in a fresh Python process.

A process's RSS high-water mark cannot be reset, so each candidate and mode gets its own
process: on CPU the highest RSS sampled while the steps run, on CUDA
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import subprocess
import sys
import threading
from dataclasses import asdict

import torch

from polynet.bench.build import build_candidates
from polynet.bench.config import BenchConfig
from polynet.bench.measure import infer, make_train_step


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _RssSampler(threading.Thread):
    """Samples this process's RSS every few milliseconds and keeps the maximum."""

    def __init__(self, interval_s: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.peak_mib = _rss_mib()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            self.peak_mib = max(self.peak_mib, _rss_mib())

    def stop(self) -> float:
        self._stop_event.set()
        self.join()
        return max(self.peak_mib, _rss_mib())


def measure_memory_here(cfg: BenchConfig, name: str, mode: str) -> dict[str, float]:
    """Peak memory of ``mode`` ("train" or "infer") steps of one candidate, in this process.

    On CPU, ``peak_mib`` is the highest RSS sampled while the steps run (weights, optimizer
    state, activations and the allocator's cache), and ``before_mib`` the RSS with the model
    built, before the first step; building the model is excluded. On CUDA ``peak_mib`` is
    ``torch.cuda.max_memory_allocated``. Run it in a fresh process (:func:`measure_memory`) so
    that no other candidate's memory is resident.
    """
    torch.set_num_threads(cfg.threads)
    cfg = copy.deepcopy(cfg)
    cfg.candidates = (name,)
    cfg.precision = "auto"  # the named candidate's own
    cfg.compile = False
    model = build_candidates(cfg, same_weights=False)[name]
    gc.collect()
    device = torch.device(cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, generator=gen).to(device)
    target = torch.randint(0, 1000, (cfg.batch_size,), generator=gen).to(device)
    step = make_train_step(cfg, name, model) if mode == "train" else None
    model.train(mode == "train")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = _rss_mib()
    sampler = _RssSampler()
    sampler.start()
    for _ in range(2):  # the second step has the optimizer state allocated
        if step is not None:
            step(x, target)
        else:
            infer(cfg, name, model, x)
    peak = sampler.stop()
    if device.type == "cuda":
        return dict(peak_mib=torch.cuda.max_memory_allocated(device) / 2**20, before_mib=0.0)
    return dict(peak_mib=peak, before_mib=before)


def measure_memory(cfg: BenchConfig, name: str, mode: str) -> dict[str, float]:
    """Peak memory of one candidate and mode, measured in a fresh Python process."""
    payload = json.dumps(dict(cfg=asdict(cfg), name=name, mode=mode))
    code = "import sys, polynet.bench.memory as m; m._memory_worker(sys.argv[1])"
    # glibc keeps freed blocks below its (self-raising) mmap threshold inside the heap, so RSS
    # would follow the allocator's history rather than live tensors: a checkpointed training
    # step then shows almost the same peak as a plain one. A fixed 64 KiB threshold maps every
    # tensor-sized block on its own and returns it to the OS when freed.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    result = subprocess.run(
        [sys.executable, "-c", code, payload], capture_output=True, text=True, check=False, env=env
    )
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"memory measurement of {name} ({mode}) failed: {tail[0]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _memory_worker(payload: str) -> None:
    args = json.loads(payload)
    cfg = BenchConfig(**{**args["cfg"], "candidates": (args["name"],)})
    print(json.dumps(measure_memory_here(cfg, args["name"], args["mode"])))


__all__ = ["measure_memory", "measure_memory_here"]
