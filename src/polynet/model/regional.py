"""The model by regions: a stage's units run one at a time, checkpointed or compiled alone.

:class:`Stage` holds a stage's PolyInception units; with gradient checkpointing on, each unit is
one recomputed segment (:func:`restored_buffers` keeps BatchNorm statistics from being updated
twice). :func:`compile_units` compiles every unit and reduction on its own (regional
compilation).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from polynet.model.blocks import Mixed
from polynet.model.modules import PolyInception


class Stage(nn.Sequential):
    """The units of one stage, in forward order.

    With ``grad_checkpointing`` set (by :meth:`PolyNet.set_grad_checkpointing
    <polynet.model.network.PolyNet.set_grad_checkpointing>`) and gradients being recorded, every
    unit
    is one checkpoint segment: only the unit inputs stay stored, and each unit's activations
    are recomputed in the backward pass. Under ``torch.no_grad()`` and in TorchScript the units
    simply run.
    """

    def __init__(self, *units: nn.Module) -> None:
        super().__init__(*units)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the units in order."""
        if not torch.jit.is_scripting() and self.grad_checkpointing and torch.is_grad_enabled():
            return self._checkpointed(x)
        for unit in self:
            x = unit(x)
        return x

    @torch.jit.unused
    def _checkpointed(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self:
            x = checkpoint(
                unit, x, use_reentrant=False, context_fn=partial(_recompute_contexts, unit)
            )
        return x


@contextmanager
def restored_buffers(module: nn.Module) -> Iterator[None]:
    """Put every buffer of ``module`` back as it was when the block exits.

    Checkpointing runs a unit's forward twice per step; without this its BatchNorms would take
    the batch into their running statistics twice (momentum 0.19 instead of 0.1) and the model
    would evaluate differently from one trained without checkpointing. The recomputation must
    still run the norms exactly as the first pass did (same saved tensors), hence a restore
    rather than switching the updates off.
    """
    saved = [(buffer, buffer.clone()) for buffer in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def _recompute_contexts(unit: nn.Module) -> tuple[AbstractContextManager, AbstractContextManager]:
    return nullcontext(), restored_buffers(unit)


def compile_units(model: nn.Module, **compile_kwargs) -> nn.Module:
    """Regional compilation: ``torch.compile`` every PolyInception unit and Mixed part in place.

    The units of a stage run one ``forward`` over blocks of one shape, so dynamo traces and
    inductor compiles a handful of graphs (one per unit kind) instead of the whole
    500-convolution network as one graph: minutes less of compile time for the same kernels.
    The head, the stem's plain layers and anything else stay eager. Without units or Mixed
    parts, the whole model is compiled.

    Args:
        model: A PolyNet or any module with PolyInception units.
        **compile_kwargs: Passed to ``torch.compile`` (``mode=``, ``backend=``, ...). Shapes
            are static unless ``dynamic=`` says otherwise: the unit kinds differ in shape, and
            dynamo would otherwise turn to slower dynamic-shape graphs after the second.

    Returns:
        The model (compiled in place), or a compiled wrapper when it has no units.

    """
    regions = [m for m in model.modules() if isinstance(m, (PolyInception, Mixed))]
    if not regions:
        return torch.compile(model, **compile_kwargs)
    # Each unit kind is one compilation of the same forward; scales and drop probabilities
    # are tensors, so units that differ only in them share it.
    compile_kwargs.setdefault("dynamic", False)
    for region in regions:
        region.compile(**compile_kwargs)
    return model
