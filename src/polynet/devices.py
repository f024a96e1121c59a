"""Devices by name, checked once: a CUDA request without CUDA is the user's error, not a crash."""

from __future__ import annotations

import torch

from polynet.distributed import launch_env
from polynet.errors import UserError


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The device a name asks for (``"auto"`` or None: CUDA when available, else the CPU).

    Under torchrun, a bare ``"cuda"`` is this process's GPU (``LOCAL_RANK``).

    Raises:
        UserError: For CUDA without CUDA, a GPU index that does not exist, or a bad name.

    """
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise UserError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"device {name!r} requested but CUDA is not available; use --device cpu"
            )
        index = device.index if device.index is not None else launch_env().local_rank
        if index >= torch.cuda.device_count():
            raise UserError(
                f"device {name!r}: this machine has {torch.cuda.device_count()} GPU(s); use "
                f"cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise UserError(f"device {name!r} is not supported; use cpu, cuda or cuda:N")
    return device


def _cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(device: str | torch.device | None = "cpu") -> bool:
    """Whether ``device`` computes bfloat16 natively, so bf16 inference is faster than fp32.

    On CPU that takes AVX512-BF16 or AMX: ``torch.backends.cpu.get_cpu_capability()`` names
    AMX (``"AVX512_BF16"``/``"AMX"`` in builds that report it), and ``/proc/cpuinfo`` lists the
    ``avx512_bf16`` / ``amx_bf16`` flags (this PyTorch reports plain ``"AVX512"`` on an
    AVX512-BF16 CPU, so the flags decide there). On CUDA, ``torch.cuda.is_bf16_supported()``.

    Args:
        device: A device or its name (see :func:`resolve_device`).

    """
    device = resolve_device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    capability = torch.backends.cpu.get_cpu_capability().upper()
    if "AMX" in capability or "BF16" in capability:
        return True
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_vnni() -> bool:
    """Whether the CPU has VNNI (int8 dot products: AVX512-VNNI, AVX-VNNI or AMX-INT8).

    Without it, ONNX Runtime's u8 x s8 kernels add pairs of products in 16 bits, which can
    saturate: int8 models then quantize weights to 7 bits (``reduce_range``).
    """
    return bool(_cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def default_precision(device: str | torch.device | None = "cpu") -> str:
    """``"bf16"`` where :func:`native_bf16` holds for ``device``, else ``"fp32"``."""
    return "bf16" if native_bf16(device) else "fp32"


def resolve_precision(
    precision: str, device: str | torch.device | None = "cpu", runtime: str = "torch"
) -> str:
    """The precision a name asks for: ``"auto"`` is :func:`default_precision` of ``device``.

    In ONNX Runtime (``runtime="onnxruntime"``), which has no bf16 convolutions on CPU,
    ``"auto"`` is fp32.

    Raises:
        UserError: For a name other than auto, fp32, bf16 or int8, or int8 off the CPU.

    """
    if precision == "auto":
        return "fp32" if runtime == "onnxruntime" else default_precision(device)
    if precision not in ("fp32", "bf16", "int8"):
        raise UserError(f"unknown precision {precision!r}; use auto, fp32, bf16 or int8")
    if precision == "int8" and resolve_device(device).type != "cpu":
        raise UserError("int8 runs on the CPU (ONNX Runtime); use --device cpu or --precision bf16")
    return precision


def training_amp(amp: str, device: str | torch.device | None = "auto") -> str:
    """The autocast a training run uses: ``"auto"`` is bf16 where :func:`native_bf16` holds.

    Args:
        amp: ``"auto"``, ``"none"``, ``"bf16"`` or ``"fp16"``.
        device: The run's device (or its name).

    Returns:
        ``"none"``, ``"bf16"`` or ``"fp16"``.

    Raises:
        UserError: For fp16 off CUDA (float16 autocast is slow and unscaled on a CPU).

    """
    device = resolve_device(device)
    if amp == "auto":
        return "bf16" if native_bf16(device) else "none"
    if amp == "fp16" and device.type != "cuda":
        raise UserError(
            "--amp fp16 needs CUDA (float16 autocast is slow and unscaled on a CPU); use "
            "--amp bf16 or --amp none on the CPU"
        )
    return amp


def autocast(device: torch.device | str, amp: str) -> torch.autocast:
    """The autocast context of a resolved ``amp`` (``"none"``, ``"bf16"`` or ``"fp16"``).

    The one place a precision name becomes an autocast: training steps, the time-budget probe,
    the ablation's timing pass and the bench all enter it.
    """
    if amp not in ("none", "bf16", "fp16"):
        raise ValueError(f"amp must be none, bf16 or fp16 (resolve 'auto' first), got {amp!r}")
    device_type = torch.device(device).type
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type, dtype=dtype, enabled=amp != "none")
