"""PolyNet: PolyInception modules, the Very Deep PolyNet and the paper's workflows.

Public API::

    import polynet
    model = polynet.create_model("polynet_very_deep")          # also timm.create_model(...)
    unit = polynet.PolyInception("I + F + GF", block=factory)  # any operator polynomial
"""

from polynet.algebra import Polynomial, named_expression, parse
from polynet.modules import PolyInception
from polynet.network import PolyNet
from polynet.specs import NetworkSpec, StageSpec
from polynet.zoo import MODELS, create_model, list_models

__version__ = "0.1.0"

__all__ = [
    "MODELS",
    "NetworkSpec",
    "PolyInception",
    "PolyNet",
    "Polynomial",
    "StageSpec",
    "create_model",
    "list_models",
    "named_expression",
    "parse",
]
