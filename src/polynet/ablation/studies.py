"""The paper's ablation studies as data: which networks each study trains and how they are built.

A study is a list of :class:`StudyConfig` rows. Every row names a model the training API can
build (``model`` plus ``model_kwargs``), so one recipe trains all of them. Two scales exist:

- ``"small"``: the registry's specs built as the small-image variant (``polynet_small``'s stem,
  1 x 28 x 28 input, 10 classes) at a reduced width, for Fashion-MNIST on a CPU.
- ``"full"``: the registered full-width models (IR 3-6-3, ..., 299 px), for ImageNet-layout
  folders on GPUs.

The ResNet baselines of ``depth`` and ``scaling`` are timm's pre-activation ResNet
(:class:`timm.models.resnetv2.ResNetV2` with ``preact=True``, the "identity mappings" ResNet of
the paper's Fig. 2) with BatchNorm instead of BiT's GroupNorm + weight standardisation, any unit
counts, a width multiplier and, at the small scale, a stride-1 3 x 3 stem for 28 px inputs.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from timm.layers import BatchNormAct2d, DropPath, create_conv2d
from timm.models.resnetv2 import ResNetV2
from torch import nn

from polynet.model.algebra import PAPER_MODULES, module_id, parse
from polynet.model.modules import resolve_expression
from polynet.model.registry import MODELS, VERY_DEEP_SPEC
from polynet.model.specs import NetworkSpec
from polynet.model.zoo import create_model

SCALES = ("small", "full")
# Width of the small-image variant: IR 3-6-3 at 1/16 width has 85K parameters and trains at
# about 0.4 CPU-seconds per batch of 64 on 28 px (see docs/ablation.md).
SMALL_WIDTH = 0.0625
# Stride of the small stem at the small scale: stage A at 14 x 14, as in the quick start. On
# two CPU cores that makes a 3-seed study of 28 px networks fit in hours while the networks
# still reach 90 %+ on Fashion-MNIST (docs/ablation.md, "Scale").
SMALL_STEM_STRIDE = 2

RESNET_MODEL = "preact_resnet"
# Bottleneck units per stage. 50/101/152/200 are the published layouts; 269 is the paper's own
# (Sec. 5, [3, 30, 48, 8]); ResNet-500 is not published, we use 166 units (3 * 166 + 2 = 500
# layers) in roughly ResNet-269's proportions.
RESNET_LAYERS: dict[int, tuple[int, int, int, int]] = {
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
    269: (3, 30, 48, 8),
    500: (6, 56, 90, 14),
}


class PreActResNet(ResNetV2):
    """timm's pre-activation ResNet with the hooks the training loop expects.

    Adds ``in_chans``, ``pretrained_cfg`` (the study's input preprocessing) and
    ``set_path_drop`` / ``path_drop_rate`` (stochastic depth rising linearly over the units,
    as for PolyNet), and optionally a stride-1 3 x 3 stem without pooling for 28 px inputs.

    Args:
        layers: Bottleneck (or basic) units in each of the four stages.
        width_mult: Multiplier of every width (1.0: 64-channel stem, 256..2048 outputs).
        stem: ``"imagenet"`` (7 x 7 stride 2 conv and max pool) or ``"small"``.
        stem_stride: Stride of the small stem's 3 x 3 convolution.
        bottleneck: Bottleneck units (ResNet-50 and deeper) or basic units.
        in_chans: Input channels.
        num_classes: Classifier outputs.
        pretrained_cfg: Input preprocessing (size, mean, std, crop) recorded on the model.

    """

    def __init__(
        self,
        layers: Sequence[int],
        width_mult: float = 1.0,
        stem: str = "imagenet",
        stem_stride: int = 1,
        bottleneck: bool = True,
        in_chans: int = 3,
        num_classes: int = 1000,
        pretrained_cfg: dict[str, Any] | None = None,
    ) -> None:
        if stem not in ("imagenet", "small"):
            raise ValueError(f"stem must be 'imagenet' or 'small', got {stem!r}")
        base = (256, 512, 1024, 2048) if bottleneck else (64, 128, 256, 512)
        # Bottlenecks are a quarter of the output width; keep them at least 4 channels.
        channels = tuple(max(16, round(c * width_mult)) for c in base)
        stem_chs = max(8, round(64 * width_mult))
        conv_layer = partial(create_conv2d, bias=False)
        super().__init__(
            list(layers),
            channels=channels,
            num_classes=num_classes,
            in_chans=in_chans,
            stem_chs=stem_chs,
            preact=True,
            basic=not bottleneck,
            norm_layer=BatchNormAct2d,
            conv_layer=conv_layer,
        )
        if stem == "small":
            stem_conv = conv_layer(in_chans, stem_chs, 3, stride=stem_stride)
            self.stem = nn.Sequential(OrderedDict(conv=stem_conv))
        self.in_chans = in_chans
        self.pretrained_cfg = dict(pretrained_cfg or MODELS["polynet_ir_3_6_3"].cfg)
        self.pretrained_cfg["num_classes"] = num_classes
        self.path_drop_rate = 0.0

    @property
    def units(self) -> list[nn.Module]:
        """The residual units, input to output."""
        return [block for stage in self.stages for block in stage.blocks]

    def set_path_drop(self, rate: float) -> None:
        """Drop unit ``i`` of ``n`` with probability ``rate * i / (n - 1)`` in training."""
        units = self.units
        for i, unit in enumerate(units):
            p = rate * i / max(len(units) - 1, 1)
            unit.drop_path = DropPath(p) if p > 0 else nn.Identity()
        self.path_drop_rate = rate


def create_study_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a study's model: :data:`RESNET_MODEL` or any registered PolyNet name."""
    if name == RESNET_MODEL:
        return PreActResNet(**kwargs)
    return create_model(name, **kwargs)


@dataclass(frozen=True)
class StudyConfig:
    """One network of a study.

    Attributes:
        name: Unique id within the study (file names, tables, ``--configs``).
        label: Short label for plots (e.g. ``mpoly-3``).
        family: ``"ir"``, ``"polynet"`` or ``"resnet"``.
        model: Name for :func:`create_study_model` / the training API.
        model_kwargs: Constructor arguments (JSON-able).
        group: The panel it belongs to (stage ``"A"``, ``"B"``, ``"C"`` in ``stages``).
        units: Residual units / PolyInception modules (the depth axis).
        baseline: Whether it is the study's baseline.

    """

    name: str
    label: str
    family: str
    model: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    group: str = ""
    units: int = 0
    baseline: bool = False


@dataclass(frozen=True)
class Study:
    """A named study: its configs and which figure of the paper it mirrors."""

    name: str
    title: str
    figure: str
    configs: tuple[StudyConfig, ...]

    def select(self, names: Sequence[str] | None) -> Study:
        """Restrict the study to ``names`` (kept in study order); None keeps every config."""
        if not names:
            return self
        known = {c.name for c in self.configs}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(
                f"unknown config(s) {', '.join(unknown)} in study {self.name!r}; valid: "
                f"{', '.join(c.name for c in self.configs)}"
            )
        chosen = tuple(c for c in self.configs if c.name in set(names))
        return Study(self.name, self.title, self.figure, chosen)


def repeats_a_block(spec: str) -> bool:
    """Whether some unit of ``spec`` applies one block more than once on a path (poly-k)."""
    units = NetworkSpec.parse(spec).units
    polynomials = (parse(resolve_expression(module)) for _, module in units)
    return any(p.num_orders(letter) > 1 for p in polynomials for letter in p.letters)


def _polynet(
    name: str, label: str, registry_name: str | None, spec: str | None, scale: str, **row: Any
) -> StudyConfig:
    """Build a PolyNet/IR row: the registered model at full scale, its spec when small.

    Units that apply a block twice on one path (poly-2, poly-3) share every weight of ``F``
    between its powers, as in the paper, but keep a BatchNorm per power (``sharing="norms"``):
    with one shared BatchNorm the running statistics average the distributions of ``x`` and
    ``F(x)``, and evaluation collapses (measured at the small scale: poly-2 in stage A 70.1 %
    top-1 against 79.6 % for 2-way, at equal training loss). Parameters grow by the norms only.
    """
    definition = MODELS[registry_name] if registry_name else None
    spec = spec or definition.spec  # type: ignore[union-attr]
    family = "ir" if spec.replace(" ", "").count("irx") == 3 else "polynet"
    kwargs: dict[str, Any] = {}
    if definition is not None:
        kwargs.update(
            {k: v for k, v in definition.kwargs.items() if k in ("sharing", "residual_scale")}
        )
    if repeats_a_block(spec):
        kwargs.setdefault("sharing", "norms")
    if scale == "small":
        kwargs.update(spec=spec, width_mult=row.pop("width_mult"), stem_stride=SMALL_STEM_STRIDE)
        return StudyConfig(name, label, family, "polynet_small", kwargs, **row)
    width = row.pop("width_mult")
    if width != 1.0:  # full-size inputs at a reduced width (a cheaper ImageNet study)
        kwargs["width_mult"] = width
    if registry_name is None:
        return StudyConfig(name, label, family, "polynet", dict(spec=spec, **kwargs), **row)
    return StudyConfig(name, label, family, registry_name, kwargs, **row)


def _resnet(depth: int, scale: str, width_mult: float) -> StudyConfig:
    layers = RESNET_LAYERS[depth]
    cfg_source = "polynet_small" if scale == "small" else "polynet_ir_3_6_3"
    cfg = {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in MODELS[cfg_source].cfg.items()
        if isinstance(v, (str, int, float, tuple, list))
    }
    kwargs: dict[str, Any] = dict(
        layers=list(layers),
        width_mult=width_mult,
        stem="small" if scale == "small" else "imagenet",
        pretrained_cfg=cfg,
    )
    if scale == "small":
        kwargs.update(in_chans=1, stem_stride=SMALL_STEM_STRIDE)
    return StudyConfig(
        f"resnet_{depth}", f"ResNet-{depth}", "resnet", RESNET_MODEL, kwargs, units=sum(layers)
    )


def _stages_configs(scale: str, row: dict[str, Any]) -> list[StudyConfig]:
    """IR 3-6-3 and each of the six paper modules in stage A, B or C (Fig. 6)."""
    configs = [_polynet("ir_3_6_3", "IR 3-6-3", "polynet_ir_3_6_3", None, scale, units=12,
                        baseline=True, **row)]  # fmt: skip
    for stage in "abc":
        for module in PAPER_MODULES:
            name = f"{stage}_{module_id(module)}"
            configs.append(
                _polynet(
                    name,
                    module,
                    f"polynet_3_6_3_{name}",
                    None,
                    scale,
                    group=stage.upper(),
                    units=12,
                    **row,
                )  # fmt: skip
            )
    return configs


def _mixing_configs(scale: str, row: dict[str, Any]) -> list[StudyConfig]:
    """IR 6-12-6, stage B made of one module throughout, and the mixed stage B (Fig. 8)."""
    configs = [_polynet("ir_6_12_6", "IR 6-12-6", "polynet_ir_6_12_6", None, scale, units=24,
                        baseline=True, **row)]  # fmt: skip
    for module in ("poly-3", "mpoly-3", "3-way"):
        name = module_id(module)
        configs.append(
            _polynet(
                name,
                module,
                f"polynet_6_12_6_{name}",
                None,
                scale,
                group="uniform",
                units=24,
                **row,
            )  # fmt: skip
        )
    configs.append(_polynet("mixed", "mixed", "polynet_6_12_6_mixed", None, scale,
                            group="mixed", units=24, **row))  # fmt: skip
    return configs


def _depth_configs(scale: str, row: dict[str, Any]) -> list[StudyConfig]:
    """Residual networks of growing depth (Fig. 2)."""
    return [_resnet(depth, scale, row["width_mult"]) for depth in RESNET_LAYERS]


def _scaling_configs(scale: str, row: dict[str, Any]) -> list[StudyConfig]:
    """ResNets, IR networks and PolyNets on one cost axis (Sec. 5, Fig. 11)."""
    configs = [_resnet(depth, scale, row["width_mult"]) for depth in (152, 269, 500)]
    for a, b, c in ((3, 6, 3), (5, 10, 5), (6, 12, 6), (20, 56, 20)):
        configs.append(_polynet(f"ir_{a}_{b}_{c}", f"IR {a}-{b}-{c}", f"polynet_ir_{a}_{b}_{c}",
                                None, scale, units=a + b + c, **row))  # fmt: skip
    configs += [
        _polynet("polynet_3_6_3_2way", "PolyNet 3-6-3 2-way", None,
                 "A: 2-way x3 | B: 2-way x6 | C: 2-way x3", scale, units=12, **row),
        _polynet("polynet_6_12_6_mixed", "PolyNet 6-12-6 mixed", "polynet_6_12_6_mixed", None,
                 scale, units=24, **row),
        _polynet("polynet_very_deep", "Very Deep PolyNet", "polynet_very_deep", VERY_DEEP_SPEC,
                 scale, units=40, **row),
    ]  # fmt: skip
    return configs


# Each study: its title, the paper's figure, and its configs at a scale and width.
_STUDY_TABLE: dict[str, tuple[str, str, Callable[[str, dict[str, Any]], list[StudyConfig]]]] = {
    "stages": ("PolyInception in one stage of IR 3-6-3 (Sec. 3.2)", "Fig. 6", _stages_configs),
    "mixing": (
        "Mixing PolyInception designs in stage B of IR 6-12-6 (Sec. 3.3)",
        "Fig. 8",
        _mixing_configs,
    ),
    "depth": ("Residual networks of growing depth (Fig. 2)", "Fig. 2", _depth_configs),
    "scaling": ("ResNet, IR and PolyNet of growing size (Sec. 5)", "Fig. 11", _scaling_configs),
}


def build_study(name: str, scale: str = "small", width_mult: float | None = None) -> Study:
    """Build a named study.

    Args:
        name: One of :data:`STUDIES`.
        scale: ``"small"`` (28 px, reduced width) or ``"full"`` (registered full-width models).
        width_mult: Width multiplier (default: :data:`SMALL_WIDTH` for the small variant, 1.0,
            the registered widths, at full scale).

    Raises:
        ValueError: For an unknown study or scale.

    """
    if name not in _STUDY_TABLE:
        raise ValueError(f"unknown study {name!r}; choose from {', '.join(STUDIES)}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose from {', '.join(SCALES)}")
    if width_mult is None:
        width_mult = SMALL_WIDTH if scale == "small" else 1.0
    title, figure, configs = _STUDY_TABLE[name]
    return Study(name, title, figure, tuple(configs(scale, dict(width_mult=width_mult))))


STUDIES = tuple(_STUDY_TABLE)
