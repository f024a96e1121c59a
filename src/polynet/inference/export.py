"""Export a model to ONNX, TorchScript or torch.export, and check the files against PyTorch.

Every format is traced at one input size: the model's ``pretrained_cfg`` input size unless
another is given. The batch dimension of the ONNX graph and of the exported program is dynamic.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from polynet.io.checkpoint import atomic_write

ExportFormat = Literal["onnx", "torchscript", "exported"]
FORMATS: tuple[str, ...] = ("onnx", "torchscript", "exported")
DEFAULT_OPSET = 17


def example_input(
    model: nn.Module, input_size: Sequence[int] | None = None, batch_size: int = 2
) -> torch.Tensor:
    """Return a deterministic random batch of the model's input size (C, H, W)."""
    size = tuple(input_size or model.pretrained_cfg["input_size"])
    if len(size) != 3:
        raise ValueError(f"input size must be (channels, height, width), got {size}")
    generator = torch.Generator().manual_seed(0)
    return torch.rand((batch_size, *size), generator=generator)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    input_size: Sequence[int] | None = None,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export to ONNX with a dynamic batch dimension (input ``input``, output ``logits``).

    Args:
        model: The model (put in eval mode here).
        path: Destination ``.onnx`` file.
        input_size: (C, H, W) to trace at; the model's ``pretrained_cfg`` size by default.
        opset: ONNX opset version.

    Returns:
        The written path.

    """
    model.eval()
    x = example_input(model, input_size)
    path = Path(path)

    def write(f) -> None:
        # The TorchScript-based exporter needs no extra dependency (the torch.export-based one
        # needs onnxscript) and handles this static conv net exactly; silence its deprecation
        # notice, which is about models with data-dependent control flow.
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (x,),
                f,
                dynamo=False,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=opset,
            )

    atomic_write(path, write)
    return path


def export_torchscript(
    model: nn.Module, path: str | os.PathLike, input_size: Sequence[int] | None = None
) -> Path:
    """Export a traced TorchScript module (any batch size; the traced height and width).

    Args:
        model: The model (put in eval mode here).
        path: Destination ``.pt`` file, loadable with ``torch.jit.load``.
        input_size: (C, H, W) to trace at; the model's ``pretrained_cfg`` size by default.

    Returns:
        The written path.

    """
    model.eval()
    # TorchScript is deprecated in favour of torch.export, but it is still what C++ (libtorch)
    # and many serving stacks load; the notice would only repeat that on every export.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)
        # check_trace would re-run the model twice (minutes for the very deep model on a CPU);
        # the graph has no data-dependent control flow to get wrong.
        traced = torch.jit.trace(model, (example_input(model, input_size),), check_trace=False)
        path = Path(path)
        atomic_write(path, lambda f: torch.jit.save(traced, f))
    return path


def export_program(
    model: nn.Module, path: str | os.PathLike, input_size: Sequence[int] | None = None
) -> Path:
    """Export with ``torch.export``: an ``ExportedProgram`` of the eval-mode model, any batch size.

    Args:
        model: The model (put in eval mode here).
        path: Destination ``.pt2`` file, loadable with ``torch.export.load``.
        input_size: (C, H, W) to export at; the model's ``pretrained_cfg`` size by default.

    Returns:
        The written path.

    """
    model.eval()
    x = example_input(model, input_size)
    with torch.no_grad():
        program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    path = Path(path)
    atomic_write(path, lambda f: torch.export.save(program, f))
    return path


def export(
    model: nn.Module,
    path: str | os.PathLike,
    fmt: ExportFormat,
    input_size: Sequence[int] | None = None,
) -> Path:
    """Export ``model`` in format ``fmt`` (``"onnx"``, ``"torchscript"`` or ``"exported"``)."""
    if fmt == "onnx":
        return export_onnx(model, path, input_size)
    if fmt == "torchscript":
        return export_torchscript(model, path, input_size)
    if fmt == "exported":
        return export_program(model, path, input_size)
    raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")


def onnx_max_error(model: nn.Module, path: str | os.PathLike, x: torch.Tensor) -> float:
    """Run an exported ONNX file with ONNX Runtime on ``x``; the largest deviation from PyTorch.

    Args:
        model: The PyTorch model the file was exported from.
        path: The ``.onnx`` file.
        x: An input batch (any batch size: the batch dimension is dynamic).

    Returns:
        ``max |onnxruntime(x) - model(x)|`` over all logits.

    """
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input": x.numpy()})
    with torch.no_grad():
        expected = model.eval()(x)
    return float((torch.from_numpy(logits) - expected).abs().max())


def exported_max_error(model: nn.Module, path: str | os.PathLike, x: torch.Tensor) -> float:
    """Reload an exported program with ``torch.export.load``; its largest deviation from PyTorch.

    Args:
        model: The PyTorch model the file was exported from.
        path: The ``.pt2`` file.
        x: An input batch (any batch size: the batch dimension is dynamic).

    Returns:
        ``max |program(x) - model(x)|`` over all logits.

    """
    program = torch.export.load(str(path)).module()
    with torch.no_grad():
        return float((program(x) - model.eval()(x)).abs().max())
