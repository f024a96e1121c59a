"""PolyNet: PolyInception modules, the Very Deep PolyNet and the paper's workflows.

Public API::

    import polynet
    model = polynet.create_model("polynet_very_deep")          # also timm.create_model(...)
    unit = polynet.PolyInception("I + F + GF", block=factory)  # any operator polynomial
    model, file = polynet.load_model("runs/fm/best.pt")        # any weights file

``import polynet`` registers every model with timm. The names below load on first use; the
``polynet`` command sets ``POLYNET_DEFER_IMPORTS`` while it parses its arguments, so that
``polynet --help`` does not wait for torch.
"""

import importlib
import os
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "MODELS": "polynet.model.zoo",
    "create_model": "polynet.model.zoo",
    "list_models": "polynet.model.zoo",
    "load_model": "polynet.io.loading",
    "NetworkSpec": "polynet.model.specs",
    "StageSpec": "polynet.model.specs",
    "PolyInception": "polynet.model.modules",
    "PolyNet": "polynet.model.network",
    "PolyNetConfig": "polynet.model.network",
    "Polynomial": "polynet.model.algebra",
    "named_expression": "polynet.model.algebra",
    "parse": "polynet.model.algebra",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'polynet' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if not os.environ.get("POLYNET_DEFER_IMPORTS"):
    importlib.import_module("polynet.model.zoo")  # registers the models with timm
    importlib.import_module("polynet.io.weights")  # how weights files reach a model
