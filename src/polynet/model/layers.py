"""Injectable layers in timm's manner: norms and activations given as classes or names."""

from __future__ import annotations

import importlib
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
    norm = _by_name(norm_layer, get_norm_layer)
    act = _by_name(act_layer, get_act_layer)
    return norm or nn.BatchNorm2d, act or nn.ReLU


def _by_name(
    layer: LayerFactory | None, timm_lookup: Callable[[str], Callable[..., nn.Module]]
) -> Callable[..., nn.Module] | None:
    if not isinstance(layer, str):
        return layer
    if layer.startswith("<"):
        raise ValueError(
            f"the model was built with the layer {layer[1:-1]}, which has no import path; "
            "pass the layer again (norm_layer= / act_layer=) when rebuilding it"
        )
    if "." not in layer:  # a timm name such as "batchnorm2d" or "gelu"
        return timm_lookup(layer)
    module, _, name = layer.rpartition(".")  # an import path recorded by layer_name()
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import layer {layer!r}: {err}") from err


def layer_name(layer: LayerFactory | None) -> str | None:
    """How a layer argument is recorded in a model's config (None for the defaults).

    Names stay names; the default BatchNorm2d and ReLU become None; any other class or
    function is recorded by its import path, which :func:`resolve_layers` imports again.
    """
    if layer is None or isinstance(layer, str):
        return layer
    if layer in (nn.BatchNorm2d, nn.ReLU):
        return None
    module, name = getattr(layer, "__module__", None), getattr(layer, "__qualname__", None)
    if not module or not name or "<" in name:  # a partial or a lambda: no name to import
        return f"<{layer!r}>"
    return f"{module}.{name}"
