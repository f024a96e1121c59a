"""Post-training static int8 quantization for CPU inference, calibrated on real images.

:func:`quantize_int8` exports the folded, horizontally fused fp32 model
(:func:`polynet.inference.fuse.optimize_for_inference`) to ONNX, quantizes it statically with ONNX
Runtime (QDQ, per-channel int8 weights, uint8 activations whose ranges come from the
calibration batches) and returns an :class:`OnnxRuntimeModel`: a callable taking and returning
torch tensors, run by an ``onnxruntime.InferenceSession`` (VNNI int8 kernels on x86).
:func:`onnx_runtime_model` runs the fp32 graph in the same wrapper (``runtime="onnxruntime"`` of
:func:`polynet.inference.fuse.optimize_for_inference`).

Why ONNX Runtime and not PyTorch's PT2E path: this PyTorch (2.14) no longer ships
``torch.ao.quantization.quantize_pt2e``; it lives in ``torchao`` (``pip install torchao``,
``torchao.quantization.pt2e`` with ``X86InductorQuantizer``), and its converted graph only runs
int8 kernels after ``torch.compile`` lowers it with Inductor; in eager mode it runs
quantize/dequantize pairs around fp32 convolutions. Measured on a 2-core AMD EPYC
(AVX512-VNNI, AVX512-BF16; shared with other jobs, so ratios moved by up to +-25 % between
runs), one thread, ``polynet_small`` (28 x 28, 1 channel) with random weights and BatchNorm
statistics from the data, by ``python benchmarks/int8_paths.py`` (width_mult 0.25, batch 32;
``--width 0.5 --batch 16``; ``--pt2e`` for torchao), images/s relative to the fused fp32 model,
max |logit - fp32 eager logit| (logits of order 1):

=================================  ===============  ================
path                               images/s ratio   max logit diff
=================================  ===============  ================
fused fp32 (packed oneDNN)         1.00x            1e-6
fused bf16 (packed oneDNN)         1.8-2.2x         0.010-0.014
ONNX Runtime fp32, same graph      0.96-1.13x       1e-6
ONNX Runtime int8 (QDQ, per-ch.)   2.9-5.2x         0.028-0.034
torchao PT2E x86 + Inductor int8   0.61x            0.036
=================================  ===============  ================

(PT2E: ``torchao`` 0.18, ``X86InductorQuantizer`` default config, ``torch.compile`` took 99 s
on this machine for the tiny model.) The int8 gain is the int8 kernels, not the runtime: the
same graph in ONNX Runtime at fp32 is as fast as ours. Accuracy, in ``tests/test_precision.py``:
a Fashion-MNIST-trained small model (width_mult 0.0625, 64 steps) scored top-1 64.3 % (fp32),
64.2 % (bf16) and 64.1 % (int8) on 1000 test images.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from polynet.errors import UserError


class _Batches:
    """ONNX Runtime's calibration reader over torch batches (``get_next`` / ``rewind``)."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.batches = batches
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._iter, None)
        return None if batch is None else {"input": batch.float().cpu().numpy()}

    def rewind(self) -> None:
        self._iter = iter(self.batches)


class OnnxRuntimeModel:
    """An ONNX Runtime session that classifies torch tensors: a callable, not a module.

    The graph is the fp32 export of a model or its int8 quantization. It has no parameters,
    lives on the CPU and cannot be trained; ``num_classes`` and ``pretrained_cfg`` are the
    model's it was made from (:attr:`source_model`).

    Args:
        onnx_bytes: The ONNX model (inputs ``input``, outputs ``logits``).
        source: The fp32 model it was made from (for its attributes).
        threads: Intra-op threads for ONNX Runtime (default: ``torch.get_num_threads()``).

    """

    def __init__(self, onnx_bytes: bytes, source: nn.Module, threads: int | None = None) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(
            onnx_bytes, options, providers=["CPUExecutionProvider"]
        )
        self._source = source
        self.training = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 logits for a float batch ``x`` (any batch size, the exported H x W)."""
        if x.device.type != "cpu":
            raise UserError(f"the ONNX Runtime model runs on the CPU; got an input on {x.device}")
        (logits,) = self.session.run(["logits"], {"input": x.detach().float().contiguous().numpy()})
        return torch.from_numpy(logits)

    forward = __call__

    def eval(self) -> OnnxRuntimeModel:
        """No-op (always in eval mode), for code that calls ``model.eval()``."""
        return self

    def train(self, mode: bool = True) -> OnnxRuntimeModel:
        """Refuse training mode (an inference session has nothing to train)."""
        if mode:
            raise UserError("an ONNX Runtime model cannot be trained; train the torch model")
        return self

    @property
    def source_model(self) -> nn.Module:
        """The fp32 model this was made from (e.g. to count its FLOPs)."""
        return self._source

    @property
    def num_classes(self) -> int:
        """The source model's classifier outputs."""
        return self._source.num_classes

    @property
    def pretrained_cfg(self) -> dict:
        """The source model's preprocessing and class names."""
        return self._source.pretrained_cfg


def _calibration_list(calibration: Iterable[torch.Tensor] | None) -> list[torch.Tensor]:
    batches = [] if calibration is None else [b for b in calibration if len(b)]
    if not batches:
        raise UserError(
            "int8 needs calibration batches (preprocessed images, e.g. 2 training batches); "
            "pass calibration= or use precision bf16/fp32"
        )
    return batches


def quantize_int8(
    model: nn.Module,
    calibration: Iterable[torch.Tensor] | None,
    threads: int | None = None,
) -> OnnxRuntimeModel:
    """Statically quantize ``model`` to int8 with ONNX Runtime, calibrated on real batches.

    Args:
        model: An fp32 eval-mode model (ideally folded by
            :func:`polynet.inference.fuse.optimize_for_inference` with ``prepack=False``) with a
            ``pretrained_cfg``.
        calibration: Preprocessed input batches, e.g. a few training batches; activation ranges
            are their min/max.
        threads: Intra-op threads (default: ``torch.get_num_threads()``).

    Returns:
        The int8 model.

    Raises:
        UserError: Without calibration batches, or without onnxruntime installed.

    """
    try:
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as err:
        raise UserError(
            f"int8 needs ONNX Runtime ({err}); pip install 'polynet[export]' or use bf16/fp32"
        ) from err

    from polynet.devices import cpu_vnni
    from polynet.inference.export import export_onnx

    batches = _calibration_list(calibration)
    with tempfile.TemporaryDirectory(prefix="polynet-int8-") as tmp:
        fp32, pre, int8 = (Path(tmp) / name for name in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        export_onnx(model, fp32, input_size=tuple(batches[0].shape[1:]))
        # Shape inference and graph optimisation first, as ONNX Runtime's docs recommend: the
        # quantizer then sees the fused Conv+Relu graph that the session will run.
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(int8),
            _Batches(batches),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            # Without VNNI, u8 x s8 products summed in pairs saturate 16 bits: 7-bit weights.
            reduce_range=not cpu_vnni(),
        )
        data = int8.read_bytes()
    return OnnxRuntimeModel(data, model, threads)


def onnx_runtime_model(
    model: nn.Module, input_size: Sequence[int] | None = None, threads: int | None = None
) -> OnnxRuntimeModel:
    """``model`` exported to ONNX in fp32 and run by ONNX Runtime's CPU kernels.

    Args:
        model: An eval-mode model with a ``pretrained_cfg`` (ideally folded by
            :func:`polynet.inference.fuse.optimize_for_inference` with ``prepack=False``).
        input_size: (C, H, W) of its inputs; the ``pretrained_cfg`` size by default.
        threads: Intra-op threads (default: ``torch.get_num_threads()``).

    Raises:
        UserError: Without onnxruntime installed.

    """
    try:
        import onnxruntime  # noqa: F401
    except ImportError as err:
        raise UserError(
            f"runtime onnxruntime needs ONNX Runtime ({err}); pip install 'polynet[export]' or "
            "use runtime torch"
        ) from err
    from polynet.inference.export import export_onnx

    with tempfile.TemporaryDirectory(prefix="polynet-ort-") as tmp:
        data = export_onnx(model, Path(tmp) / "model.onnx", input_size=input_size).read_bytes()
    return OnnxRuntimeModel(data, model, threads)


__all__ = ["OnnxRuntimeModel", "onnx_runtime_model", "quantize_int8"]
