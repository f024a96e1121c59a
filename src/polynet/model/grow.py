"""Initialization by insertion: grow a trained network into a deeper or richer PolyNet.

The paper (section 4, Fig. 9) initialises very deep PolyNets from smaller trained ones:

- **Replace** a residual unit ``I + F`` by a PolyInception module (``I + F + GF``, ``2-way``,
  ...): the trained first-order block ``F`` is kept, the inserted blocks ``G``, ``H`` are new.
- **Deepen** a stage by inserting new units *between* the original ones (interleaved), which
  the paper found better than stacking the new units at the end.

:func:`grow` does both at once. The stem, the reductions and the classifier are copied. Old unit
``i`` of a stage with ``n`` units lands in slot ``floor(i * m / n)`` of the grown stage with
``m >= n`` units (:func:`interleaved_slots`); the other slots are new units. When doubling this
is old, new, old, new, ...; for other ratios each old unit is followed by its share of the new
units, so old units keep their relative depth.

With ``zero_init=True`` every new block starts with zero output: the scale and shift of the
BatchNorm that ends its up-projection are zeroed. A new unit then computes ``relu(x) = x`` (its
input is post-ReLU) and a replaced unit computes the source unit's paths, so the grown network
starts as the source's function. :attr:`GrowthMap.preserves_function` says whether that holds
and, when it does not, why (e.g. the ``F^2`` path of a fully shared poly-k reuses the trained
``F`` and cannot start at zero).

Blocks with per-order parameters (``sharing="released"``): the branch convolutions and the
orders the source already had are copied; a new order's norms and up-projection are copied from
order 0 (the trained block reused at a higher power, as the paper's fully shared ``F^k``), and
with ``zero_init`` that order's up-projection is zeroed so its path starts silent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from polynet.model.algebra import format_word
from polynet.model.blocks import InceptionBlock
from polynet.model.modules import PolyInception
from polynet.model.network import PARTS, PolyNet, PolyNetConfig
from polynet.model.specs import NetworkSpec
from polynet.model.zoo import MODELS, check_model_name, create_model

Action = Literal["copied", "shared", "inserted", "initialised"]

# Config fields that fix the shape of the copied parts (stem, reductions, head).
_SHAPE_FIELDS = ("width_mult", "stem", "stem_stride", "in_chans", "num_classes")


@dataclass(frozen=True)
class GrowthEntry:
    """One line of the growth map.

    Attributes:
        action: ``"copied"`` (tensors copied from the source), ``"shared"`` (a new order's
            parameters copied from the trained order 0), ``"inserted"`` (a new unit) or
            ``"initialised"`` (a new block in a kept unit).
        target: Module path in the grown model, e.g. ``stage_b.2.blocks.F``.
        source: Module path in the source model, or None for new parts.
        detail: What was done, e.g. ``"zero output"`` or ``"random"``.

    """

    action: Action
    target: str
    source: str | None = None
    detail: str = ""


@dataclass
class GrowthMap:
    """What :func:`grow` copied, shared, inserted and initialised.

    Attributes:
        source_spec: The source network's spec.
        target_spec: The grown network's spec.
        zero_init: Whether new blocks start at zero output.
        unit_sources: For every grown unit, bottom to top, the index of the source unit it
            was grown from (in ``source.units``), or None for an inserted unit.
        entries: The map, in the grown model's order.
        reasons: Why the grown model does not compute the source's function (empty if it does).
        copied_params: Parameters copied from the source (shared orders counted once more).
        new_params: Parameters of the grown model that were not copied.
        model_name: Registered model name to rebuild the grown model with; it carries the
            input preprocessing, so it is the source's name unless the target's name has the
            same preprocessing (``polynet_small_ir`` grown into ``polynet_small`` keeps
            ``polynet_small``; grown into ``polynet_6_12_6_mixed`` it stays
            ``polynet_small_ir`` with the mixed spec in ``model_config``).
        model_config: The grown model's :class:`~polynet.model.network.PolyNetConfig`: the source's
            config with the grown spec, sharing and residual scales.

    """

    source_spec: NetworkSpec
    target_spec: NetworkSpec
    zero_init: bool
    unit_sources: tuple[int | None, ...] = ()
    entries: list[GrowthEntry] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    copied_params: int = 0
    new_params: int = 0
    model_name: str = "polynet"
    model_config: PolyNetConfig | None = None

    @property
    def preserves_function(self) -> bool:
        """Whether the grown model's eval outputs equal the source's before training."""
        return not self.reasons

    def __str__(self) -> str:
        init = "zero-init" if self.zero_init else "random init"
        lines = [
            f"growth map ({init})",
            f"  from: {self.source_spec}",
            f"  to:   {self.target_spec}",
        ]
        width = max((len(e.target) for e in self.entries), default=0)
        for e in self.entries:
            source = f" <- {e.source}" if e.source else ""
            detail = f" ({e.detail})" if e.detail else ""
            lines.append(f"  {e.action:<11} {e.target:<{width}}{source}{detail}")
        lines.append(f"  parameters: {self.copied_params:,} copied, {self.new_params:,} new")
        if self.preserves_function:
            lines.append("  function: preserved (the grown model computes the source's outputs)")
        else:
            lines.append("  function: changed until trained:")
            lines.extend(f"    - {reason}" for reason in self.reasons)
        return "\n".join(lines)


def interleaved_slots(num_source: int, num_target: int) -> tuple[int, ...]:
    """Slots of the original units in a deepened stage (the paper's interleaved insertion).

    Old unit ``i`` goes to slot ``floor(i * num_target / num_source)``, so when doubling the
    stage reads old, new, old, new, ... and for other ratios each old unit is followed by its
    share of the new units.

    Args:
        num_source: Units in the source stage.
        num_target: Units in the grown stage, at least ``num_source``.

    Returns:
        The grown stage's slot of every source unit, increasing.

    Raises:
        ValueError: If the grown stage has fewer units than the source stage.

    """
    if num_source < 1 or num_target < num_source:
        raise ValueError(
            f"cannot grow a stage of {num_source} units into {num_target}; the grown stage "
            "needs at least as many units as the source stage"
        )
    return tuple(i * num_target // num_source for i in range(num_source))


def _check_polynet(model: nn.Module, role: str) -> PolyNet:
    if not isinstance(model, PolyNet):
        raise ValueError(
            f"the {role} must be a polynet PolyNet model, got {type(model).__name__}; "
            "build it with polynet.create_model or polynet.io.loading.load_model"
        )
    return model


def _unit_slots(source: PolyNet, target_spec: NetworkSpec) -> list[int | None]:
    """For every target unit, the source unit index it is grown from, or None."""
    if len(source.spec.stages) != len(target_spec.stages):
        raise ValueError(
            f"different stage counts: source has {len(source.spec.stages)}, target "
            f"{len(target_spec.stages)}"
        )
    sources: list[int | None] = []
    offset = 0
    for src_stage, tgt_stage in zip(source.spec.stages, target_spec.stages, strict=True):
        if src_stage.name != tgt_stage.name:
            raise ValueError(
                f"different block types: source stage {src_stage.name} meets target stage "
                f"{tgt_stage.name}; stages must use the same IR blocks in the same order"
            )
        n, m = len(src_stage.units), len(tgt_stage.units)
        if m < n:
            raise ValueError(
                f"target stage {tgt_stage.name} has {m} units but the source has {n}; growing "
                "never removes trained units, give the target at least as many units per stage"
            )
        stage = [None] * m
        for i, slot in enumerate(interleaved_slots(n, m)):
            stage[slot] = offset + i
        sources.extend(stage)
        offset += n
    return sources


def _target_config(
    source: PolyNet,
    target_spec: NetworkSpec,
    registered: Mapping[str, Any],
    overrides: Mapping[str, Any],
    unit_sources: Sequence[int | None],
) -> PolyNetConfig:
    """The grown model's config: the source's own config, with the target's layout.

    Everything growing does not change (width, stem and its stride, inputs, classes, layers,
    pooling, dropout) is the source's, read from the config it was built with.
    """
    base = {**source.config.to_dict(), **overrides}
    for key in _SHAPE_FIELDS:
        if key in registered and registered[key] != base[key]:
            raise ValueError(
                f"the target model fixes {key}={registered[key]!r} but the source has "
                f"{key}={base[key]!r}; grow into a spec or a model with the source's {key}"
            )
    # The target's registered arguments (e.g. sharing) win over the source's, explicit ones win
    # over both; residual scales follow the source units (below) unless given explicitly.
    fixed = {k: v for k, v in registered.items() if k != "residual_scale"}
    kwargs = {**base, **fixed, **overrides}
    kwargs["spec"] = str(target_spec)
    if "residual_scale" not in overrides:
        # A kept unit keeps its trained scale; an inserted unit takes the scale of the old unit
        # below it in its stage (slot 0 of every stage holds an old unit).
        scales, last = [], 0.0
        for index in unit_sources:
            last = source.units[index].scale if index is not None else last
            scales.append(last)
        kwargs["residual_scale"] = scales
    return PolyNetConfig.from_dict(kwargs)


# pretrained_cfg entries that decide a model's input preprocessing.
_INPUT_CFG_KEYS = ("input_size", "mean", "std", "crop_pct", "crop_mode", "interpolation")


def _registered_name(source: PolyNet, target_name: str | None) -> str:
    """Pick the registered name to build the grown model under.

    The name carries the ``pretrained_cfg`` (input size, mean, std, crop) that training and
    evaluation read, and the grown model takes the source's inputs. So it is the target's name
    when that name's preprocessing matches the source's, else the source's own name (the spec
    in the constructor arguments gives the grown layout), else the generic ``"polynet"``.
    """
    source_cfg = getattr(source, "pretrained_cfg", None) or {}
    source_name = source_cfg.get("architecture")
    if target_name is not None and all(
        MODELS[target_name].cfg.get(key) == source_cfg.get(key) for key in _INPUT_CFG_KEYS
    ):
        return target_name
    return source_name if source_name in MODELS else "polynet"


def _build_target(
    source: PolyNet,
    target: str | NetworkSpec,
    overrides: Mapping[str, Any],
) -> tuple[PolyNet, str, PolyNetConfig, list[int | None]]:
    registered: Mapping[str, Any] = {}
    target_name = None
    if isinstance(target, NetworkSpec):
        spec = target
    elif ":" in target:
        spec = NetworkSpec.parse(target)
    else:
        check_model_name(target)
        target_name, spec = target, NetworkSpec.parse(MODELS[target].spec)
        registered = MODELS[target].kwargs
    unit_sources = _unit_slots(source, spec)
    config = _target_config(source, spec, registered, overrides, unit_sources)
    name = _registered_name(source, target_name)
    model = create_model(name, **config.to_dict())
    return _check_polynet(model, "target"), name, config, unit_sources


def _copy_tensors(dst: nn.Module, src: nn.Module, dst_name: str, src_name: str) -> int:
    """Copy every parameter and buffer of ``src`` into ``dst`` bitwise; returns params copied."""
    dst_state, src_state = dst.state_dict(), src.state_dict()
    if dst_state.keys() != src_state.keys():
        missing = sorted(src_state.keys() ^ dst_state.keys())[:3]
        raise ValueError(
            f"cannot copy {src_name} into {dst_name}: their tensors differ ({missing}); "
            "source and target must be built with the same layers"
        )
    for key, value in src_state.items():
        if dst_state[key].shape != value.shape:
            raise ValueError(
                f"different widths: {src_name}.{key} is {tuple(value.shape)} in the source but "
                f"{dst_name}.{key} is {tuple(dst_state[key].shape)} in the target; build the "
                "target with the source's width_mult, stem, in_chans and num_classes"
            )
    with torch.no_grad():
        for key, value in src_state.items():
            dst_state[key].copy_(value)
    return sum(p.numel() for p in src.parameters())


def _zero_output(proj: nn.Module) -> None:
    """Silence a block's order: zero the scale and shift of its up-projection's BatchNorm."""
    with torch.no_grad():
        proj.bn.weight.zero_()
        proj.bn.bias.zero_()


def _grow_block(
    dst: InceptionBlock,
    src: InceptionBlock,
    dst_name: str,
    src_name: str,
    zero_init: bool,
    growth: GrowthMap,
) -> set[int]:
    """Copy a trained block into a kept unit; returns the orders started at zero output."""
    copied = _copy_tensors(dst.convs, src.convs, f"{dst_name}.convs", f"{src_name}.convs")
    kept = min(dst.num_orders, src.num_orders)
    orders = "" if dst.num_orders == 1 else _orders_text(kept)
    entries = [GrowthEntry("copied", f"{dst_name}{orders}", f"{src_name}{orders}")]
    zeroed = set()
    for order in range(dst.num_orders):
        src_order = order if order < src.num_orders else 0
        for part in ("norms", "proj"):
            copied += _copy_tensors(
                getattr(dst, part)[order],
                getattr(src, part)[src_order],
                f"{dst_name}.{part}.{order}",
                f"{src_name}.{part}.{src_order}",
            )
        if order >= src.num_orders:
            detail = "norms and up-projection of the trained order 0"
            if zero_init:
                _zero_output(dst.proj[order])
                zeroed.add(order)
                detail += ", up-projection zeroed"
            entries.append(
                GrowthEntry("shared", f"{dst_name}[order {order}]", f"{src_name}[order 0]", detail)
            )
    growth.entries.extend(entries)
    growth.copied_params += copied
    return zeroed


def _init_block(block: InceptionBlock, name: str, zero_init: bool, growth: GrowthMap) -> None:
    if zero_init:
        for proj in block.proj:
            _zero_output(proj)
    growth.entries.append(
        GrowthEntry("initialised", name, None, "zero output" if zero_init else "random")
    )


def _orders_text(count: int) -> str:
    return "[order 0]" if count == 1 else f"[orders 0-{count - 1}]"


def _path_text(path: Sequence[tuple[str, int]]) -> str:
    return format_word(tuple(letter for letter, _ in reversed(path)))


def _check_unit_function(
    dst: PolyInception,
    src: PolyInception,
    name: str,
    silent: set[tuple[str, int]],
    growth: GrowthMap,
) -> None:
    """Record why a kept unit would not compute its source unit's function, if it would not.

    A path is silent when its last block (the leftmost letter) starts at zero output.
    """
    if dst.scale != src.scale:
        growth.reasons.append(
            f"{name}: residual scale {dst.scale} differs from the source's {src.scale}"
        )
    live = {path for path in dst.polynomial.paths() if path[-1] not in silent}
    extra = sorted(live - set(src.polynomial.paths()))
    if extra:
        words = ", ".join(_path_text(p) for p in extra)
        hint = (
            "; grow with sharing='released' so higher powers start silent"
            if dst.sharing == "full" and any(len({letter for letter, _ in p}) == 1 for p in extra)
            else ""
        )
        growth.reasons.append(f"{name}: path(s) {words} are not silent at the start{hint}")
    if dst.sharing != src.sharing and any(len(p) > 1 for p in src.polynomial.paths()):
        growth.reasons.append(
            f"{name}: sharing {dst.sharing!r} differs from the source's {src.sharing!r}, "
            "which changes how its longer paths are computed"
        )


def _unit_names(model: PolyNet) -> list[str]:
    """State-dict prefixes of the units, bottom to top (``stage_b.2``)."""
    stages = (("a", model.stage_a), ("b", model.stage_b), ("c", model.stage_c))
    return [f"stage_{stage}.{i}" for stage, units in stages for i in range(len(units))]


def _grow_units(source: PolyNet, target: PolyNet, growth: GrowthMap) -> None:
    names, src_names = _unit_names(target), _unit_names(source)
    zero_init = growth.zero_init
    for dst, name, index in zip(target.units, names, growth.unit_sources, strict=True):
        if index is None:
            letters = ", ".join(dst.blocks)
            detail = f"{dst.expression}; blocks {letters} "
            detail += "zero output, the unit starts as the identity" if zero_init else "random"
            growth.entries.append(GrowthEntry("inserted", name, None, detail))
            if zero_init:
                for block in dst.blocks.values():
                    for proj in block.proj:
                        _zero_output(proj)
            else:
                growth.reasons.append(f"{name}: inserted unit starts with random blocks")
            if zero_init and not isinstance(dst.act, nn.ReLU):
                growth.reasons.append(
                    f"{name}: inserted unit ends with {type(dst.act).__name__}, not ReLU, so a "
                    "silent residual is not the identity"
                )
            continue
        src, src_name = source.units[index], src_names[index]
        missing = sorted(set(src.polynomial.paths()) - set(dst.polynomial.paths()))
        if missing:
            raise ValueError(
                f"target unit {name} ({dst.expression}) lacks the path(s) "
                f"{', '.join(_path_text(p) for p in missing)} of its source unit {src_name} "
                f"({src.expression}); growing never removes trained paths"
            )
        silent: set[tuple[str, int]] = set()
        for letter, block in dst.blocks.items():
            block_name = f"{name}.blocks.{letter}"
            if letter in src.blocks:
                orders = _grow_block(
                    block,
                    src.blocks[letter],
                    block_name,
                    f"{src_name}.blocks.{letter}",
                    zero_init,
                    growth,
                )
                silent.update((letter, order) for order in orders)
            else:
                _init_block(block, block_name, zero_init, growth)
                if zero_init:
                    silent.update((letter, order) for order in range(block.num_orders))
        _check_unit_function(dst, src, name, silent, growth)


def grow(
    source_model: nn.Module,
    target_spec_or_model: str | NetworkSpec | nn.Module,
    zero_init: bool = False,
    **model_kwargs: Any,
) -> tuple[PolyNet, GrowthMap]:
    """Grow a trained PolyNet into a deeper or richer one by insertion (paper, Fig. 9).

    Kept units receive their source unit's blocks (``F`` and any other letter both have);
    letters only the target has are new blocks; new units are interleaved between the old
    ones (:func:`interleaved_slots`). The stem, reductions and classifier are copied bitwise.

    Args:
        source_model: The trained PolyNet.
        target_spec_or_model: A registered model name (``"polynet_6_12_6_mixed"``), a network
            spec (``"A: mpoly-2 x2 | B: ir x4 | C: 2-way x2"``) or a built PolyNet whose
            weights are overwritten. A name or spec is built with the source's width,
            stem, input channels, classes, sharing and residual scales (an inserted unit takes
            the scale of the old unit below it).
        zero_init: Start every new block at zero output, so the grown model computes the
            source's function (see :attr:`GrowthMap.preserves_function`).
        **model_kwargs: Constructor overrides for a target given by name or spec (e.g.
            ``sharing="released"``, ``width_mult=`` when it cannot be inferred).

    Returns:
        The grown model (in the source's train/eval mode) and its :class:`GrowthMap`.

    Raises:
        ValueError: For incompatible models: different widths, stage counts, block types,
            stems, inputs or classes, a target stage with fewer units than the source's, or
            a kept unit without one of its source unit's paths.

    """
    source = _check_polynet(source_model, "source")
    if isinstance(target_spec_or_model, nn.Module):
        if model_kwargs:
            raise ValueError(
                "model_kwargs only apply when the target is a name or spec, not a built model"
            )
        target = _check_polynet(target_spec_or_model, "target")
        unit_sources = _unit_slots(source, target.spec)
        name = (getattr(target, "pretrained_cfg", None) or {}).get("architecture")
        name, config = name if name in MODELS else "polynet", target.config
    else:
        target, name, config, unit_sources = _build_target(
            source, target_spec_or_model, model_kwargs
        )
    for what in ("stem", "stem_stride"):
        have, want = getattr(source.config, what), getattr(target.config, what)
        if have != want:
            raise ValueError(
                f"different {what}: source {have!r}, target {want!r}; build the target with "
                f"the source's {what}"
            )
    for what in ("in_chans", "num_classes"):
        if getattr(source, what) != getattr(target, what):
            raise ValueError(
                f"different {what}: source {getattr(source, what)}, target "
                f"{getattr(target, what)}; build the target with {what}={getattr(source, what)}"
            )
    src_widths = [f["num_chs"] for f in source.feature_info]
    tgt_widths = [f["num_chs"] for f in target.feature_info]
    if src_widths != tgt_widths:
        raise ValueError(
            f"different widths: source stages are {src_widths} channels, target {tgt_widths}; "
            "build the target with the source's width_mult"
        )

    growth = GrowthMap(
        source_spec=source.spec,
        target_spec=target.spec,
        zero_init=zero_init,
        unit_sources=tuple(unit_sources),
        model_name=name,
        model_config=config,
    )
    for part in ("stem", "reduction_a", "reduction_b", "last_linear"):
        growth.copied_params += _copy_tensors(
            getattr(target, part), getattr(source, part), part, part
        )
        growth.entries.append(GrowthEntry("copied", part, part))
    _grow_units(source, target, growth)
    growth.entries.sort(key=lambda e: _order_key(e.target))  # forward order, stable in a unit
    growth.new_params = sum(p.numel() for p in target.parameters()) - growth.copied_params
    target.train(source.training)
    return target, growth


def _order_key(name: str) -> tuple[int, int]:
    """Forward order of a map entry: part, then unit index."""
    head, _, rest = name.partition(".")
    part = PARTS.index(head)
    unit = int(rest.split(".")[0]) if rest[:1].isdigit() else 0
    return part, unit
