"""Injectable layers in timm's manner: norms and activations given as classes or names."""

from __future__ import annotations

from collections.abc import Callable

from timm.layers import get_act_layer, get_norm_layer
from torch import nn

LayerFactory = Callable[..., nn.Module] | str


def resolve_layers(
    norm_layer: LayerFactory | None, act_layer: LayerFactory | None
) -> tuple[Callable[..., nn.Module], Callable[..., nn.Module]]:
    """Turn names such as ``"batchnorm2d"`` or ``"relu"`` (or None) into layer factories.

    Defaults are the released model's: BatchNorm2d (eps 1e-5, momentum 0.1) and ReLU. The
    ReLU is not in-place by default because one block output may feed several paths.
    """
    norm = get_norm_layer(norm_layer) if isinstance(norm_layer, str) else norm_layer
    act = get_act_layer(act_layer) if isinstance(act_layer, str) else act_layer
    return norm or nn.BatchNorm2d, act or nn.ReLU
