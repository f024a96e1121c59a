"""The released port's state-dict layout (``pretrainedmodels``' PolyNet, polynet-f71d82a5.pth).

The map between our keys and the port's is derived from the two module structures, one rule per
kind of module (stem, reduction, k-way unit, released poly-k unit), not by position. This
module builds on the blocks only; the loading layer applies it to weights files
(:mod:`polynet.io.weights`) and to state dicts given to a model's ``load_state_dict``
(:func:`rename_port_keys`, installed into the model by :mod:`polynet.io.weights`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from polynet.model.blocks import ImageNetStem, InceptionBlock, Mixed
from polynet.model.modules import PolyInception
from polynet.model.registry import PORT_MODEL

__all__ = ["PORT_MODEL", "from_port_layout", "port_key_map", "rename_port_keys", "to_port_layout"]


def _conv_norm(leaves: dict[str, str], ours: str, port: str) -> None:
    """Map a ConvNormAct onto the port's BasicConv2d: the same ``conv`` / ``bn`` children."""
    leaves[f"{ours}.conv"] = f"{port}.conv"
    leaves[f"{ours}.bn"] = f"{port}.bn"


def _mixed(leaves: dict[str, str], mixed: Mixed, ours: str, port_names: list[str]) -> None:
    """Map concatenated branches onto the port's named modules.

    A one-conv branch is the port's module itself, a longer branch an ``nn.Sequential`` indexed
    by position. Pool branches carry no tensors.
    """
    for b, (branch, name) in enumerate(zip(mixed.branches, port_names, strict=True)):
        if isinstance(branch, nn.MaxPool2d):
            continue
        for j in range(len(branch)):
            port = name if len(branch) == 1 else f"{name}.{j}"
            _conv_norm(leaves, f"{ours}.branches.{b}.{j}", port)


def _kway_block(leaves: dict[str, str], block: InceptionBlock, ours: str, port: str) -> None:
    """Map a plain block (one order) onto the port's BlockA/B/C: ``path{b}[.j]``, ``conv2d``."""
    for b, convs in enumerate(block.convs):
        for j in range(len(convs)):
            name = f"{port}.path{b}" if len(convs) == 1 else f"{port}.path{b}.{j}"
            leaves[f"{ours}.convs.{b}.{j}"] = f"{name}.conv"
            leaves[f"{ours}.norms.0.{b}.{j}"] = f"{name}.bn"
    _conv_norm(leaves, f"{ours}.proj.0", f"{port}.conv2d")


def _poly_block(leaves: dict[str, str], block: InceptionBlock, ours: str, port: str) -> None:
    """Map a released poly-k block onto the port's ``InceptionResNet{B,C}Poly``.

    A shared conv is a ``PolyConv2d`` named ``path{b}`` (one-conv branch) or
    ``path{b}_{kh}x{kw}`` after its kernel, holding one BatchNorm per order in ``bn_blocks``;
    the up-projections are ``conv2d_blocks.{order}``.
    """
    for b, convs in enumerate(block.convs):
        for j, conv in enumerate(convs):
            kh, kw = conv.kernel_size
            name = f"{port}.path{b}" if len(convs) == 1 else f"{port}.path{b}_{kh}x{kw}"
            leaves[f"{ours}.convs.{b}.{j}"] = f"{name}.conv"
            for order in range(block.num_orders):
                leaves[f"{ours}.norms.{order}.{b}.{j}"] = f"{name}.bn_blocks.{order}"
    for order in range(block.num_orders):
        _conv_norm(leaves, f"{ours}.proj.{order}", f"{port}.conv2d_blocks.{order}")


def _unit(leaves: dict[str, str], unit: PolyInception, name: str) -> None:
    terms = unit.polynomial.terms
    if all(len(term) == 1 for term in terms):  # k-way: I + F + G + ..., the port's MultiWay
        for i, letter in enumerate(unit.polynomial.letters):
            _kway_block(
                leaves, unit.blocks[letter], f"{name}.blocks.{letter}", f"{name}.blocks.{i}"
            )
        return
    letters = unit.polynomial.letters
    is_poly = len(letters) == 1 and terms == tuple(
        (letters[0],) * k for k in range(1, len(terms) + 1)
    )
    if is_poly and unit.sharing == "released":
        _poly_block(leaves, unit.blocks[letters[0]], f"{name}.blocks.{letters[0]}", name)
        return
    raise ValueError(
        f"unit {name} ({unit.expression}, sharing={unit.sharing!r}) has no counterpart in the "
        "released port, which has only k-way units and poly-k units with released sharing"
    )


def port_key_map(model: nn.Module) -> dict[str, str]:
    """Map every state-dict key of a PolyNet onto the released port's key.

    The map is built from both module structures: the stem's and reductions' branches by
    position and port name, 2-way units onto ``blocks.{i}``, released poly-3 units onto the
    port's shared ``PolyConv2d`` layout. For ``polynet_very_deep`` it covers all 3,104 keys.

    Args:
        model: A PolyNet with the ImageNet stem whose units are k-way or released poly-k.

    Returns:
        Our key -> the port's key, in our state-dict order.

    Raises:
        ValueError: If the model has parts the port cannot express.

    """
    # Any model laid out as a PolyNet (this module builds on the blocks, not on the network).
    if not hasattr(model, "stage_a") or not isinstance(getattr(model, "stem", None), ImageNetStem):
        raise ValueError(
            f"{type(model).__name__} has no released-port layout: only PolyNets with the "
            f"ImageNet stem (such as {PORT_MODEL}) map onto it"
        )
    leaves: dict[str, str] = {}
    for i in range(3):  # the port keeps the first three convs in one nn.Sequential
        _conv_norm(leaves, f"stem.conv{i + 1}", f"stem.conv1.{i}")
    stem = model.stem
    _mixed(leaves, stem.mixed1, "stem.mixed1", ["stem.conv1_pool_branch", "stem.conv1_branch"])
    _mixed(leaves, stem.mixed2, "stem.mixed2", ["stem.conv2_short", "stem.conv2_long"])
    _mixed(leaves, stem.mixed3, "stem.mixed3", ["stem.conv2_pool_branch", "stem.conv2_branch"])
    for name in ("reduction_a", "reduction_b"):
        mixed = getattr(model, name)
        _mixed(leaves, mixed, name, [f"{name}.path{b}" for b in range(len(mixed.branches))])
    for stage in ("stage_a", "stage_b", "stage_c"):
        for i, unit in enumerate(getattr(model, stage)):
            _unit(leaves, unit, f"{stage}.{i}")
    leaves["last_linear"] = "last_linear"

    key_map = {}
    for key in model.state_dict():
        module, _, tensor = key.rpartition(".")
        if module not in leaves:  # a module the rules above forgot: a bug, not a user error
            raise AssertionError(f"no port name for {key}")
        key_map[key] = f"{leaves[module]}.{tensor}"
    return key_map


def to_port_layout(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, Any]:
    """Rename a state dict of ``model`` (our layout) to the released port's keys."""
    key_map = port_key_map(model)
    return {key_map[k]: v for k, v in state_dict.items()}


def from_port_layout(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module
) -> dict[str, torch.Tensor]:
    """Rename a state dict in the port's layout to ``model``'s keys.

    Keys the port layout does not have are kept under their own name, so that the strict
    check that follows reports them as unexpected.
    """
    inverse = {port: ours for ours, port in port_key_map(model).items()}
    return {inverse.get(k, k): v for k, v in state_dict.items()}


def is_port_layout(keys: set[str], model: nn.Module) -> bool:
    """Whether a state dict's ``keys`` are more the port's than ``model``'s own."""
    try:
        port_keys = set(port_key_map(model).values())
    except ValueError:
        return False
    own_keys = set(model.state_dict())
    return len(keys & port_keys) > len(keys & own_keys)


# The first convolution's key in the released port's layout; ours is stem.conv1.conv.weight.
_PORT_ONLY_KEY = "stem.conv1.0.conv.weight"


def rename_port_keys(model: nn.Module, state_dict: dict[str, Any], prefix: str) -> None:
    """Rename the released port's keys to ours, in place, before a plain ``load_state_dict``.

    timm's ``checkpoint_path=`` loads the file that way; :func:`polynet.io.weights.fit_state_dict`
    renames for every other loader. BatchNorm itself fills the counters the 2017 file lacks.
    """
    if f"{prefix}{_PORT_ONLY_KEY}" not in state_dict:
        return
    for ours, port in port_key_map(model).items():
        if prefix + port in state_dict:
            state_dict[prefix + ours] = state_dict.pop(prefix + port)
