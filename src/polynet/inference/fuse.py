"""Inference-time rewrites of a trained PolyNet that leave its outputs unchanged.

:func:`optimize_for_inference` returns an equivalent eval-only copy of a model in which

* every convolution absorbs the BatchNorm after it (``conv + BN`` -> ``conv`` with a bias);
* the parallel 1x1 convolutions that read the same tensor run as one wider convolution
  (horizontal fusion): within an Inception block, within a ``Mixed`` stem part or reduction,
  and across all the blocks of a PolyInception unit that read the unit's input ``x`` (the
  ``F`` and ``G`` of a 2-way, the first order of a poly-3);
* the up-projections whose outputs only feed the residual sum run as one convolution over the
  joined branch outputs, with the residual scale folded into its weights:
  ``s * (W_F c_F + b_F) + s * (W_G c_G + b_G) = [s W_F, s W_G] [c_F; c_G] + s (b_F + b_G)``;
* activations run in place where their input is a temporary, and the weights are stored
  channels-last (oneDNN's preferred layout on CPU, tensor-core friendly on CUDA);
* on CPU, every convolution keeps its weight pre-packed in oneDNN's blocked layout
  (:class:`PackedConv2d`), which eager PyTorch would otherwise re-lay out on every call.

BatchNorm in eval mode is a per-channel affine map, so folding it into the convolution before it
and joining convolutions along their output channels are exact up to float rounding.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from polynet.errors import UserError
from polynet.model.blocks import ConvNormAct, InceptionBlock, Mixed
from polynet.model.modules import PER_ORDER_SHARINGS, PolyInception

if TYPE_CHECKING:
    from polynet.inference.quantize import OnnxRuntimeModel

    InferenceModel = nn.Module | OnnxRuntimeModel
    """What inference runs: a module, or an ONNX Runtime session (a callable, not a module)."""


def fold_conv_bn(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """Return a new convolution (with bias) computing ``bn(conv(x))`` for an eval-mode BN.

    Raises:
        ValueError: If ``bn`` is not a BatchNorm2d with running statistics.

    """
    if not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None:
        raise ValueError(
            f"cannot fold {type(bn).__name__} into a convolution: only BatchNorm2d with running "
            "statistics folds; build the model with the default norm_layer or skip "
            "optimize_for_inference"
        )
    folded = copy.deepcopy(conv)
    weight, bias = fuse_conv_bn_weights(
        conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
    )
    folded.weight, folded.bias = weight, bias
    return folded


def join_convs(convs: Sequence[nn.Conv2d], scales: Sequence[float] | None = None) -> nn.Conv2d:
    """Join parallel convolutions into one whose output channels are theirs, in order.

    With ``scales``, the convolutions are instead summed: their inputs are joined (the result
    takes the channel concatenation of their inputs) and their outputs added, each multiplied
    by its scale. Both are exact rewrites of parallel linear maps.
    """
    first = convs[0]
    geometry = [(c.kernel_size, c.stride, c.padding, c.dilation, c.groups) for c in convs]
    if any(g != geometry[0] for g in geometry) or first.groups != 1:
        raise ValueError(f"cannot join convolutions of different shapes: {geometry}")
    biases = [c.bias if c.bias is not None else c.weight.new_zeros(c.out_channels) for c in convs]
    if scales is None:
        weight = torch.cat([c.weight for c in convs], dim=0)
        bias = torch.cat(biases)
    else:
        weight = torch.cat([s * c.weight for c, s in zip(convs, scales, strict=True)], dim=1)
        bias = sum(s * b for b, s in zip(biases, scales, strict=True))
    joined = nn.Conv2d(
        weight.shape[1],
        weight.shape[0],
        first.kernel_size,
        first.stride,
        first.padding,
        first.dilation,
        bias=True,
    ).to(weight.device, weight.dtype)
    joined.weight, joined.bias = nn.Parameter(weight.detach()), nn.Parameter(bias.detach())
    return joined


def _is_pointwise(conv: nn.Conv2d) -> bool:
    return conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1


def _inplace_act(act: nn.Module) -> nn.Module:
    """Return the same activation, in place when it supports it (for temporaries)."""
    if hasattr(act, "inplace"):
        act = copy.deepcopy(act)
        act.inplace = True
    return act


def _folded_layer(layer: ConvNormAct) -> nn.Sequential:
    return nn.Sequential(fold_conv_bn(layer.conv, layer.bn), _inplace_act(layer.act))


class FoldedBranches(nn.Module):
    """Parallel branches whose leading 1x1 convolutions run as one joined convolution.

    ``entry`` computes all leading convolutions at once; ``tails`` holds the rest of each
    branch. Branches are concatenated in their original order.
    """

    def __init__(
        self, entry: nn.Conv2d, splits: Sequence[int], tails: Sequence[nn.Module], act: nn.Module
    ) -> None:
        super().__init__()
        self.entry = entry
        self.splits = list(splits)
        self.tails = nn.ModuleList(tails)
        self.act = _inplace_act(act)

    def run_tails(self, entry_out: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Branch outputs from this module's slices of an entry convolution's output."""
        return [tail(h) for tail, h in zip(self.tails, entry_out, strict=True)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.cat(self.run_tails(self.act(self.entry(x)).split(self.splits, 1)), dim=1)


class FoldedInceptionBlock(nn.Module):
    """One order of an :class:`~polynet.model.blocks.InceptionBlock` with its norms folded in.

    Attributes:
        branches: The branch convolutions, leading 1x1s joined.
        proj: The up-projection (conv with bias, no activation).

    """

    def __init__(self, block: InceptionBlock, order: int) -> None:
        super().__init__()
        folded = [
            [fold_conv_bn(conv, bn) for conv, bn in zip(convs, bns, strict=True)]
            for convs, bns in zip(block.convs, block.norms[order], strict=True)
        ]
        if not all(_is_pointwise(branch[0]) for branch in folded):
            raise ValueError("every Inception branch must start with a 1x1 convolution")
        tails = [
            nn.Sequential(*[m for conv in branch[1:] for m in (conv, _inplace_act(block.act))])
            for branch in folded
        ]
        self.branches = FoldedBranches(
            join_convs([b[0] for b in folded]),
            [b[0].out_channels for b in folded],
            tails,
            block.act,
        )
        self.proj = fold_conv_bn(block.proj[order].conv, block.proj[order].bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.proj(self.branches(x))


class FoldedPolyInception(nn.Module):
    """An eval-only PolyInception unit with the cascaded plan and every fusion applied.

    The unit computes the same ``act(x + s * sum of paths)`` as
    :meth:`polynet.model.modules.PolyInception.forward`; blocks reading ``x`` share one joined entry
    convolution, and the path ends that feed nothing but the sum share one up-projection.
    """

    def __init__(self, unit: PolyInception) -> None:
        super().__init__()
        self.plan = unit.plan
        self.sharing = unit.sharing
        self.scale = unit.scale
        self.act = unit.act
        self.out_act = _inplace_act(unit.act)
        self.steps = nn.ModuleList(
            FoldedInceptionBlock(
                unit.blocks[s.letter], s.order if unit.sharing in PER_ORDER_SHARINGS else 0
            )
            for s in self.plan
        )
        parents = {s.parent for s in self.plan}
        self.leaves = [s.node for s in self.plan if s.node not in parents]  # all are path ends
        roots = [self.steps[s.node].branches for s in self.plan if s.parent < 0]
        self.root_entry = join_convs([r.entry for r in roots])
        self.root_splits = [sum(r.splits) for r in roots]
        self.leaf_proj = join_convs(
            [self.steps[i].proj for i in self.leaves], [self.scale] * len(self.leaves)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        root_out = self.steps[0].branches.act(self.root_entry(x)).split(self.root_splits, 1)
        outputs: dict[int, torch.Tensor] = {}
        leaf_inputs: list[torch.Tensor] = []
        inner_sum: torch.Tensor | None = None  # unscaled path ends that also feed a block
        for step, block in zip(self.plan, self.steps, strict=True):
            branches = block.branches
            if step.parent < 0:
                entry = root_out[step.node]
            else:
                h = outputs[step.parent]
                h = self.act(h) if self.sharing == "released" else h  # not in place: h is summed
                entry = branches.act(branches.entry(h))
            cat = branches.run_tails(entry.split(branches.splits, 1))
            if step.node in self.leaves:
                leaf_inputs.extend(cat)
                continue
            y = block.proj(torch.cat(cat, dim=1))
            outputs[step.node] = y
            if step.is_path_end:
                inner_sum = y if inner_sum is None else inner_sum + y
        out = self.leaf_proj(torch.cat(leaf_inputs, dim=1))  # already scaled
        if inner_sum is not None:
            out = out.add_(inner_sum, alpha=self.scale)
        return self.out_act(out.add_(x))


def _fold_mixed(mixed: Mixed) -> nn.Module:
    """Fold a Mixed part's norms and join its leading 1x1 convolutions."""
    branches = []
    for branch in mixed.branches:
        if isinstance(branch, nn.Sequential):
            branch = nn.Sequential(*[_folded_layer(layer) for layer in branch])
        branches.append(branch)
    return FoldedMixed(branches)


class FoldedMixed(nn.Module):
    """Parallel branches concatenated, the leading 1x1 convolutions of conv branches joined."""

    def __init__(self, branches: Sequence[nn.Module]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        joinable = [
            i
            for i, b in enumerate(branches)
            if isinstance(b, nn.Sequential) and _is_pointwise(b[0][0]) and len(b) > 1
        ]
        self.joined = joinable if len(joinable) > 1 else []
        if self.joined:
            heads = [branches[i][0] for i in self.joined]
            self.entry = join_convs([h[0] for h in heads])
            self.entry_act = _inplace_act(heads[0][1])
            self.splits = [h[0].out_channels for h in heads]
            self.tails = nn.ModuleList(branches[i][1:] for i in self.joined)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        joined: dict[int, torch.Tensor] = {}
        if self.joined:
            parts = self.entry_act(self.entry(x)).split(self.splits, 1)
            joined = {i: tail(p) for i, tail, p in zip(self.joined, self.tails, parts, strict=True)}
        return torch.cat(
            [joined[i] if i in joined else b(x) for i, b in enumerate(self.branches)], dim=1
        )


# oneDNN runs packed bf16 convolutions natively (AVX512-BF16/AMX), accumulating in fp32, so bf16
# weights pack too. Measured on a 2-core AVX512-BF16 EPYC (shared with other jobs), one thread:
# a 128->192 3x3 convolution at 17x17, batch 8, packed bf16 ran 2.07x packed fp32 (plain bf16
# F.conv2d: 1.97x); whole bf16 polynet_small models ran 1.8-2.2x the packed fp32 model, and
# packed vs plain bf16 F.conv2d was within the machine's noise (0.85-1.23x over five runs at
# width_mult 0.25 and 0.5). Packed stays: it is never slower beyond noise and takes the ReLU
# as a post-op. Reproduce with ``python benchmarks/int8_paths.py`` ("bf16 fused" vs
# "bf16 unpacked").
PACKED_DTYPES = (torch.float32, torch.bfloat16)


def _onednn_available() -> bool:
    """Whether this build has oneDNN and the two private ops packed convolutions use."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
        and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight")
    )


@functools.cache
def _mkldnn_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PackedConv2d(nn.Conv2d):
    """A convolution that keeps its weight pre-packed for oneDNN, for CPU inference.

    ``F.conv2d`` on CPU hands oneDNN a plain weight, which oneDNN reorders into its blocked
    layout on every call; for the short, wide convolutions of PolyNet that reorder costs 5-20 %
    of the convolution. This module packs the weight once (for the input shape it first sees)
    and calls the same oneDNN convolution with the packed copy: the result is the same
    computation (fp32 or bf16). Anything else (training, gradients, CUDA, other dtypes, export,
    FLOP counters and other dispatch modes) takes the ordinary ``nn.Conv2d`` path, and
    ``weight`` stays an ordinary parameter, so ``state_dict`` and exports are unchanged. The
    packed copy depends on the weight (its storage, version and dtype) and on the image size
    oneDNN is told to expect; it is valid for inputs of any shape (tested), so batches of
    varying size (multi-crop evaluation) reuse it. It is not saved or copied.

    Attributes:
        post_op: ``"relu"`` when the ReLU that followed this convolution was folded into it
            (oneDNN applies it as the convolution writes its output; one pass less over memory).

    """

    post_op = "none"

    def _packed_weight(self, x: torch.Tensor) -> torch.Tensor:
        # Inference tensors (weights made under inference_mode) keep no version counter.
        version = 0 if self.weight.is_inference() else self.weight._version
        # What the packing depends on: the weight, and the image size as oneDNN's hint.
        key = (self.weight.data_ptr(), version, self.weight.dtype, tuple(x.shape[1:]))
        if getattr(self, "_pack_key", None) != key:
            self._packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                self.weight.detach().to_mkldnn(),
                list(self.padding),
                list(self.stride),
                list(self.dilation),
                self.groups,
                list(x.shape),
            )
            self._pack_key = key
        return self._packed

    def _use_packed(self, x: torch.Tensor) -> bool:
        return (
            not self.training
            and x.device.type == "cpu"
            and x.dtype in PACKED_DTYPES
            # oneDNN packs bf16 weights only on CPUs with bf16 conversion instructions
            # (AVX512BW/VL/DQ or AVX-NE-CONVERT); an AVX2 CPU takes the plain bf16 path.
            and (x.dtype != torch.bfloat16 or _mkldnn_bf16())
            and self.weight.dtype == x.dtype
            and self.padding_mode == "zeros"
            and isinstance(self.padding, tuple)
            and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
            and not torch.jit.is_tracing()
            and not torch.jit.is_scripting()
            and not torch.compiler.is_compiling()
            and not is_in_torch_dispatch_mode()  # FLOP counters, meta tracing: plain ops
            and not torch.is_autocast_enabled("cpu")
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve, through the packed weight where it applies."""
        if not self._use_packed(x):
            y = super().forward(x)
            return torch.relu_(y) if self.post_op == "relu" else y
        bias = None if self.bias is None else self.bias.detach()
        return torch.ops.mkldnn._convolution_pointwise(
            x.contiguous(memory_format=torch.channels_last),
            self._packed_weight(x),
            bias,
            list(self.padding),
            list(self.stride),
            list(self.dilation),
            self.groups,
            self.post_op,
            [],
            "",
        )

    def __getstate__(self) -> dict:
        """Copies and pickles leave the packed weight behind (it is rebuilt on first use)."""
        state = super().__getstate__()
        return {k: v for k, v in state.items() if k not in ("_packed", "_pack_key")}


def prepack_convolutions(model: nn.Module) -> nn.Module:
    """Turn every plain ``nn.Conv2d`` of ``model`` into a :class:`PackedConv2d`, in place.

    The parameters are the same objects; only the class changes, so nothing is copied. A no-op
    where this PyTorch build has no oneDNN.
    """
    if not _onednn_available():
        return model
    for module in model.modules():
        if type(module) is nn.Conv2d:
            module.__class__ = PackedConv2d
    _fold_relus(model)
    return model


def _takes_relu(conv: nn.Module, act: nn.Module) -> bool:
    """Fold ``act`` into ``conv`` when it is a plain ReLU after a packed convolution."""
    if isinstance(conv, PackedConv2d) and type(act) is nn.ReLU:
        conv.post_op = "relu"
        return True
    return False


def _fold_relus(model: nn.Module) -> None:
    """Move every ReLU that directly follows a packed convolution into the convolution."""
    for module in list(model.modules()):
        if isinstance(module, FoldedPolyInception):
            # The first step's activation also follows the unit's joined root entry, so the
            # root entry takes the ReLU exactly when that activation is one.
            _takes_relu(module.root_entry, module.steps[0].branches.act)
            for step in module.steps:
                if _takes_relu(step.branches.entry, step.branches.act):
                    step.branches.act = nn.Identity()
        elif isinstance(module, FoldedMixed) and module.joined:
            if _takes_relu(module.entry, module.entry_act):
                module.entry_act = nn.Identity()
        elif isinstance(module, FoldedBranches) and not isinstance(module.act, nn.Identity):
            if _takes_relu(module.entry, module.act):
                module.act = nn.Identity()
        elif isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                if _takes_relu(module[i], module[i + 1]):
                    module[i + 1] = nn.Identity()


class FusionWarning(UserWarning):
    """Parts of a model were left unfused: they run as built, correct but slower."""


class FusionError(ValueError):
    """Parts of a model could not be fused (:func:`optimize_for_inference` with ``strict``)."""


def _rewrite_part(module: nn.Module) -> nn.Module | None:
    """The rewrite of one part :func:`optimize_for_inference` knows, or None for a container.

    Raises:
        ValueError: If the part cannot be rewritten (e.g. a norm without running statistics).

    """
    if isinstance(module, PolyInception) and all(
        isinstance(b, InceptionBlock) for b in module.blocks.values()
    ):
        return FoldedPolyInception(module)
    if isinstance(module, InceptionBlock) and module.num_orders == 1:
        return FoldedInceptionBlock(module, 0)
    if isinstance(module, Mixed):
        return _fold_mixed(module)
    if isinstance(module, ConvNormAct):
        return _folded_layer(module)
    return None


def _rewrite(module: nn.Module, unfused: list[tuple[str, str]], name: str = "") -> nn.Module:
    """Rewrite every part that folds; keep the others as built, noting where and why."""
    try:
        rewritten = _rewrite_part(module)
    except ValueError as err:
        unfused.append((name or type(module).__name__, str(err)))
        return module
    if rewritten is not None:
        return rewritten
    for child_name, child in module.named_children():
        path = f"{name}.{child_name}" if name else child_name
        setattr(module, child_name, _rewrite(child, unfused, path))
    return module


def _report_unfused(unfused: list[tuple[str, str]], strict: bool) -> None:
    """Say which parts were left unfused and why: a warning, or with ``strict`` an error."""
    if not unfused:
        return
    shown = "; ".join(f"{name}: {reason}" for name, reason in unfused[:3])
    more = f" (and {len(unfused) - 3} more)" if len(unfused) > 3 else ""
    message = (
        f"optimize_for_inference left {len(unfused)} part{'s' if len(unfused) != 1 else ''} "
        f"unfused, running as built (slower): {shown}{more}"
    )
    if strict:
        raise FusionError(message)
    warnings.warn(message, FusionWarning, stacklevel=3)


def is_fusable(model: nn.Module) -> bool:
    """Whether ``model`` has parts :func:`optimize_for_inference` rewrites (PolyNet layers)."""
    return any(
        isinstance(m, (PolyInception, InceptionBlock, Mixed, ConvNormAct)) for m in model.modules()
    )


PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "int8")
# Where the inference copy runs. ONNX Runtime's CPU convolutions beat oneDNN's through PyTorch
# on the very deep model in fp32 (docs/benchmarks.md); int8 always runs there.
RUNTIMES: tuple[str, ...] = ("torch", "onnxruntime")


class CastModel(nn.Module):
    """Run a model in another dtype: inputs cast at the entry, float32 outputs.

    A module: its parameters, ``eval`` and ``to`` are the wrapped model's, as its submodule.
    ``num_classes`` and ``pretrained_cfg`` are the wrapped model's too; its other methods
    (``forward_features``, ...) are on :attr:`model` and take inputs in ``dtype``.

    Attributes:
        model: The wrapped model, its parameters in ``dtype``.
        dtype: What inputs are cast to.

    """

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The wrapped model's output for ``x`` in ``dtype``, as float32."""
        return self.model(x.to(self.dtype)).float()

    @property
    def num_classes(self) -> int:
        """The wrapped model's classifier outputs."""
        return self.model.num_classes

    @property
    def pretrained_cfg(self) -> dict:
        """The wrapped model's preprocessing and class names."""
        return self.model.pretrained_cfg


def check_precision(precision: str) -> str:
    """Return ``precision`` if it is one of :data:`PRECISIONS`.

    Raises:
        UserError: For any other name.

    """
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    return precision


def check_runtime(runtime: str, precision: str = "fp32") -> str:
    """Return ``runtime`` if it is one of :data:`RUNTIMES` and can run ``precision``.

    Raises:
        UserError: For another name, or bf16 in ONNX Runtime.

    """
    check_precision(precision)
    if runtime not in RUNTIMES:
        raise UserError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    if runtime == "onnxruntime" and precision == "bf16":
        raise UserError(
            "ONNX Runtime has no bf16 convolutions on CPU; use --runtime torch for bf16, or "
            "--precision fp32/int8 with onnxruntime"
        )
    return runtime


@torch.no_grad()
def optimize_for_inference(
    model: nn.Module,
    channels_last: bool = True,
    prepack: bool = True,
    *,
    precision: str = "fp32",
    calibration: Iterable[torch.Tensor] | None = None,
    runtime: str = "torch",
    input_size: Sequence[int] | None = None,
    strict: bool = False,
) -> InferenceModel:
    """Return an equivalent eval-only copy of ``model``, norms folded, parallel convs joined.

    The original model is left untouched. The copy computes the same outputs as
    ``model.eval()`` (within float rounding) and keeps its public interface
    (``forward_features``, ``forward_head``, ...), but it cannot be trained: BatchNorm is gone
    and shared convolutions of the released poly-3 are duplicated per order. Units whose blocks
    are not :class:`~polynet.model.blocks.InceptionBlock` are kept as they are.

    Args:
        model: A PolyNet or any module containing PolyInception units, Inception blocks,
            ``Mixed`` parts or ``ConvNormAct`` layers.
        channels_last: Store weights channels-last, so convolutions run in that layout.
        prepack: Keep CPU convolution weights pre-packed for oneDNN (:class:`PackedConv2d`);
            a no-op on GPUs and without oneDNN.
        precision: ``"fp32"``; ``"bf16"``: the same folded model with bf16 weights (packed for
            oneDNN on CPU), fed bf16 inputs and returning float32 logits (:class:`CastModel`);
            ``"int8"``: post-training static quantization calibrated on ``calibration``
            (:func:`polynet.inference.quantize.quantize_int8`; CPU only).
        calibration: Preprocessed input batches (as the model sees them) for ``"int8"``.
        runtime: ``"torch"``, or ``"onnxruntime"``: the folded fp32 copy exported to ONNX and
            run by ONNX Runtime (:func:`polynet.inference.quantize.onnx_runtime_model`; CPU, fp32).
            int8
            runs in ONNX Runtime either way.
        input_size: (C, H, W) the ONNX graph is exported at (``"onnxruntime"``); the model's
            ``pretrained_cfg`` size by default.
        strict: Raise :class:`FusionError` for a part that cannot be fused (a norm without
            running statistics, say) instead of keeping it as built with a
            :class:`FusionWarning` that names it and the reason.

    Returns:
        The rewritten copy, in eval mode with gradients disabled; for ``"int8"`` and
        ``"onnxruntime"`` an :class:`~polynet.inference.quantize.OnnxRuntimeModel` (a callable
        taking and returning torch tensors, not a module).

    Raises:
        UserError: For an unknown precision or runtime, bf16 in ONNX Runtime, or int8 without
            calibration batches.
        FusionError: With ``strict``, for a part that cannot be fused.

    """
    check_runtime(runtime, precision)
    if precision == "int8":
        from polynet.inference.quantize import quantize_int8

        folded = optimize_for_inference(model, prepack=False, strict=strict)
        return quantize_int8(folded, calibration)
    if runtime == "onnxruntime":
        from polynet.inference.quantize import onnx_runtime_model

        folded = optimize_for_inference(model, prepack=False, strict=strict)
        return onnx_runtime_model(folded, input_size)
    unfused: list[tuple[str, str]] = []
    fused = _rewrite(copy.deepcopy(model).eval(), unfused)
    _report_unfused(unfused, strict)
    fused.requires_grad_(False)
    if channels_last:
        fused = fused.to(memory_format=torch.channels_last)
    if precision == "bf16":
        fused = fused.to(torch.bfloat16)
    if prepack:
        prepack_convolutions(fused)
    if precision == "bf16":
        return CastModel(fused, torch.bfloat16).eval()
    return fused.eval()


def inference_model(
    model: nn.Module,
    precision: str = "fp32",
    calibration: Iterable[torch.Tensor] | None = None,
    *,
    fuse: bool = True,
    runtime: str = "torch",
    input_size: Sequence[int] | None = None,
) -> InferenceModel:
    """The model to run for inference at ``precision``: fused where it can be, else as built.

    A PolyNet gets :func:`optimize_for_inference` (a part that cannot fold runs as built, and a
    :class:`FusionWarning` names it); other models run unfused: as they are in fp32, as a bf16
    copy in :class:`CastModel`, or quantized directly for int8.

    Args:
        model: The classifier, in eval mode on its device.
        precision: ``"fp32"``, ``"bf16"`` or ``"int8"``.
        calibration: Preprocessed input batches, needed for ``"int8"``.
        fuse: Use :func:`optimize_for_inference` where it applies.
        runtime: ``"torch"`` or ``"onnxruntime"`` (CPU; see :func:`optimize_for_inference`).
        input_size: (C, H, W) of the inputs, for an ONNX Runtime graph.

    Raises:
        UserError: For an unknown precision or runtime, ONNX Runtime off the CPU or in bf16,
            or int8 without calibration batches.

    """
    check_runtime(runtime, precision)
    on = next(model.parameters()).device
    if runtime == "onnxruntime" and on.type != "cpu":
        raise UserError(f"ONNX Runtime runs on the CPU and the model is on {on}; use --device cpu")
    if fuse and is_fusable(model):
        with torch.inference_mode(False):  # ordinary tensors: the copy's weights stay tracked
            # A part that cannot fold runs as built, and a FusionWarning names it.
            return optimize_for_inference(
                model,
                precision=precision,
                calibration=calibration,
                runtime=runtime,
                input_size=input_size,
            )
    if precision == "bf16":
        with torch.inference_mode(False):
            return CastModel(copy.deepcopy(model).eval().to(torch.bfloat16), torch.bfloat16)
    if precision == "int8":
        from polynet.inference.quantize import quantize_int8

        with torch.inference_mode(False):  # the ONNX exporter traces ordinary tensors
            return quantize_int8(model.eval(), calibration)
    if runtime == "onnxruntime":
        from polynet.inference.quantize import onnx_runtime_model

        with torch.inference_mode(False):
            return onnx_runtime_model(model.eval(), input_size)
    return model
