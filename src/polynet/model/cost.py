"""Cost accounting: parameters and multiply-accumulates per stage and per module type.

MACs are counted by PyTorch's own ``FlopCounterMode`` (convolutions and matrix products, as in
the paper's cost axes), halved from FLOPs, at the model's input size.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from polynet.model.network import PARTS, PolyNet


@dataclass
class Cost:
    """Parameters and MACs of one part of a network.

    Attributes:
        params: Trainable and non-trainable parameter count (buffers excluded).
        macs: Multiply-accumulates for one image.
        count: How many modules were summed (units of a module type, 1 for a part).

    """

    params: int = 0
    macs: int = 0
    count: int = 0


@dataclass
class CostReport:
    """Cost of a whole network at one input size.

    Attributes:
        input_size: (C, H, W) the MACs were counted at.
        total: The whole network.
        parts: Stem, each stage, each reduction and the classifier.
        module_types: Per PolyInception polynomial (e.g. ``I + F + G``), over all units.

    """

    input_size: tuple[int, int, int]
    total: Cost
    parts: dict[str, Cost] = field(default_factory=dict)
    module_types: dict[str, Cost] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """A JSON-able dict."""
        return asdict(self)

    def format(self) -> str:
        """A human-readable table."""
        lines = [f"input {'x'.join(map(str, self.input_size))}"]
        row = "{:<28} {:>6} {:>14} {:>12}"
        lines.append(row.format("part", "units", "params", "GMACs"))
        for name, cost in [*self.parts.items(), ("total", self.total)]:
            lines.append(row.format(name, cost.count, f"{cost.params:,}", f"{cost.macs / 1e9:.3f}"))
        lines.append("")
        lines.append(row.format("module type", "units", "params", "GMACs"))
        for name, cost in self.module_types.items():
            lines.append(row.format(name, cost.count, f"{cost.params:,}", f"{cost.macs / 1e9:.3f}"))
        return "\n".join(lines)


def count_params(module: nn.Module) -> int:
    """Distinct parameters of a module (shared tensors counted once)."""
    return sum(p.numel() for p in module.parameters())


def count_macs(module: nn.Module, *inputs: torch.Tensor) -> int:
    """MACs of one forward call of ``module`` on ``inputs``."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return counter.get_total_flops() // 2


def model_cost(model: PolyNet, input_size: tuple[int, int, int] | None = None) -> CostReport:
    """Parameters and MACs of a PolyNet, per part and per module type, for one image.

    Args:
        model: The network; it is run once in eval mode on a zero image (build it on the
            ``meta`` device to count a large model in a blink).
        input_size: (C, H, W); defaults to the model's ``pretrained_cfg`` input size.

    """
    if input_size is None:
        input_size = tuple(model.pretrained_cfg["input_size"])  # type: ignore[assignment]
    was_training = model.training
    model.eval()
    root = type(model).__name__
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        # On the model's device: a model built on "meta" is counted without any arithmetic.
        model(torch.zeros(1, *input_size, device=next(model.parameters()).device))
    model.train(was_training)
    flops = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}

    def macs_of(path: str) -> int:
        return flops.get(f"{root}.{path}", 0) // 2

    parts = {}
    for part in PARTS:
        module = getattr(model, part)
        count = len(module) if part.startswith("stage") else 1
        parts[part] = Cost(count_params(module), macs_of(part), count)
    module_types: dict[str, Cost] = defaultdict(Cost)
    for stage in ("stage_a", "stage_b", "stage_c"):
        for i, unit in enumerate(getattr(model, stage)):
            cost = module_types[f"{stage[-1].upper()}: {unit.expression}"]
            cost.params += count_params(unit)
            cost.macs += macs_of(f"{stage}.{i}")
            cost.count += 1
    total = Cost(count_params(model), counter.get_total_flops() // 2, len(model.units))
    return CostReport(input_size, total, parts, dict(module_types))  # type: ignore[arg-type]
