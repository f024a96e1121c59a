"""The registered models as data: spec, constructor arguments, preprocessing, description.

This table imports nothing heavy (no torch, no timm), so ``polynet list`` and name checks answer
at once; :mod:`polynet.model.zoo` registers every row with timm and builds the models.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any

from polynet.errors import UserError
from polynet.model.algebra import PAPER_MODULES, module_id

# timm's IMAGENET_DEFAULT_MEAN / _STD (tests/test_zoo_registry.py checks they agree).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PORT_MODEL = "polynet_very_deep"
"""The model the released port's weights belong to (the default for files without metadata)."""
VERY_DEEP_SPEC = "A: 2-way x10 | B: (poly-3, 2-way) x10 | C: (poly-3, 2-way) x5"
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
# Fashion-MNIST's labels in order: the registered small models' label_names.
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def _ir(a: int, b: int, c: int) -> str:
    return f"A: ir x{a} | B: ir x{b} | C: ir x{c}"


def _imagenet_cfg(size: int = 299, **overrides: Any) -> dict[str, Any]:
    """The paper's evaluation input: bilinear resize and centre crop, ImageNet statistics."""
    cfg = dict(
        num_classes=1000,
        input_size=(3, size, size),
        crop_pct=0.875,
        crop_mode="center",
        interpolation="bilinear",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        first_conv="stem.conv1.conv",
        classifier="last_linear",
        license="apache-2.0",
    )
    cfg.update(overrides)
    return cfg


def _small_cfg(**overrides: Any) -> dict[str, Any]:
    """Fashion-MNIST-sized input: 1 x 28 x 28, no crop, the data set's statistics."""
    cfg = _imagenet_cfg(
        num_classes=10,
        input_size=(1, 28, 28),
        crop_pct=1.0,
        mean=FASHION_MNIST_MEAN,
        std=FASHION_MNIST_STD,
    )
    cfg.update(overrides)
    return cfg


@dataclass(frozen=True)
class ModelDef:
    """A registered model: its spec, constructor arguments and preprocessing.

    Attributes:
        spec: The network spec (see :mod:`polynet.model.specs`).
        kwargs: Extra :class:`~polynet.model.network.PolyNet` arguments.
        cfg: The preprocessing part of the ``pretrained_cfg`` (input size, crop,
            interpolation, mean, std, ...); the registered cfg adds what follows from the
            architecture and the data set (:func:`registered_cfg`).
        description: One line for ``polynet list``.
        dataset: The data set whose classes the classifier's outputs are: ``"imagenet-1k"``
            or ``"fashion-mnist"``.

    """

    spec: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    cfg: dict[str, Any] = field(default_factory=_imagenet_cfg)
    description: str = ""
    dataset: str = "imagenet-1k"


SMALL = dict(stem="small", width_mult=0.125, in_chans=1, num_classes=10, drop_rate=0.0)

MODELS: dict[str, ModelDef] = {
    "polynet": ModelDef(_ir(5, 10, 5), description="any spec: create_model('polynet', spec=...)"),
    "polynet_very_deep": ModelDef(
        VERY_DEEP_SPEC,
        dict(sharing="released", residual_scale="released"),
        # The released protocol: squash-resize to 378 x 378, centre crop 331.
        _imagenet_cfg(331, crop_pct=331 / 378, crop_mode="squash"),
        "the released Very Deep PolyNet (95.4M params, 331 px)",
    ),
    "polynet_ir_3_6_3": ModelDef(_ir(3, 6, 3), description="IR 3-6-3, the ablation baseline"),
    "polynet_ir_5_10_5": ModelDef(_ir(5, 10, 5), description="IR 5-10-5, Inception-ResNet-v2"),
    "polynet_ir_6_12_6": ModelDef(_ir(6, 12, 6), description="IR 6-12-6, the mixing baseline"),
    "polynet_ir_20_56_20": ModelDef(
        _ir(20, 56, 20), description="IR 20-56-20, the Very Deep Inception-ResNet"
    ),
}
for _stage in "abc":
    for _module in PAPER_MODULES:
        _depths = dict(a="ir x3", b="ir x6", c="ir x3")
        _depths[_stage] = f"{_module} x{dict(a=3, b=6, c=3)[_stage]}"
        MODELS[f"polynet_3_6_3_{_stage}_{module_id(_module)}"] = ModelDef(
            f"A: {_depths['a']} | B: {_depths['b']} | C: {_depths['c']}",
            description=f"IR 3-6-3 with stage {_stage.upper()} made of {_module} (Fig. 6)",
        )
MODELS["polynet_6_12_6_mixed"] = ModelDef(
    "A: ir x6 | B: (3-way -> mpoly-3 -> poly-3) x4 | C: ir x6",
    description="IR 6-12-6 with stage B (3-way -> mpoly-3 -> poly-3) x4 (Fig. 8)",
)
for _module in ("3-way", "mpoly-3", "poly-3"):
    MODELS[f"polynet_6_12_6_{module_id(_module)}"] = ModelDef(
        f"A: ir x6 | B: {_module} x12 | C: ir x6",
        description=f"IR 6-12-6 with stage B uniformly {_module} (Fig. 8)",
    )
MODELS.update(
    polynet_small_ir=ModelDef(
        _ir(1, 2, 1),
        SMALL,
        _small_cfg(),
        "small Inception-ResNet baseline for 28-64 px",
        "fashion-mnist",
    ),
    polynet_small=ModelDef(
        "A: 2-way | B: (mpoly-2, poly-2) | C: 2-way",
        SMALL,
        _small_cfg(),
        "small PolyNet for 28-64 px (the quick start's default)",
        "fashion-mnist",
    ),
)


def list_names(pattern: str = "*") -> list[str]:
    """Registered model names matching a glob pattern, in timm's natural order (2 before 10)."""

    def natural(name: str) -> list[Any]:
        return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]

    return sorted((n for n in MODELS if fnmatch.fnmatchcase(n, pattern)), key=natural)


def check_model_name(name: str) -> None:
    """Raise a ValueError naming close matches and the full list for an unknown model."""
    if name in MODELS:
        return
    close = difflib.get_close_matches(name, MODELS, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UserError(f"unknown model {name!r}; {hint}valid models: {', '.join(MODELS)}")
