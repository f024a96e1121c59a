"""Checkpoint files: written atomically, read without executing code.

A polynet checkpoint is one ``torch.save`` file holding only tensors and plain containers, so
it loads with ``torch.load(weights_only=True)``. Its keys:

- ``format``: ``"polynet-checkpoint"``; ``version``: 1.
- ``model_name``: a registered model name (it carries the input preprocessing);
  ``model_config``: the model's whole :class:`~polynet.model.network.PolyNetConfig` as a dict
  (``model_kwargs``, constructor overrides, in older files and for non-PolyNet models).
- ``model``: the model's ``state_dict``.
- ``class_names``: the classifier's class names, when known (``classes`` in older files).
- ``pretrained_cfg``: the preprocessing the model was trained with.
- Anything else a workflow adds (optimizer, scheduler, RNG states, metrics, provenance, ...).

:class:`ModelRecord` owns these keys and their older spellings: workflows write and loaders
read a checkpoint's model through it.

Building a model from a checkpoint is :func:`polynet.io.loading.load_model`.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from polynet.errors import UserError

FORMAT = "polynet-checkpoint"
VERSION = 1


class CheckpointError(UserError):
    """A checkpoint that cannot be used: unreadable, truncated, foreign or unsafe."""


@dataclass
class ModelRecord:
    """What a polynet checkpoint records of its model: the one owner of those payload keys.

    Attributes:
        model_name: The registered model (or study model) it was built as.
        state_dict: Its weights (``model`` in the file).
        model_config: The whole :class:`~polynet.model.network.PolyNetConfig`, as a dict.
        model_kwargs: Constructor overrides (older files, and models without a config).
        class_names: The classifier's class names, when known.
        pretrained_cfg: The preprocessing the model was trained with.

    """

    model_name: str | None
    state_dict: Mapping[str, torch.Tensor]
    model_config: dict[str, Any] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] | None = None
    pretrained_cfg: dict[str, Any] = field(default_factory=dict)

    def payload(self, **extra: Any) -> dict[str, Any]:
        """The checkpoint payload: these keys, then what the workflow adds (``extra``)."""
        clash = set(extra) & {"model_name", "model_config", "model_kwargs", "model"}
        if clash:
            raise ValueError(f"{sorted(clash)} belong to the model record; set them on it")
        return dict(
            model_name=self.model_name,
            model_config=dict(self.model_config),
            model_kwargs=dict(self.model_kwargs),
            model=dict(self.state_dict),
            class_names=None if self.class_names is None else list(self.class_names),
            pretrained_cfg=dict(self.pretrained_cfg),
            **extra,
        )

    @classmethod
    def read(cls, payload: Mapping[str, Any]) -> ModelRecord:
        """The record of a loaded checkpoint payload, older spellings included."""
        return cls(
            payload.get("model_name"),
            dict(payload["model"]),
            dict(payload.get("model_config") or {}),
            dict(payload.get("model_kwargs") or {}),
            # Training checkpoints before this name was settled called them "classes".
            payload.get("class_names", payload.get("classes")),
            dict(payload.get("pretrained_cfg") or {}),
        )


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
        # mkstemp makes the file private (0600); give it the mode open() would (0644 usually).
        os.fchmod(fd, 0o666 & ~_umask())
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
    _check_torch_magic(path)
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
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is truncated or corrupt ({_reason(err)}); use "
            "an earlier checkpoint or write it again"
        ) from err


# torch.save writes a zip archive; files from before PyTorch 1.6 are a bare pickle (protocol 2+).
_ZIP_MAGIC, _PICKLE_MAGIC = b"PK\x03\x04", b"\x80"


def _check_torch_magic(path: Path) -> None:
    """Name a file that is not a torch.save file at all for what it is."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_MAGIC):
        return
    if path.suffix == ".onnx":
        kind = "an ONNX model (exported for inference; it holds no polynet checkpoint)"
    elif not head:
        kind = "empty"
    elif all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        kind = "a text file"
    else:
        kind = "not a PyTorch file"
    raise CheckpointError(
        f"{path} is {kind}; give a polynet checkpoint (.pt), a .safetensors file or the "
        "released .pth"
    )


def _reason(err: BaseException) -> str:
    """The first line of a library's error, shortened at a word boundary."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if len(text) <= 120:
        return text
    return text[:120].rsplit(" ", 1)[0] + " ..."


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
