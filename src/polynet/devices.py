"""Devices by name, checked once: a CUDA request without CUDA is the user's error, not a crash."""

from __future__ import annotations

import os

import torch

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
        index = device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", 0))
        if index >= torch.cuda.device_count():
            raise UserError(
                f"device {name!r}: this machine has {torch.cuda.device_count()} GPU(s); use "
                f"cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise UserError(f"device {name!r} is not supported; use cpu, cuda or cuda:N")
    return device
