"""Checkpoint files: written atomically, read without executing code.

A polynet checkpoint is one ``torch.save`` file holding only tensors and plain containers, so
it loads with ``torch.load(weights_only=True)``. Its keys:

- ``format``: ``"polynet-checkpoint"``; ``version``: 1.
- ``model_name``: a registered model name; ``model_kwargs``: JSON-able constructor overrides
  (``num_classes``, ``in_chans``, ``spec``, ``width_mult``, ...).
- ``model``: the model's ``state_dict``.
- Anything else a workflow adds (optimizer, scheduler, RNG states, metrics, ...).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = "polynet-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, truncated, foreign or unsafe."""


def atomic_write(path: str | os.PathLike, write: Any) -> None:
    """Write a file so that a crash leaves either the old file or the complete new one.

    Args:
        path: Destination.
        write: Called with a binary file object to fill.

    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def payload_checksum(payload: dict[str, Any]) -> str:
    """SHA-256 over every value of a checkpoint dict except ``checksum`` (tensors by content).

    ``torch.load`` notices a truncated file but not flipped bytes inside tensor data; the
    checksum stored by :func:`save_checkpoint` and verified by :func:`load_checkpoint` does.
    """
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            flat = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"T{value.dtype}{tuple(value.shape)}".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
        elif isinstance(value, dict):
            keys = sorted((k for k in value if k != "checksum"), key=repr)
            digest.update(f"D{len(keys)}".encode())
            for key in keys:
                digest.update(repr(key).encode())
                feed(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(f"L{len(value)}".encode())
            for item in value:
                feed(item)
        else:
            digest.update(repr(value).encode())

    feed(payload)
    return digest.hexdigest()


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Atomically save a checkpoint dict (``format``, ``version`` and ``checksum`` are added)."""
    payload = {"format": FORMAT, "version": VERSION, **payload}
    payload["checksum"] = payload_checksum(payload)
    atomic_write(path, lambda f: torch.save(payload, f))


def read_torch_file(path: str | os.PathLike, map_location: str = "cpu") -> Any:
    """Read any ``torch.save`` file with the safe unpickler (tensors and plain containers only).

    Raises:
        FileNotFoundError: If the file does not exist.
        CheckpointError: If it is truncated, corrupt or refused by the safe unpickler.

    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for bad files
        if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err):
            # torch's text suggests loading unsafely; say only what was refused and why.
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
            names = f" (it names {found.group(1)})" if found else ""
            raise CheckpointError(
                f"cannot read checkpoint {path}: it is a pickle that carries code, which is "
                f"refused{names}; polynet loads only tensors and plain containers"
            ) from err
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path}: {first[:300]} (truncated, corrupt, or a pickle "
            "that carries code, which is refused)"
        ) from err


def load_checkpoint(path: str | os.PathLike, map_location: str = "cpu") -> dict[str, Any]:
    """Load a polynet checkpoint safely (no unpickling of code).

    Raises:
        FileNotFoundError: If the file does not exist.
        CheckpointError: If it is truncated, corrupt, refused by the safe unpickler or not a
            polynet checkpoint.

    """
    path = Path(path)
    payload = read_torch_file(path, map_location)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a polynet checkpoint; for released weights use "
            "'polynet convert' or create_model(..., checkpoint_path=...)"
        )
    if "checksum" in payload and payload["checksum"] != payload_checksum(payload):
        raise CheckpointError(
            f"checkpoint {path} is corrupt (its checksum does not match its contents); use an "
            "earlier checkpoint or retrain"
        )
    return payload


def load_model(
    path: str | os.PathLike, map_location: str = "cpu", **overrides: Any
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model stored in a checkpoint and load its weights strictly.

    Args:
        path: A checkpoint written by :func:`save_checkpoint`.
        map_location: Device for the loaded tensors.
        **overrides: Extra constructor arguments (e.g. ``drop_rate``).

    Returns:
        The model in eval mode and the checkpoint's payload.

    """
    from polynet.weights import WeightsFile, fit_state_dict
    from polynet.zoo import create_model

    payload = load_checkpoint(path, map_location)
    name, kwargs = payload["model_name"], payload.get("model_kwargs", {})
    model = create_model(name, **{**kwargs, **overrides})
    weights = WeightsFile(Path(path), dict(payload["model"]), "checkpoint", name, dict(kwargs))
    model.load_state_dict(fit_state_dict(weights, model, adapt=False))
    return model.eval(), payload
