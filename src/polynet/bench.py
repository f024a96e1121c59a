"""Throughput, memory and MAC benchmarks of PolyNet against the released port and timm.

Every timed configuration ("candidate") lives in one process and is measured round-robin with
the same threads and the same input batch, so that a busy machine slows all of them alike and
their *ratios* stay meaningful. Peak memory is measured per candidate in a fresh subprocess
(peak RSS on CPU; ``max_memory_allocated`` on CUDA), because a process's RSS high-water mark
cannot be reset.

Run ``polynet bench`` (or ``python benchmarks/run_bench.py``); ``--quick`` uses tiny sizes and
is only a smoke test.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from polynet.fuse import optimize_for_inference
from polynet.modules import PolyInception
from polynet.network import compile_units
from polynet.zoo import create_model

CANDIDATES = (
    "polynet",
    "polynet-fused",
    "polynet-fused-plain",
    "polynet-fused-bf16",
    "polynet-naive",
    "polynet-ckpt",
    "port",
    "port-cl",
    "timm-irv2",
)
"""Benchmarked configurations; see :data:`DESCRIPTIONS`."""
OPT_IN_CANDIDATES = ("polynet-int8",)
"""Measured only when named in ``candidates``: quantizing the full model takes minutes."""

DESCRIPTIONS = {
    "polynet": "polynet_very_deep, eager, channels_last, cascaded",
    "polynet-fused": "polynet.fuse.optimize_for_inference(polynet_very_deep)",
    "polynet-fused-plain": "the same without oneDNN weight pre-packing (prepack=False)",
    "polynet-fused-bf16": "optimize_for_inference(polynet_very_deep, precision='bf16')",
    "polynet-int8": "optimize_for_inference(polynet_very_deep, precision='int8'): ONNX Runtime "
    "static int8, calibrated on 2 random batches (CPU only; opt-in)",
    "polynet-naive": "polynet_very_deep with every path evaluated separately (forward_naive)",
    "polynet-ckpt": "polynet_very_deep with set_grad_checkpointing(True)",
    "port": "pretrainedmodels.polynet, eager, as released (NCHW)",
    "port-cl": "pretrainedmodels.polynet converted to channels_last",
    "timm-irv2": "timm inception_resnet_v2 (the TF-slim Inception-ResNet-v2), as released",
    "polynet-compiled": "polynet with every unit and Mixed part torch.compile'd "
    "(polynet.network.compile_units; only with --compile)",
}
INFERENCE_ONLY = {
    "polynet-fused",
    "polynet-fused-plain",
    "polynet-fused-bf16",
    "polynet-int8",
    "polynet-naive",
}
TRAINING_ONLY = {"polynet-ckpt"}


@dataclass
class BenchConfig:
    """What to measure.

    Attributes:
        image_size: Square input side in pixels.
        batch_size: Images per timed step.
        threads: ``torch.set_num_threads`` for every measurement.
        reps: Timed rounds (each round runs every candidate once); the median is reported.
        warmup: Untimed rounds first.
        candidates: Names from :data:`CANDIDATES`.
        train: Measure training steps (forward, backward, SGD step).
        infer: Measure inference steps.
        memory: Measure peak memory per candidate in a fresh subprocess.
        device: ``"cpu"`` or ``"cuda"``.
        amp: On CUDA, run our model's training and inference under bf16 autocast (the port and
            timm stay fp32, as released).
        compile: Add a ``torch.compile`` path of our model (``polynet-compiled``).
        quick: Tiny sizes for a smoke test (numbers are meaningless).
        width_mult: Width multiplier of our model; the port and timm are always full width, so
            anything but 1.0 breaks the comparison (used by quick mode).

    """

    image_size: int = 331
    batch_size: int = 4
    threads: int = 2
    reps: int = 3
    warmup: int = 1
    candidates: tuple[str, ...] = CANDIDATES
    train: bool = True
    infer: bool = True
    memory: bool = True
    device: str = "cpu"
    amp: bool = False
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

    def check(self) -> None:
        """Raise a ValueError naming a bad setting and the fix."""
        valid = CANDIDATES + OPT_IN_CANDIDATES
        unknown = [c for c in self.candidates if c not in valid]
        if unknown:
            raise ValueError(f"unknown candidates {unknown}; valid: {', '.join(valid)}")
        if "polynet-int8" in self.candidates and self.device != "cpu":
            raise ValueError("polynet-int8 runs on the CPU (ONNX Runtime); drop it or use cpu")
        if self.image_size < 75:
            raise ValueError(
                f"image_size must be at least 75 (the ImageNet stem), got {self.image_size}"
            )
        if self.batch_size < 1 or self.reps < 1 or self.threads < 1 or self.warmup < 0:
            raise ValueError("batch_size, reps and threads must be at least 1, warmup at least 0")
        if not (self.train or self.infer):
            raise ValueError("nothing to measure: drop --no-train or --no-infer")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but no CUDA GPU is visible; use --device cpu")


# --- building the candidates ------------------------------------------------------------------


def _ours(cfg: BenchConfig) -> nn.Module:
    torch.manual_seed(cfg.seed)
    return create_model("polynet_very_deep", width_mult=cfg.width_mult)


def _port(cfg: BenchConfig, reference: nn.Module | None = None) -> nn.Module:
    """Build the released port, with our model's weights when a reference is given."""
    import pretrainedmodels

    port = pretrainedmodels.polynet(num_classes=1000, pretrained=None)
    # The port's fixed 9x9 pool only takes 331-362 px; the adaptive pool is the same there.
    port.avg_pool = nn.AdaptiveAvgPool2d(1)
    if reference is not None and cfg.width_mult == 1.0:
        from polynet.weights import to_port_layout

        port.load_state_dict(to_port_layout(reference.state_dict(), reference))
    return port


def _timm_irv2(cfg: BenchConfig) -> nn.Module:
    import timm

    torch.manual_seed(cfg.seed)
    return timm.create_model("inception_resnet_v2", num_classes=1000)


@contextmanager
def naive_units(model: nn.Module) -> Iterator[None]:
    """Evaluate every PolyInception unit path by path (``forward_naive``) inside the block."""
    units = [m for m in model.modules() if isinstance(m, PolyInception)]
    for unit in units:
        unit.forward = unit.forward_naive
    try:
        yield
    finally:
        for unit in units:
            del unit.forward


class _Naive(nn.Module):
    """Wraps a model so that its units run ``forward_naive``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with naive_units(self.model):
            return self.model(x)


def build_candidates(cfg: BenchConfig, same_weights: bool = True) -> dict[str, nn.Module]:
    """Every requested candidate, on the device.

    Args:
        cfg: The benchmark settings.
        same_weights: Give the port our model's weights (through the released-layout key map).

    """
    device = torch.device(cfg.device)
    cl = torch.channels_last
    wanted = set(cfg.candidates)
    ours = _ours(cfg).to(device)
    built: dict[str, nn.Module] = {}
    if "polynet-fused" in wanted:
        built["polynet-fused"] = optimize_for_inference(ours)
    if "polynet-fused-plain" in wanted:
        built["polynet-fused-plain"] = optimize_for_inference(ours, prepack=False)
    if "polynet-fused-bf16" in wanted:
        built["polynet-fused-bf16"] = optimize_for_inference(ours, precision="bf16")
    if "polynet-int8" in wanted:
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        size = (cfg.batch_size, 3, cfg.image_size, cfg.image_size)
        calibration = [torch.randn(size, generator=gen) for _ in range(2)]
        built["polynet-int8"] = optimize_for_inference(
            ours, precision="int8", calibration=calibration
        )
    if wanted & {"polynet", "polynet-naive", "polynet-ckpt"}:
        fast = ours.to(memory_format=cl)
        built["polynet"] = fast
        built["polynet-naive"] = _Naive(fast)
    if "polynet-ckpt" in wanted:
        # A copy only when the plain model is measured too: optimizer states must not mix.
        ckpt = copy.deepcopy(fast) if wanted & {"polynet", "polynet-naive"} else fast
        ckpt.set_grad_checkpointing(True)
        built["polynet-ckpt"] = ckpt
    if wanted & {"port", "port-cl"}:
        try:
            port = _port(cfg, ours if same_weights else None).to(device)
        except ImportError as err:
            raise ValueError(
                f"the port comparison needs pretrainedmodels ({err}); "
                "pip install pretrainedmodels or drop the port candidates"
            ) from err
        if cfg.width_mult != 1.0:
            cfg.notes.append("port and polynet have different widths and weights (quick mode)")
        built["port"] = port
        if "port-cl" in wanted:
            built["port-cl"] = copy.deepcopy(port).to(memory_format=cl)
    if "timm-irv2" in wanted:
        built["timm-irv2"] = _timm_irv2(cfg).to(device)
    if cfg.compile:
        built["polynet-compiled"] = compile_units(copy.deepcopy(ours).to(memory_format=cl))
    del ours
    return {name: built[name] for name in [*cfg.candidates, "polynet-compiled"] if name in built}


# --- measuring ----------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(cfg: BenchConfig, name: str):
    enabled = cfg.amp and cfg.device == "cuda" and name.startswith("polynet")
    return torch.autocast(cfg.device, dtype=torch.bfloat16, enabled=enabled)


def _input(name: str, x: torch.Tensor) -> torch.Tensor:
    return (
        x.contiguous(memory_format=torch.channels_last)
        if name != "port" and name != "timm-irv2"
        else x
    )


def _infer_step(cfg: BenchConfig, name: str, model: nn.Module, x: torch.Tensor) -> None:
    with torch.inference_mode(), _autocast(cfg, name):
        model(_input(name, x))


def _train_step(
    cfg: BenchConfig,
    name: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    target: torch.Tensor,
) -> None:
    optimizer.zero_grad(set_to_none=True)
    with _autocast(cfg, name):
        loss = F.cross_entropy(model(_input(name, x)), target)
    loss.backward()
    optimizer.step()


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    # Not the paper's optimiser (RMSProp): every candidate takes the same cheap SGD step, so
    # the timings compare the networks' forward and backward passes.
    return torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, nesterov=True)


def _round_robin(
    steps: dict[str, Callable[[], None]], cfg: BenchConfig, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per step for every candidate, measured one candidate after another per round."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for rnd in range(cfg.warmup + cfg.reps):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            if rnd >= cfg.warmup:
                times[name].append(time.perf_counter() - start)
    return times


def matmul_peak_gflops(threads: int, device: str = "cpu", size: int = 2048, reps: int = 5) -> float:
    """Measure fp32 matrix-multiply GFLOP/s here: the best of a few square matmuls."""
    torch.set_num_threads(threads)
    dev = torch.device(device)
    a = torch.randn(size, size, device=dev)
    b = torch.randn(size, size, device=dev)
    best = float("inf")
    for _ in range(reps + 1):
        _sync(dev)
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(dev)
        best = min(best, time.perf_counter() - start)
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


# --- peak memory in a fresh process --------------------------------------------------------------


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
    cfg.compile = False
    model = build_candidates(cfg, same_weights=False)[name]
    gc.collect()
    device = torch.device(cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, generator=gen).to(device)
    target = torch.randint(0, 1000, (cfg.batch_size,), generator=gen).to(device)
    optimizer = _optimizer(model) if mode == "train" else None
    model.train(mode == "train")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = _rss_mib()
    sampler = _RssSampler()
    sampler.start()
    for _ in range(2):  # the second step has the optimizer state allocated
        if optimizer is not None:
            _train_step(cfg, name, model, optimizer, x, target)
        else:
            _infer_step(cfg, name, model, x)
    peak = sampler.stop()
    if device.type == "cuda":
        return dict(peak_mib=torch.cuda.max_memory_allocated(device) / 2**20, before_mib=0.0)
    return dict(peak_mib=peak, before_mib=before)


def measure_memory(cfg: BenchConfig, name: str, mode: str) -> dict[str, float]:
    """Peak memory of one candidate and mode, measured in a fresh Python process."""
    payload = json.dumps(dict(cfg=asdict(cfg), name=name, mode=mode))
    code = "import sys, polynet.bench as b; b._memory_worker(sys.argv[1])"
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
    cfg = BenchConfig(**{**args["cfg"], "candidates": tuple(args["cfg"]["candidates"])})
    print(json.dumps(measure_memory_here(cfg, args["name"], args["mode"])))


# --- the whole benchmark --------------------------------------------------------------------------


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


def run_benchmark(cfg: BenchConfig, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Measure every candidate; returns a JSON-ready report (see :func:`to_markdown`)."""
    cfg.check()
    torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    log(f"building {', '.join(cfg.candidates)}")
    models = build_candidates(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, generator=gen).to(device)
    target = torch.randint(0, 1000, (cfg.batch_size,), generator=gen).to(device)
    peak = matmul_peak_gflops(cfg.threads, cfg.device)

    results: dict[str, dict[str, Any]] = {}
    infer = {n: m for n, m in models.items() if n not in TRAINING_ONLY and cfg.infer}
    for model in infer.values():
        model.eval()
    if infer:
        log(f"inference: {len(infer)} candidates x {cfg.warmup + cfg.reps} rounds")
    times = _round_robin(
        {n: (lambda n=n, m=m: _infer_step(cfg, n, m, x)) for n, m in infer.items()}, cfg, device
    )
    for name, ts in times.items():
        results[f"{name}/infer"] = dict(candidate=name, mode="infer", seconds=ts)

    if cfg.train:
        trainable = {n: m for n, m in models.items() if n not in INFERENCE_ONLY}
        optimizers = {n: _optimizer(m) for n, m in trainable.items()}
        for model in trainable.values():
            model.train()
        log(f"training: {len(trainable)} candidates x {cfg.warmup + cfg.reps} rounds")
        times = _round_robin(
            {
                n: (lambda n=n, m=m: _train_step(cfg, n, m, optimizers[n], x, target))
                for n, m in trainable.items()
            },
            cfg,
            device,
        )
        for name, ts in times.items():
            results[f"{name}/train"] = dict(candidate=name, mode="train", seconds=ts)
        del optimizers
    peak = max(peak, matmul_peak_gflops(cfg.threads, cfg.device))  # best of before and after

    log("counting FLOPs")
    one = x[:1]
    flops: dict[tuple[str, str], int] = {}
    for row in results.values():
        name, mode = row["candidate"], row["mode"]
        model = models[name]
        if (name, mode) not in flops:
            # ONNX Runtime runs outside torch's FLOP counter: count the fp32 graph it came from.
            counted = getattr(model, "source_model", model)
            flops[name, mode] = count_flops(counted, _input(name, one), mode == "train")
        seconds = statistics.median(row["seconds"])
        row["images_per_s"] = cfg.batch_size / seconds
        row["gmacs_per_image"] = flops[name, mode] / 2 / 1e9
        row["gflops_per_s"] = flops[name, mode] * cfg.batch_size / seconds / 1e9
        row["fraction_of_matmul_peak"] = row["gflops_per_s"] / peak

    if cfg.memory:
        for key, row in results.items():
            if row["candidate"] == "polynet-compiled":
                continue
            log(f"peak memory: {key}")
            row.update(measure_memory(cfg, row["candidate"], row["mode"]))

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
    return dict(
        machine=_machine(cfg),
        config={k: v for k, v in asdict(cfg).items() if k != "notes"},
        matmul_peak_gflops=peak,
        notes=cfg.notes,
        results=list(results.values()),
    )


def to_markdown(report: dict[str, Any]) -> str:
    """Render a report as a markdown table, machine and settings first."""
    m, c = report["machine"], report["config"]
    gpu = f", {m['gpu']}" if "gpu" in m else ""
    lines = [
        f"Machine: {m['cpu']} ({m['logical_cpus']} logical CPUs){gpu}, "
        f"torch {m['torch']}, {c['threads']} threads, {c['device']}; fp32 matmul peak "
        f"{report['matmul_peak_gflops']:.1f} GFLOP/s. Input {c['batch_size']} x 3 x "
        f"{c['image_size']} x {c['image_size']}, median of {c['reps']} interleaved rounds.",
        "",
        "| candidate | mode | images/s | vs port | GMACs/image | GFLOP/s | of peak | peak MiB | "
        "memory vs port | step MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['candidate']} | {r['mode']} | {r['images_per_s']:.3f} | "
            f"{_fmt(r.get('speed_vs_port'), 'x')} | {r['gmacs_per_image']:.2f} | "
            f"{r['gflops_per_s']:.1f} | {100 * r['fraction_of_matmul_peak']:.0f} % | "
            f"{_fmt(r.get('peak_mib'), '', 0)} | {_fmt(r.get('memory_vs_port'), 'x')} | "
            f"{_fmt(r.get('step_mib'), '', 0)} |"
        )
    lines.append("")
    lines.extend(f"- {name}: {text}" for name, text in DESCRIPTIONS.items())
    lines.extend(f"- note: {n}" for n in report["notes"])
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, unit: str, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}{unit}"
