"""The PolyNet model: a stem, three stages of PolyInception units, two reductions and a head.

The network is built from a :class:`~polynet.specs.NetworkSpec`, so every variant of the paper
(IR baselines, the 18 ablation configs, the mixed 6-12-6, the Very Deep PolyNet) is data. It
follows timm's model contract: ``forward_features`` / ``forward_head``, ``reset_classifier``,
``get_classifier``, ``feature_info`` and ``set_grad_checkpointing``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from timm.layers import SelectAdaptivePool2d
from torch import nn
from torch.utils.checkpoint import checkpoint

from polynet.blocks import (
    REDUCTION_A,
    REDUCTION_B,
    STAGE_BLOCKS,
    ImageNetStem,
    InceptionBlock,
    Mixed,
    SmallStem,
    scaled,
)
from polynet.layers import LayerFactory, layer_name, resolve_layers
from polynet.modules import PolyInception, Sharing
from polynet.specs import NetworkSpec

StemKind = Literal["imagenet", "small"]
# The model's top-level parts in forward order (state-dict prefixes).
PARTS = ("stem", "stage_a", "reduction_a", "stage_b", "reduction_b", "stage_c", "last_linear")


def released_scales(num_units: int) -> list[float]:
    """Per-unit residual scales of the released model: 1.0 decaying linearly to 0.7.

    For the 40 units of the Very Deep PolyNet this is ``round(1 - 0.3 * i / 39, 6)``.
    """
    if num_units == 1:
        return [1.0]
    return [round(1 - 0.3 * i / (num_units - 1), 6) for i in range(num_units)]


def linear_rates(num_units: int, last: float) -> list[float]:
    """Rates rising linearly from 0 at the first unit to ``last`` at the last one."""
    if num_units == 1:
        return [last]
    return [last * i / (num_units - 1) for i in range(num_units)]


@dataclass(frozen=True)
class PolyNetConfig:
    """Everything that defines a PolyNet's architecture, as JSON-able data.

    A model keeps the config it was built from (``model.config``); checkpoints and safetensors
    metadata store it, and every loader rebuilds the model from it, so nothing about a model
    is ever guessed back from its modules. The fields are :class:`PolyNet`'s arguments.
    """

    spec: str
    num_classes: int = 1000
    in_chans: int = 3
    width_mult: float = 1.0
    stem: StemKind = "imagenet"
    stem_stride: int = 1
    sharing: Sharing = "full"
    residual_scale: float | tuple[float, ...] | Literal["released"] = 0.3
    drop_rate: float = 0.2
    path_drop_rate: float = 0.0
    global_pool: str = "avg"
    norm_layer: str | None = None
    act_layer: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-able values (tuples become lists)."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PolyNetConfig:
        """Rebuild a config from :meth:`to_dict` output.

        Raises:
            ValueError: For a key that is not a PolyNet argument, naming the valid ones.

        """
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(
                f"unknown PolyNet argument(s) {', '.join(unknown)}; valid: {', '.join(names)}"
            )
        values = dict(values)
        if isinstance(values.get("residual_scale"), list):
            values["residual_scale"] = tuple(values["residual_scale"])
        return cls(**values)


class PolyNet(nn.Module):
    """A PolyNet (or Inception-ResNet) built from a network spec.

    Args:
        spec: The stage layout, as text (see :mod:`polynet.specs`) or a ``NetworkSpec``.
        num_classes: Classifier outputs; 0 for no classifier (features only).
        in_chans: Input channels.
        width_mult: Multiplier for every width (1.0 is the released model).
        stem: ``"imagenet"`` for the Inception-ResNet-v2 stem (inputs from 75 px), ``"small"``
            for two 3x3 convs and padded reductions (28-64 px inputs).
        stem_stride: Stride of the small stem (2 halves stage A's resolution).
        sharing: Parameter sharing of repeated letters (``"full"``, ``"released"`` or
            ``"norms"``; see :class:`~polynet.modules.PolyInception`).
        residual_scale: The paper's beta for every unit, a per-unit sequence, or
            ``"released"`` for the released model's linear 1.0 -> 0.7 decay.
        drop_rate: Dropout before the classifier.
        path_drop_rate: Stochastic-path drop probability at the last unit (0 at the first).
        global_pool: timm pool type (``"avg"``, ``"max"``, ``"avgmax"``, ...).
        norm_layer: Norm factory or name.
        act_layer: Activation factory or name.

    Attributes:
        config: The :class:`PolyNetConfig` this model was built from, kept up to date by
            :meth:`reset_classifier` and :meth:`set_path_drop`; ``PolyNet(**config.to_dict())``
            rebuilds the architecture (layers given as classes are recorded by their import
            path and must be given again).

    """

    def __init__(
        self,
        spec: str | NetworkSpec,
        num_classes: int = 1000,
        in_chans: int = 3,
        width_mult: float = 1.0,
        stem: StemKind = "imagenet",
        stem_stride: int = 1,
        sharing: Sharing = "full",
        residual_scale: float | Sequence[float] | Literal["released"] = 0.3,
        drop_rate: float = 0.2,
        path_drop_rate: float = 0.0,
        global_pool: str = "avg",
        norm_layer: LayerFactory | None = None,
        act_layer: LayerFactory | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec if isinstance(spec, NetworkSpec) else NetworkSpec.parse(spec)
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        if in_chans < 1:
            raise ValueError(f"in_chans must be at least 1, got {in_chans}")
        if stem not in ("imagenet", "small"):
            raise ValueError(f"stem must be 'imagenet' or 'small', got {stem!r}")
        if stem_stride != 1 and stem != "small":
            raise ValueError(f"stem_stride applies to the small stem only, got stem={stem!r}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        self.config = PolyNetConfig(
            spec=str(self.spec),
            num_classes=num_classes,
            in_chans=in_chans,
            width_mult=float(width_mult),
            stem=stem,
            stem_stride=stem_stride,
            sharing=sharing,
            residual_scale=residual_scale
            if isinstance(residual_scale, (str, int, float))
            else tuple(float(v) for v in residual_scale),
            drop_rate=drop_rate,
            path_drop_rate=path_drop_rate,
            global_pool=global_pool,
            norm_layer=layer_name(norm_layer),
            act_layer=layer_name(act_layer),
        )
        norm_layer, act_layer = resolve_layers(norm_layer, act_layer)
        layers = dict(norm_layer=norm_layer, act_layer=act_layer)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        scales = self._unit_scales(residual_scale)

        small = stem == "small"
        if small:
            self.stem: nn.Module = SmallStem(
                in_chans, scaled(384, width_mult), **layers, stride=stem_stride
            )
        else:
            self.stem = ImageNetStem(in_chans, width_mult, **layers)
        self.min_input_size = self.stem.min_input_size
        chs = self.stem.out_chs
        stages, reductions, widths = [], [], []
        unit = 0
        stage_reductions = (REDUCTION_A, REDUCTION_B, None)  # none after stage C
        for stage_spec, reduction in zip(self.spec.stages, stage_reductions, strict=True):
            block = partial(
                InceptionBlock, chs, STAGE_BLOCKS[stage_spec.name], width_mult, **layers
            )
            units = []
            for module in stage_spec.units:
                units.append(
                    PolyInception(module, block, scales[unit], sharing, act_layer=act_layer)
                )
                unit += 1
            stages.append(nn.Sequential(*units))
            widths.append(chs)
            if reduction is not None:
                reductions.append(Mixed(chs, reduction, width_mult, small, **layers))
                chs = reductions[-1].out_chs
        # Registration order is forward order: timm's feature extraction walks the children.
        self.stage_a, self.reduction_a, self.stage_b, self.reduction_b, self.stage_c = (
            stages[0],
            reductions[0],
            stages[1],
            reductions[1],
            stages[2],
        )
        self.num_features = self.head_hidden_size = chs

        stem_reduction = stem_stride if small else 8
        self.feature_info = [
            dict(num_chs=c, reduction=stem_reduction * 2**i, module=f"stage_{name}")
            for i, (name, c) in enumerate(zip("abc", widths, strict=True))
        ]
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.head_drop = nn.Dropout(drop_rate)
        self.last_linear = nn.Linear(chs, num_classes) if num_classes > 0 else nn.Identity()
        self.set_path_drop(path_drop_rate)

    def _unit_scales(
        self, residual_scale: float | Sequence[float] | Literal["released"]
    ) -> list[float]:
        n = len(self.spec.units)
        if residual_scale == "released":
            return released_scales(n)
        if isinstance(residual_scale, (int, float)):
            return [float(residual_scale)] * n
        scales = [float(s) for s in residual_scale]
        if len(scales) != n:
            raise ValueError(f"residual_scale has {len(scales)} values for {n} units")
        return scales

    @property
    def units(self) -> list[PolyInception]:
        """All PolyInception units, bottom to top."""
        return [u for stage in (self.stage_a, self.stage_b, self.stage_c) for u in stage]

    def set_path_drop(self, rate: float) -> None:
        """Stochastic paths: drop probability rising linearly from 0 (first unit) to ``rate``.

        Args:
            rate: Drop probability of every non-identity path of the last unit, in [0, 1).

        """
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"path drop rate must be in [0, 1), got {rate}")
        units = self.units
        for unit, p in zip(units, linear_rates(len(units), rate), strict=True):
            unit.drop_prob = p
        self.path_drop_rate = rate
        self.config = dataclasses.replace(self.config, path_drop_rate=rate)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each unit's activations in the backward pass instead of storing them."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for timm's layer-wise learning-rate decay."""
        return dict(
            stem=r"^stem",
            blocks=[
                (r"^stage_a", (0,)),
                (r"^reduction_a", (1,)),
                (r"^stage_b", (2,)),
                (r"^reduction_b", (3,)),
                (r"^stage_c", (4,)),
            ]
            if coarse
            else [(r"^stage_(\w)\.(\d+)", None), (r"^reduction_(\w)", None)],
        )

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The final linear layer."""
        return self.last_linear

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (and optionally the pooling) for a new number of classes."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.config = dataclasses.replace(
            self.config, num_classes=num_classes, global_pool=self.global_pool.pool_type
        )
        self.last_linear = (
            nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        )

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a clear ValueError for an input this model cannot take."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected a batch of shape (N, {self.in_chans}, H, W), got {tuple(x.shape)}; "
                f"build the model with in_chans={x.shape[1] if x.ndim == 4 else '...'} "
                "or convert the images"
            )
        if min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(
                f"input {x.shape[-2]}x{x.shape[-1]} is smaller than the "
                f"{self.min_input_size}x{self.min_input_size} this model needs; resize the "
                "images up or use a model with the small stem"
            )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and the three stages: (N, C, H, W) -> (N, num_features, H/32, W/32)."""
        if not (torch.jit.is_scripting() or torch.jit.is_tracing() or _fx_tracing()):
            self.check_input(x)
        x = self.stem(x)  # (N, 384, 39, 39) at 331 px
        x = self._stage(self.stage_a, x)
        x = self.reduction_a(x)  # (N, 1152, 19, 19)
        x = self._stage(self.stage_b, x)
        x = self.reduction_b(x)  # (N, 2048, 9, 9)
        return self._stage(self.stage_c, x)

    def _stage(self, stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if not (self.grad_checkpointing and torch.is_grad_enabled()) or torch.jit.is_scripting():
            return stage(x)
        for unit in stage:  # one segment per unit: only unit inputs stay stored
            x = checkpoint(
                unit, x, use_reentrant=False, context_fn=partial(_recompute_contexts, unit)
            )
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, dropout and classify; ``pre_logits`` stops before the classifier."""
        x = self.global_pool(x)  # (N, num_features); the released 9x9 pool at 331 px
        x = self.head_drop(x)
        return x if pre_logits else self.last_linear(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images: (N, in_chans, H, W) -> (N, num_classes)."""
        return self.forward_head(self.forward_features(x))


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
    # Each unit kind (and each distinct drop probability) is one recompilation of the same
    # forward; let them all be cached rather than fall back to eager after the default few.
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, len(regions))
    compile_kwargs.setdefault("dynamic", False)
    for region in regions:
        region.compile(**compile_kwargs)
    return model


def _fx_tracing() -> bool:
    return torch.fx._symbolic_trace.is_fx_symbolic_tracing()
