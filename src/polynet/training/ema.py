"""The moving average of the weights: timm's ``ModelEmaV3`` without its per-step walk.

timm's update walks ``state_dict()`` of both models on every step to pair their tensors (two
recursive walks building ordered dicts: about 3 ms a step for the quick-start model, whose
whole step is about 125 ms on two cores). The pairs never change while a model trains, so they
are found once, as slots (a module's ``_parameters`` or ``_buffers`` dict and a key) rather than
as tensors: a slot also follows a tensor that ``.to()`` or ``load_state_dict(assign=True)``
replaces. The arithmetic is timm's own (``_foreach_lerp_`` with its warm-up decay).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from timm.utils import ModelEmaV3
from torch import nn

Slot = tuple[dict[str, Any], str]


def state_slots(model: nn.Module) -> list[Slot]:
    """The (dict, key) slot of every distinct tensor of ``model.state_dict()``, in its order.

    A tensor shared by two modules (PolyNet's shared blocks) has one slot: ``state_dict()``
    lists it under each name, and averaging each name would move it twice a step.
    """
    slots: list[Slot] = []
    seen: set[int] = set()
    for module in model.modules():
        persistent = [
            (module._buffers, k)
            for k in module._buffers
            if k not in module._non_persistent_buffers_set
        ]
        for slot in [(module._parameters, k) for k in module._parameters] + persistent:
            tensor = slot[0][slot[1]]
            if tensor is not None and id(tensor) not in seen:
                seen.add(id(tensor))
                slots.append(slot)
    return slots


class ModelEma(ModelEmaV3):
    """timm's ``ModelEmaV3`` (same decay, warm-up and checkpoints) pairing tensors once.

    Args:
        model: The model being trained (copied).
        **kwargs: ``ModelEmaV3``'s (``decay``, ``use_warmup``, ...).

    """

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        # The trained model (weakly: another model is paired anew) and the (average's, its)
        # slot of every tensor.
        self._pairs: tuple[weakref.ref, list[tuple[Slot, Slot]]] | None = None

    def _slot_pairs(self, model: nn.Module) -> list[tuple[Slot, Slot]]:
        if self._pairs is None or self._pairs[0]() is not model:
            ema_slots, model_slots = state_slots(self.module), state_slots(model)
            if len(ema_slots) != len(model_slots):
                raise ValueError(
                    f"the averaged model has {len(ema_slots)} tensors and the trained one "
                    f"{len(model_slots)}: average the model the average was made from"
                )
            self._pairs = (weakref.ref(model), list(zip(ema_slots, model_slots, strict=True)))
        return self._pairs[1]

    def apply_update_(self, model: nn.Module, decay: float) -> None:
        """Move the average towards ``model`` by ``1 - decay`` (integer buffers are copied)."""
        if not self.foreach:
            super().apply_update_(model, decay)
            return
        ema_values, model_values = [], []
        with torch.no_grad():
            for (ema_dict, ema_key), (model_dict, model_key) in self._slot_pairs(model):
                ema_v, model_v = ema_dict[ema_key], model_dict[model_key]
                if ema_v.is_floating_point():
                    ema_values.append(ema_v)
                    model_values.append(model_v)
                else:
                    ema_v.copy_(model_v)
            self._foreach_lerp_(ema_values, model_values, weight=1.0 - decay)
