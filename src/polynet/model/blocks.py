"""Inception-ResNet-v2 building blocks with the released PolyNet widths.

Every block is described as data (branches of :class:`ConvSpec`), so the widths of the
reference table live in one place and a width multiplier scales them all. An Inception block
``F`` is parallel conv branches, concatenated, then a 1x1 up-projection back to the input width
(conv + norm, no activation: the activation comes after the residual sum).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from polynet.model.layers import LayerFactory, resolve_layers


@dataclass(frozen=True)
class ConvSpec:
    """One conv + norm + activation of a branch, at width multiplier 1."""

    out_chs: int
    kernel: int | tuple[int, int] = 1
    stride: int = 1
    padding: int | tuple[int, int] = 0


POOL: Literal["maxpool"] = "maxpool"
"""A 3x3 stride-2 max-pool branch (it keeps its input's channels)."""

Branch = tuple[ConvSpec, ...] | Literal["maxpool"]


def _c(out_chs: int, kernel: int | tuple[int, int] = 1, stride: int = 1, padding=0) -> ConvSpec:
    return ConvSpec(out_chs, kernel, stride, padding)


# The residual blocks F of stages A, B and C (reference table, architecture.md).
IR_A: tuple[Branch, ...] = (
    (_c(32), _c(48, 3, padding=1), _c(64, 3, padding=1)),
    (_c(32), _c(32, 3, padding=1)),
    (_c(32),),
)
IR_B: tuple[Branch, ...] = (
    (_c(128), _c(160, (1, 7), padding=(0, 3)), _c(192, (7, 1), padding=(3, 0))),
    (_c(192),),
)
IR_C: tuple[Branch, ...] = (
    (_c(192), _c(224, (1, 3), padding=(0, 1)), _c(256, (3, 1), padding=(1, 0))),
    (_c(192),),
)
STAGE_BLOCKS = {"A": IR_A, "B": IR_B, "C": IR_C}

# Reductions between stages: every branch halves the resolution; widths add up by concatenation.
REDUCTION_A: tuple[Branch, ...] = (
    (_c(256), _c(256, 3, padding=1), _c(384, 3, stride=2)),
    (_c(384, 3, stride=2),),
    POOL,
)
REDUCTION_B: tuple[Branch, ...] = (
    (_c(256), _c(256, 3, padding=1), _c(256, 3, stride=2)),
    (_c(256), _c(256, 3, stride=2)),
    (_c(256), _c(384, 3, stride=2)),
    POOL,
)


def scaled(chs: int, width_mult: float) -> int:
    """Channels after the width multiplier (at least 1)."""
    return max(1, round(chs * width_mult))


def _resolve(spec: ConvSpec, width_mult: float, pad_strided: bool) -> ConvSpec:
    """Apply the width multiplier, and pad stride-2 convs by 1 when asked.

    Padding makes small inputs halve exactly (28 -> 14 -> 7) instead of losing a border row.
    """
    padding = 1 if pad_strided and spec.stride == 2 else spec.padding
    return replace(spec, out_chs=scaled(spec.out_chs, width_mult), padding=padding)


def _inplace_act(act_layer: Callable[..., nn.Module]) -> nn.Module:
    """Build the activation in place where it supports it.

    Here it always follows a norm, whose backward needs the norm's input, not its output, so
    overwriting that output saves one activation-sized buffer per convolution in training.
    """
    try:
        return act_layer(inplace=True)
    except TypeError:
        return act_layer()


class ConvNormAct(nn.Sequential):
    """Bias-free conv, norm and (optionally) activation, the unit every branch is made of."""

    def __init__(
        self,
        in_chs: int,
        spec: ConvSpec,
        norm_layer: LayerFactory | None = None,
        act_layer: LayerFactory | None = None,
        apply_act: bool = True,
    ) -> None:
        norm_layer, act_layer = resolve_layers(norm_layer, act_layer)
        super().__init__()
        self.conv = nn.Conv2d(
            in_chs, spec.out_chs, spec.kernel, spec.stride, spec.padding, bias=False
        )
        self.bn = norm_layer(spec.out_chs)
        self.act = _inplace_act(act_layer) if apply_act else nn.Identity()


class Mixed(nn.Module):
    """Parallel branches concatenated along channels (stem parts and reductions).

    Args:
        in_chs: Input channels.
        branches: Branch specs at width 1; ``POOL`` is a 3x3 stride-2 max-pool.
        width_mult: Multiplier applied to every conv width.
        pad_strided: Pad stride-2 convs and pools by 1 (small-image variant).
        norm_layer: Norm factory, called with the channel count.
        act_layer: Activation factory.

    """

    def __init__(
        self,
        in_chs: int,
        branches: Sequence[Branch],
        width_mult: float = 1.0,
        pad_strided: bool = False,
        norm_layer: LayerFactory | None = None,
        act_layer: LayerFactory | None = None,
    ) -> None:
        super().__init__()
        self.branches = nn.ModuleList()
        self.out_chs = 0
        for branch in branches:
            if branch == POOL:
                self.branches.append(nn.MaxPool2d(3, stride=2, padding=int(pad_strided)))
                self.out_chs += in_chs
                continue
            layers, chs = [], in_chs
            for spec in branch:
                spec = _resolve(spec, width_mult, pad_strided)
                layers.append(ConvNormAct(chs, spec, norm_layer, act_layer))
                chs = spec.out_chs
            self.branches.append(nn.Sequential(*layers))
            self.out_chs += chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the branches and concatenate their outputs along channels."""
        outs: list[torch.Tensor] = []
        for branch in self.branches:  # a loop: TorchScript unrolls it, not a comprehension
            outs.append(branch(x))
        return torch.cat(outs, dim=1)


class InceptionBlock(nn.Module):
    """The residual block ``F`` of an Inception residual unit (IR-A, IR-B or IR-C).

    With ``num_orders > 1`` the block carries the released poly-k's partial sharing: the branch
    convolutions are shared by all orders while every order has its own norms and its own 1x1
    up-projection; ``forward(x, order)`` picks the order. ``share_projection`` shares the
    up-projection's convolution too, so that only the norms are per order. With one order it is
    a plain block.

    Args:
        chs: Input and output channels (the stage width).
        branches: Branch specs at width 1 (``IR_A``, ``IR_B``, ``IR_C`` or your own).
        width_mult: Multiplier for the branch widths.
        num_orders: Number of per-order norm and up-projection sets.
        norm_layer: Norm factory.
        act_layer: Activation factory.
        share_projection: One up-projection convolution for all orders (per-order norms).

    """

    def __init__(
        self,
        chs: int,
        branches: Sequence[Branch],
        width_mult: float = 1.0,
        num_orders: int = 1,
        norm_layer: LayerFactory | None = None,
        act_layer: LayerFactory | None = None,
        share_projection: bool = False,
    ) -> None:
        super().__init__()
        norm_layer, act_layer = resolve_layers(norm_layer, act_layer)
        if num_orders < 1:
            raise ValueError(f"num_orders must be at least 1, got {num_orders}")
        specs = [[_resolve(s, width_mult, False) for s in b] for b in branches if b != POOL]
        self.convs = nn.ModuleList()
        cat_chs = 0
        for branch in specs:
            convs, in_chs = nn.ModuleList(), chs
            for s in branch:
                convs.append(
                    nn.Conv2d(in_chs, s.out_chs, s.kernel, s.stride, s.padding, bias=False)
                )
                in_chs = s.out_chs
            self.convs.append(convs)
            cat_chs += in_chs
        self.norms = nn.ModuleList(
            nn.ModuleList(nn.ModuleList(norm_layer(s.out_chs) for s in b) for b in specs)
            for _ in range(num_orders)
        )
        self.act = _inplace_act(act_layer)
        self.proj = nn.ModuleList(
            ConvNormAct(cat_chs, ConvSpec(chs), norm_layer, act_layer, apply_act=False)
            for _ in range(num_orders)
        )
        if share_projection:
            for proj in self.proj[1:]:
                proj.conv = self.proj[0].conv  # one module: parameters() lists it once
        self.num_orders = num_orders

    def forward(self, x: torch.Tensor, order: int = 0) -> torch.Tensor:
        """Apply the block with the norms and up-projection of power ``order``."""
        # TorchScript indexes a ModuleList by literals only: the orders are looped over (a loop
        # it unrolls) and the one asked for runs.
        for i, (norms, proj) in enumerate(zip(self.norms, self.proj, strict=True)):
            if i == order:
                outs: list[torch.Tensor] = []
                for convs, bns in zip(self.convs, norms, strict=True):
                    h = x
                    for conv, bn in zip(convs, bns, strict=True):
                        h = self.act(bn(conv(h)))
                    outs.append(h)
                return proj(torch.cat(outs, dim=1))  # (N, chs, H, W), no activation
        raise IndexError(f"order {order} of a block with {self.num_orders} orders")


class ImageNetStem(nn.Module):
    """The Inception-ResNet-v2 stem: 3 x 331 x 331 -> 384 x 39 x 39 at width 1 (8.5x smaller).

    Args:
        in_chans: Input channels.
        width_mult: Multiplier for every width.
        norm_layer: Norm factory.
        act_layer: Activation factory.

    """

    min_input_size = 75

    def __init__(
        self,
        in_chans: int = 3,
        width_mult: float = 1.0,
        norm_layer: LayerFactory | None = None,
        act_layer: LayerFactory | None = None,
    ) -> None:
        super().__init__()
        w = width_mult
        layers = (norm_layer, act_layer)
        self.conv1 = ConvNormAct(in_chans, ConvSpec(scaled(32, w), 3, 2), *layers)
        self.conv2 = ConvNormAct(scaled(32, w), ConvSpec(scaled(32, w), 3), *layers)
        self.conv3 = ConvNormAct(scaled(32, w), ConvSpec(scaled(64, w), 3, 1, 1), *layers)
        self.mixed1 = Mixed(scaled(64, w), (POOL, (_c(96, 3, stride=2),)), w, False, *layers)
        self.mixed2 = Mixed(
            self.mixed1.out_chs,
            (
                (_c(64), _c(96, 3)),
                (_c(64), _c(64, (7, 1), padding=(3, 0)), _c(64, (1, 7), padding=(0, 3)), _c(96, 3)),
            ),
            w,
            False,
            *layers,
        )
        self.mixed3 = Mixed(self.mixed2.out_chs, (POOL, (_c(192, 3, stride=2),)), w, False, *layers)
        self.out_chs = self.mixed3.out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reduce an image batch to the stage-A resolution and width."""
        x = self.conv3(self.conv2(self.conv1(x)))  # (N, 64, 163, 163) at 331 px
        x = self.mixed1(x)  # (N, 160, 81, 81)
        x = self.mixed2(x)  # (N, 192, 79, 79)
        return self.mixed3(x)  # (N, 384, 39, 39)


class SmallStem(nn.Sequential):
    """A stem for 28-64 px images: two 3x3 convs to the stage-A width.

    With ``stride=1`` stage A sees the full input resolution; ``stride=2`` halves it in the
    second conv, which makes stage A and reduction A (most of a small net's time) 4x cheaper.

    Args:
        in_chans: Input channels (1 for Fashion-MNIST, 3 for CIFAR-like data).
        out_chs: Stage A width.
        norm_layer: Norm factory.
        act_layer: Activation factory.
        stride: Stride of the second conv (1 or 2).

    Raises:
        ValueError: For a stride other than 1 or 2.

    """

    def __init__(
        self,
        in_chans: int,
        out_chs: int,
        norm_layer: LayerFactory | None = None,
        act_layer: LayerFactory | None = None,
        stride: int = 1,
    ) -> None:
        if stride not in (1, 2):
            raise ValueError(f"the small stem's stride must be 1 or 2, got {stride}")
        mid = max(1, out_chs // 2)
        super().__init__()
        self.conv1 = ConvNormAct(in_chans, ConvSpec(mid, 3, 1, 1), norm_layer, act_layer)
        self.conv2 = ConvNormAct(mid, ConvSpec(out_chs, 3, stride, 1), norm_layer, act_layer)
        self.out_chs = out_chs
        self.min_input_size = 8 * stride
