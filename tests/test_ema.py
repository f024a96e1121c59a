"""The weight average pairs its tensors once and still averages exactly like timm's."""

import pytest
import torch
from timm.utils import ModelEmaV3

from _shared import TINY
from polynet.model.zoo import create_model
from polynet.training.ema import ModelEma, state_slots


def _small(sharing: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("polynet_small", num_classes=10, sharing=sharing, **TINY)


def _train_a_little(model: torch.nn.Module, seed: int) -> None:
    """Move weights and BatchNorm statistics (running means and the integer counters)."""
    torch.manual_seed(seed)
    model.train()
    model(torch.randn(4, 1, 32, 32))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.01)


def test_the_average_equals_timms_bitwise_where_no_tensor_is_shared():
    trained = _small("released")
    assert len(state_slots(trained)) == len(trained.state_dict())  # nothing shared
    ours = ModelEma(trained, decay=0.99, use_warmup=True)
    timms = ModelEmaV3(trained, decay=0.99, use_warmup=True)
    for step in range(1, 6):
        _train_a_little(trained, step)
        ours.update(trained, step=step)
        timms.update(trained, step=step)
    mine, theirs = ours.module.state_dict(), timms.module.state_dict()
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key
    moved = [k for k in mine if mine[k].is_floating_point()]
    assert any(not torch.equal(mine[k], trained.state_dict()[k]) for k in moved)


def test_a_shared_tensor_moves_once_a_step():
    trained = _small("norms")
    names = list(trained.state_dict())
    assert len(state_slots(trained)) < len(names)  # "norms" shares a tensor between two names
    ema = ModelEma(trained, decay=0.9)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    _train_a_little(trained, 1)
    ema.update(trained)  # no step: the full decay
    after, now = ema.module.state_dict(), trained.state_dict()
    for key in names:
        if after[key].is_floating_point():
            expected = torch.lerp(before[key], now[key], 0.1)
            torch.testing.assert_close(after[key], expected, msg=key)


def test_the_pairs_follow_a_tensor_that_is_replaced():
    trained = _small("released")
    ema = ModelEma(trained, decay=0.5)
    ema.update(trained)  # the pairs are found here
    trained.load_state_dict(
        {k: torch.full_like(v, 3) for k, v in trained.state_dict().items()}, assign=True
    )  # new tensor objects in the same slots
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    ema.update(trained)
    for key, value in ema.module.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(
                value, torch.lerp(before[key], torch.full_like(value, 3), 0.5)
            )
        else:
            assert torch.all(value == 3), key


def test_a_different_model_is_refused_with_the_reason():
    ema = ModelEma(_small("released"), decay=0.5)
    with pytest.raises(ValueError, match="average the model the average was made from"):
        ema.update(_small("full"))
