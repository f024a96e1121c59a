"""Building the benchmarked models, each on the run's device, from one set of weights."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cached_property

import torch
from torch import nn

from polynet.bench.candidates import REGISTRY
from polynet.bench.config import BenchConfig
from polynet.errors import UserError
from polynet.inference.fuse import optimize_for_inference
from polynet.model.modules import PolyInception
from polynet.model.network import compile_units
from polynet.model.zoo import create_model

CL = torch.channels_last


def _port(cfg: BenchConfig, reference: nn.Module | None = None) -> nn.Module:
    """Build the released port, with our model's weights when a reference is given."""
    import pretrainedmodels

    port = pretrainedmodels.polynet(num_classes=1000, pretrained=None)
    # The port's fixed 9x9 pool only takes 331-362 px; the adaptive pool is the same there.
    port.avg_pool = nn.AdaptiveAvgPool2d(1)
    if reference is not None and cfg.width_mult == 1.0:
        from polynet.io.weights import to_port_layout

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


def onnx_runtime(cfg: BenchConfig, model: nn.Module) -> nn.Module:
    """``model`` exported to ONNX (:func:`~polynet.inference.export.export_onnx`), in ONNX Runtime.

    The session runs with the run's threads and ONNX Runtime's default graph optimisations (which
    fold the port's BatchNorms, as a user exporting it gets); ``source_model`` is ``model``.
    """
    from polynet.inference.quantize import onnx_runtime_model

    return onnx_runtime_model(model, (3, cfg.image_size, cfg.image_size), threads=cfg.threads)


class _Sources:
    """The models the candidates are made from, each built once, on first use.

    Candidates that train get copies, so that no two optimizers step the same weights.
    """

    def __init__(self, cfg: BenchConfig, same_weights: bool) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.same_weights = same_weights

    @cached_property
    def ours(self) -> nn.Module:
        torch.manual_seed(self.cfg.seed)
        return create_model("polynet_very_deep", width_mult=self.cfg.width_mult).to(self.device)

    def ours_cl(self) -> nn.Module:
        return copy.deepcopy(self.ours).to(memory_format=CL)

    @cached_property
    def port(self) -> nn.Module:
        reference = self.ours if self.same_weights and self.cfg.width_mult == 1.0 else None
        try:
            port = _port(self.cfg, reference)
        except ImportError as err:
            raise UserError(
                f"the port candidates need pretrainedmodels ({err}); pip install "
                "pretrainedmodels or drop them from --candidates"
            ) from err
        if self.cfg.width_mult != 1.0:
            self.cfg.notes.append("port and polynet have different widths and weights (quick mode)")
        return port.to(self.device)

    @cached_property
    def calibration(self) -> list[torch.Tensor]:
        """Two random batches; both int8 candidates calibrate on these same ones."""
        gen = torch.Generator().manual_seed(self.cfg.seed + 1)
        size = (self.cfg.batch_size, 3, self.cfg.image_size, self.cfg.image_size)
        return [torch.randn(size, generator=gen) for _ in range(2)]


def _ckpt(s: _Sources) -> nn.Module:
    model = s.ours_cl()
    model.set_grad_checkpointing(True)
    return model


def _port_int8(s: _Sources) -> nn.Module:
    from polynet.inference.quantize import quantize_int8

    return quantize_int8(s.port.eval(), s.calibration, threads=s.cfg.threads)


_BUILDERS: dict[str, Callable[[_Sources], nn.Module]] = {
    "polynet": _Sources.ours_cl,
    "polynet-fused": lambda s: optimize_for_inference(s.ours),
    "polynet-fused-plain": lambda s: optimize_for_inference(s.ours, prepack=False),
    "polynet-naive": lambda s: _Naive(s.ours_cl()),
    "polynet-ckpt": _ckpt,
    "polynet-compiled": lambda s: compile_units(s.ours_cl()),
    # The library's own fp32 ONNX Runtime path (threads: torch's, which the bench sets).
    "polynet-ort": lambda s: optimize_for_inference(
        s.ours, runtime="onnxruntime", input_size=(3, s.cfg.image_size, s.cfg.image_size)
    ),
    "port": lambda s: copy.deepcopy(s.port),
    "port-cl": lambda s: copy.deepcopy(s.port).to(memory_format=CL),
    "port-ort": lambda s: onnx_runtime(s.cfg, s.port),
    "timm-irv2": lambda s: _timm_irv2(s.cfg).to(s.device),
    "polynet-fused-bf16": lambda s: optimize_for_inference(s.ours, precision="bf16"),
    "polynet-int8": lambda s: optimize_for_inference(
        s.ours, precision="int8", calibration=s.calibration
    ),
    "port-ort-int8": _port_int8,
}
"""How each candidate is built; an autocast candidate is its fp32 namesake's model."""


def build_candidates(cfg: BenchConfig, same_weights: bool = True) -> dict[str, nn.Module]:
    """Every candidate the run measures, on the device, in :data:`REGISTRY` order.

    Args:
        cfg: The benchmark settings.
        same_weights: Give the port our model's weights (through the released-layout key map).

    """
    sources = _Sources(cfg, same_weights)
    built = {}
    for name in cfg.selection().names:
        built[name] = _BUILDERS[REGISTRY[name].base](sources)
    return built


__all__ = ["build_candidates", "naive_units", "onnx_runtime"]
