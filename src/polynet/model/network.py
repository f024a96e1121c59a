"""The PolyNet model: a stem, three stages of PolyInception units, two reductions and a head.

The network is built from a :class:`~polynet.model.specs.NetworkSpec`, so every variant of the paper
(IR baselines, the 18 ablation configs, the mixed 6-12-6, the Very Deep PolyNet) is data. It
follows timm's model contract: ``forward_features`` / ``forward_head``, ``reset_classifier``,
``get_classifier``, ``feature_info``, ``forward_intermediates`` / ``prune_intermediate_layers``,
``set_grad_checkpointing``, the ``device=`` / ``dtype=`` factory arguments and TorchScript.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import cache, partial
from typing import Any, Literal

import torch
from timm.layers import SelectAdaptivePool2d
from torch import nn

from polynet.errors import UserError
from polynet.model.blocks import (
    REDUCTION_A,
    REDUCTION_B,
    STAGE_BLOCKS,
    ImageNetStem,
    InceptionBlock,
    Mixed,
    SmallStem,
    scaled,
)
from polynet.model.layers import LayerFactory, layer_name, resolve_layers
from polynet.model.modules import PolyInception, Sharing
from polynet.model.regional import Stage
from polynet.model.regional import compile_units as compile_units  # re-exported: its old home
from polynet.model.regional import restored_buffers as restored_buffers
from polynet.model.specs import NetworkSpec

StemKind = Literal["imagenet", "small"]


@dataclass(frozen=True)
class FileLoading:
    """How weights files reach a model: installed by the io layer (:mod:`polynet.io.weights`).

    The model knows no file format. timm hands a weights file to
    :meth:`PolyNet.load_pretrained` (``custom_load``), and ``load_state_dict`` may be given a
    state dict in another layout (timm's ``checkpoint_path=`` loads the released port's file
    that way); both go through what the loading layer installed here.

    Attributes:
        load: Loads a weights file into a model; returns the class names the file records.
        adapt_state_dict: Renames a state dict in another layout to the model's keys, in
            place (``model``, ``state_dict``, ``prefix``).

    """

    load: Callable[[nn.Module, str | os.PathLike], Sequence[str] | None]
    adapt_state_dict: Callable[[nn.Module, dict[str, Any], str], None]


_file_loading: FileLoading | None = None


def install_file_loading(loading: FileLoading) -> None:
    """Install how weights files are read (the io layer calls this when it is imported)."""
    global _file_loading
    _file_loading = loading


def file_loading() -> FileLoading:
    """What :func:`install_file_loading` installed."""
    if _file_loading is None:
        raise RuntimeError("no file loading installed: import polynet.io.weights first")
    return _file_loading


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


def unit_scales(
    residual_scale: float | Sequence[float] | Literal["released"], num_units: int
) -> list[float]:
    """The residual scale of each unit: one for all, one per unit, or the released decay."""
    if residual_scale == "released":
        return released_scales(num_units)
    if isinstance(residual_scale, (int, float)):
        return [float(residual_scale)] * num_units
    scales = [float(s) for s in residual_scale]
    if len(scales) != num_units:
        raise ValueError(f"residual_scale has {len(scales)} values for {num_units} units")
    return scales


def _stages(
    spec: NetworkSpec,
    chs: int,
    width_mult: float,
    small: bool,
    scales: Sequence[float],
    sharing: Sharing,
    norm_layer: LayerFactory,
    act_layer: LayerFactory,
) -> tuple[list[Stage], list[Mixed], list[int]]:
    """Stages A, B, C of units, the reductions between them, and the width of each stage.

    Args:
        spec: The units of each stage.
        chs: Stage A's width (the stem's output).
        width_mult: Multiplier of every width.
        small: Pad the reductions for small inputs.
        scales: Residual scale of every unit, bottom to top.
        sharing: Parameter sharing of repeated letters.
        norm_layer: Norm factory.
        act_layer: Activation factory.

    """
    stages, reductions, widths = [], [], []
    scale = iter(scales)
    for stage_spec, reduction in zip(spec.stages, (REDUCTION_A, REDUCTION_B, None), strict=True):
        block = partial(
            InceptionBlock,
            chs,
            STAGE_BLOCKS[stage_spec.name],
            width_mult,
            norm_layer=norm_layer,
            act_layer=act_layer,
        )
        units = [
            PolyInception(module, block, next(scale), sharing, act_layer=act_layer)
            for module in stage_spec.units
        ]
        stages.append(Stage(*units))
        widths.append(chs)
        if reduction is not None:  # none after stage C
            reductions.append(Mixed(chs, reduction, width_mult, small, norm_layer, act_layer))
            chs = reductions[-1].out_chs
    return stages, reductions, widths


def take_indices(
    indices: int | Sequence[int] | None, names: Sequence[str]
) -> tuple[list[int], int]:
    """The feature maps selected as timm does, as absolute indices, and the largest of them.

    Args:
        indices: None for all feature maps, an int ``n`` for the last ``n``, or a sequence of
            indices (negative ones count from the end).
        names: The feature maps' module names, in order (for the error message).

    Raises:
        UserError: For an index out of range or no index at all, naming the valid ones.

    """
    n = len(names)
    valid = (
        f"the model has {n} feature maps ({', '.join(names)}): give indices 0..{n - 1} or "
        f"-{n}..-1, or an int 1..{n} for the last n"
    )
    if indices is None:
        indices = n
    if isinstance(indices, int):
        if not 0 < indices <= n:
            raise UserError(f"cannot take the last {indices} feature maps; {valid}")
        return list(range(n - indices, n)), n - 1
    take = []
    for i in indices:
        if not -n <= i < n:
            raise UserError(f"feature index {i} is out of range; {valid}")
        take.append(i % n)
    if not take:
        raise UserError(f"no feature index given; {valid}")
    return take, max(take)


@cache
def feature_map_size(
    input_size: tuple[int, int], stem: StemKind = "imagenet", stem_stride: int = 1
) -> tuple[int, int]:
    """Height and width of ``forward_features``' output for an input of ``input_size``.

    This is timm's ``pool_size``. Units keep their input's size, so the stem and the two
    reductions decide it: they are built narrow on the meta device and a meta tensor goes
    through them, so the answer follows their own kernels, strides and paddings.

    Args:
        input_size: Input (height, width).
        stem: ``"imagenet"`` or ``"small"``.
        stem_stride: Stride of the small stem.

    Raises:
        UserError: For an input smaller than the stem takes.

    """
    small, width = stem == "small", 1 / 64
    with torch.device("meta"):
        first = (
            SmallStem(1, scaled(384, width), stride=stem_stride)
            if small
            else ImageNetStem(1, width)
        )
        if min(input_size) < first.min_input_size:
            raise UserError(
                f"a {input_size[0]}x{input_size[1]} input is smaller than the "
                f"{first.min_input_size} px the {stem} stem takes"
            )
        x = first.eval()(torch.empty(1, 1, *input_size))  # eval: a 1x1 map of one image is fine
        for branches in (REDUCTION_A, REDUCTION_B):
            x = Mixed(x.shape[1], branches, width, small).eval()(x)
    return int(x.shape[-2]), int(x.shape[-1])


def describe_classes(
    cfg: MutableMapping[str, Any], num_classes: int, names: Sequence[str] | None = None
) -> None:
    """Keep a ``pretrained_cfg``'s class count and names true to a classifier's outputs.

    Names of a data set with another number of classes are dropped rather than left to
    describe outputs that are not theirs.

    Args:
        cfg: The cfg, updated in place.
        num_classes: The classifier's outputs (0 without one).
        names: The outputs' names, if known (timm's ``label_names``).

    Raises:
        UserError: For names that do not number ``num_classes``.

    """
    if names is not None and len(names) != num_classes:
        raise UserError(f"{len(names)} class names given for a {num_classes}-class classifier")
    cfg["num_classes"] = num_classes
    if names is not None:
        cfg["label_names"] = tuple(names)
        cfg.pop("label_descriptions", None)  # the names now come from elsewhere
    elif len(cfg.get("label_names") or ()) != num_classes:
        cfg.pop("label_names", None)
        cfg.pop("label_descriptions", None)


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
    num_stages: int = 3

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
        spec: The stage layout, as text (see :mod:`polynet.model.specs`) or a ``NetworkSpec``.
        num_classes: Classifier outputs; 0 for no classifier (features only).
        in_chans: Input channels.
        width_mult: Multiplier for every width (1.0 is the released model).
        stem: ``"imagenet"`` for the Inception-ResNet-v2 stem (inputs from 75 px), ``"small"``
            for two 3x3 convs and padded reductions (28-64 px inputs).
        stem_stride: Stride of the small stem (2 halves stage A's resolution).
        sharing: Parameter sharing of repeated letters (``"full"``, ``"released"`` or
            ``"norms"``; see :class:`~polynet.model.modules.PolyInception`).
        residual_scale: The paper's beta for every unit, a per-unit sequence, or
            ``"released"`` for the released model's linear 1.0 -> 0.7 decay.
        drop_rate: Dropout before the classifier.
        path_drop_rate: Stochastic-path drop probability at the last unit (0 at the first).
        global_pool: timm pool type (``"avg"``, ``"max"``, ``"avgmax"``, ...).
        norm_layer: Norm factory or name.
        act_layer: Activation factory or name.
        num_stages: Stages kept (3: the whole network); fewer after
            :meth:`prune_intermediate_layers`, which drops the later stages, the reductions
            before them and the head.
        device: Where parameters and buffers are created (``"meta"``: the structure and
            shapes without memory). Not part of the config.
        dtype: Floating-point type of parameters and buffers (e.g. ``torch.bfloat16``). Not
            part of the config.

    Attributes:
        config: The :class:`PolyNetConfig` this model is, kept up to date by
            :meth:`reset_classifier`, :meth:`set_path_drop` and
            :meth:`prune_intermediate_layers`; ``PolyNet(**config.to_dict())`` rebuilds the
            architecture (layers given as classes are recorded by their import path and must be
            given again). ``num_classes``, ``in_chans``, ``drop_rate``, ``path_drop_rate``,
            ``num_features`` and ``head_hidden_size`` are derived from it (:meth:`_derive`).

    """

    # Eager-only views; TorchScript would otherwise compile every property.
    __jit_unused_properties__ = ["units", "grad_checkpointing"]

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
        num_stages: int = 3,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec if isinstance(spec, NetworkSpec) else NetworkSpec.parse(spec)
        _check_arguments(width_mult, in_chans, stem, stem_stride, drop_rate, dtype)
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
        scales = unit_scales(residual_scale, len(self.spec.units))

        small = stem == "small"
        with _factory_device(device):  # parameters are created where they will live
            if small:
                self.stem: nn.Module = SmallStem(
                    in_chans, scaled(384, width_mult), **layers, stride=stem_stride
                )
            else:
                self.stem = ImageNetStem(in_chans, width_mult, **layers)
            self.min_input_size = self.stem.min_input_size
            stages, reductions, widths = _stages(
                self.spec, self.stem.out_chs, width_mult, small, scales, sharing, **layers
            )
            # Registration order is forward order: timm's feature extraction walks the children.
            self.stage_a, self.reduction_a, self.stage_b, self.reduction_b, self.stage_c = (
                stages[0],
                reductions[0],
                stages[1],
                reductions[1],
                stages[2],
            )
            chs = widths[-1]
            stem_reduction = stem_stride if small else 8
            self.feature_info = [
                dict(num_chs=c, reduction=stem_reduction * 2**i, module=f"stage_{name}")
                for i, (name, c) in enumerate(zip("abc", widths, strict=True))
            ]
            self.global_pool, last_linear = _classifier(chs, num_classes, global_pool)
            self.head_drop = nn.Dropout(drop_rate)
            self.last_linear = last_linear
        if dtype is not None:
            self.to(dtype=dtype)
        self.set_path_drop(path_drop_rate)
        if not 1 <= num_stages <= len(self.feature_info):
            raise ValueError(f"num_stages must be 1 to 3, got {num_stages}")
        if num_stages < len(self.feature_info):
            self.prune_intermediate_layers(list(range(num_stages)))

    def _derive(self) -> None:
        """Set the attributes timm and TorchScript read from :attr:`config` (the one source)."""
        config = self.config
        self.num_classes = config.num_classes
        self.in_chans = config.in_chans
        self.drop_rate = config.drop_rate
        self.path_drop_rate = config.path_drop_rate
        self.num_features = self.feature_info[config.num_stages - 1]["num_chs"]
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

    def _reconfigure(self, **changes: Any) -> None:
        self.config = dataclasses.replace(self.config, **changes)
        self._derive()

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
        self._reconfigure(path_drop_rate=rate)

    @property
    def grad_checkpointing(self) -> bool:
        """Whether each unit is recomputed in the backward pass (:meth:`set_grad_checkpointing`)."""
        return self.stage_a.grad_checkpointing

    @grad_checkpointing.setter
    def grad_checkpointing(self, enable: bool) -> None:
        for stage in (self.stage_a, self.stage_b, self.stage_c):
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each unit's activations in the backward pass instead of storing them."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for timm's layer-wise learning-rate decay."""
        if coarse:  # stage A, reduction A, ..., stage C
            blocks = [(rf"^{part}", (i,)) for i, part in enumerate(PARTS[1:-1])]
        else:
            blocks = [(r"^stage_(\w)\.(\d+)", None), (r"^reduction_(\w)", None)]
        return dict(stem=r"^stem", blocks=blocks)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The final linear layer."""
        return self.last_linear

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (and optionally the pooling) for a new number of classes.

        The ``pretrained_cfg`` follows: its ``num_classes``, and class names only where they
        still number the outputs.
        """
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        like = next(self.stem.parameters())  # the new classifier lives where the model does
        self.global_pool, self.last_linear = _classifier(
            self.num_features, num_classes, global_pool, like.device, like.dtype
        )
        self._reconfigure(num_classes=num_classes, global_pool=global_pool)
        if isinstance(getattr(self, "pretrained_cfg", None), dict):
            describe_classes(self.pretrained_cfg, num_classes)

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
        if not torch.jit.is_scripting():  # TorchScript compiles no branch under this test
            if not (torch.jit.is_tracing() or _fx_tracing()):
                self.check_input(x)
        x = self.stem(x)  # (N, 384, 39, 39) at 331 px
        x = self.stage_a(x)
        x = self.reduction_a(x)  # (N, 1152, 19, 19)
        x = self.stage_b(x)
        x = self.reduction_b(x)  # (N, 2048, 9, 9)
        return self.stage_c(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The final features and the stage outputs asked for (timm's feature API).

        Args:
            x: A batch of images (N, in_chans, H, W).
            indices: Stages to return (0: A, 1: B, 2: C; see :func:`take_indices`); all three
                by default.
            norm: For timm's API; PolyNet has no final norm.
            stop_early: Stop after the last stage asked for (then the features returned).
            output_fmt: ``"NCHW"``, the only layout.
            intermediates_only: Return the stage outputs alone.

        Returns:
            ``(forward_features output, [stage outputs])``, or the list alone.

        Raises:
            UserError: For an index out of range or another output format.

        """
        if output_fmt != "NCHW":
            raise UserError(f"output_fmt must be 'NCHW', the stages' layout; got {output_fmt!r}")
        take, last = take_indices(indices, [info["module"] for info in self.feature_info])
        if not (torch.jit.is_tracing() or _fx_tracing()):
            self.check_input(x)
        stages = (self.stage_a, self.stage_b, self.stage_c)
        reductions = (self.reduction_a, self.reduction_b)
        intermediates = []
        x = self.stem(x)
        for i, stage in enumerate(stages):
            x = stage(x)  # checkpointed unit by unit as in forward_features, if switched on
            if i in take:
                intermediates.append(x)
            if i == len(reductions) or (stop_early and i == last):
                break
            x = reductions[i](x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(
        self,
        indices: int | Sequence[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the stages after the last one asked for, and the head (timm's feature API).

        ``config`` follows (``num_stages``, and ``num_classes=0`` without the head), so it
        describes the pruned network and rebuilds it.

        Args:
            indices: Stages still to be taken (as for :meth:`forward_intermediates`).
            prune_norm: For timm's API; PolyNet has no final norm.
            prune_head: Drop pooling and classifier even when stage C stays.

        Returns:
            The stages' absolute indices, for :meth:`forward_intermediates`.

        """
        take, last = take_indices(indices, [info["module"] for info in self.feature_info])
        for name in ("reduction_a", "stage_b", "reduction_b", "stage_c")[2 * last :]:
            setattr(self, name, Stage() if name.startswith("stage") else nn.Identity())
        if last + 1 < self.config.num_stages:  # the head was sized for the last stage's width
            self._reconfigure(num_stages=last + 1)
            prune_head = True
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, dropout and classify; ``pre_logits`` stops before the classifier."""
        x = self.global_pool(x)  # (N, num_features); the released 9x9 pool at 331 px
        x = self.head_drop(x)
        return x if pre_logits else self.last_linear(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images: (N, in_chans, H, W) -> (N, num_classes)."""
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str | os.PathLike) -> None:
        """Load a weights file through the loading layer, once; take its class names.

        timm's ``pretrained=True`` calls this for a file (the cfgs set ``custom_load``), and
        so does ``create_model(checkpoint_path=)``. The names the file records describe the
        classifier where they number its outputs.
        """
        names = file_loading().load(self, checkpoint_path)
        if names and len(names) == self.num_classes:
            describe_classes(self.pretrained_cfg, self.num_classes, names)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args) -> None:
        if _file_loading is not None:
            _file_loading.adapt_state_dict(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args)


def _check_arguments(
    width_mult: float,
    in_chans: int,
    stem: str,
    stem_stride: int,
    drop_rate: float,
    dtype: torch.dtype | None,
) -> None:
    """Raise a ValueError naming the first of PolyNet's arguments that cannot be built."""
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
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise UserError(
            f"dtype must be a floating-point torch.dtype such as torch.bfloat16, got {dtype!r}"
        )


def _classifier(
    chs: int,
    num_classes: int,
    global_pool: str,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[SelectAdaptivePool2d, nn.Module]:
    """Pooling and classifier as timm builds them.

    The pool flattens unless it is ``""`` (no pooling: the feature map passes through), and
    the classifier takes as many features as it gives (twice ``chs`` for ``"catavgmax"``).
    """
    pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
    if num_classes <= 0:
        return pool, nn.Identity()
    if not global_pool:
        raise UserError(
            f"global_pool='' passes the feature map through unpooled, which a {num_classes}-class "
            "classifier cannot take; give a pool type such as 'avg', or num_classes=0"
        )
    return pool, nn.Linear(chs * pool.feat_mult(), num_classes, device=device, dtype=dtype)


def _factory_device(device: torch.device | str | None) -> AbstractContextManager:
    if device is None:
        return nullcontext()
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise UserError(
            f"device {device!r} is not a torch device; use e.g. 'cpu', 'cuda' or 'meta'"
        ) from err


def _fx_tracing() -> bool:
    return torch.fx._symbolic_trace.is_fx_symbolic_tracing()
