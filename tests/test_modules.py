import random
from functools import partial

import pytest
import torch
from torch import nn

from polynet import PolyInception
from polynet.model.algebra import PAPER_MODULES
from polynet.model.blocks import IR_A, InceptionBlock
from polynet.model.cost import count_macs

CHS = 16
BLOCK = partial(InceptionBlock, CHS, IR_A, 0.25)


def _unit(expression, sharing="full", scale=0.3):
    torch.manual_seed(0)
    unit = PolyInception(expression, BLOCK, scale=scale, sharing=sharing).double().eval()
    for m in unit.modules():  # non-trivial BatchNorm statistics, so orders really differ
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return unit


def _x(batch=2):
    return torch.randn(
        batch, CHS, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )


@pytest.mark.parametrize("sharing", ["full", "released", "norms"])
@pytest.mark.parametrize("module", ["ir", *PAPER_MODULES, "poly-4", "mpoly-4", "4-way"])
def test_cascaded_equals_naive_for_named_modules(module, sharing):
    unit = _unit(module, sharing)
    x = _x()
    torch.testing.assert_close(unit(x), unit.forward_naive(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed", range(12))
def test_cascaded_equals_naive_for_random_expressions(seed):
    rng = random.Random(seed)
    words = {"".join(rng.choice("FGH") for _ in range(rng.randint(1, 3))) for _ in range(5)}
    unit = _unit("I + " + " + ".join(sorted(words)), rng.choice(["full", "released", "norms"]))
    x = _x()
    torch.testing.assert_close(unit(x), unit.forward_naive(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "module,ratio", [("poly-2", 2 / 3), ("mpoly-2", 2 / 3), ("poly-3", 1 / 2), ("mpoly-3", 1 / 2)]
)
def test_cascaded_macs_are_the_papers_fraction_of_naive(module, ratio):
    unit = _unit(module)
    x = _x(1)

    class Naive(nn.Module):
        def forward(self, x):
            return unit.forward_naive(x)

    assert count_macs(unit, x) / count_macs(Naive(), x) == pytest.approx(ratio, abs=0)
    assert unit.num_block_evals == {"poly-2": 2, "mpoly-2": 2}.get(module, 3)


def test_sharing_modes_differ_in_parameters_as_the_paper_and_the_release_say():
    full, released = _unit("poly-3", "full"), _unit("poly-3", "released")
    mpoly = _unit("mpoly-3")
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    block = n(BLOCK())
    assert n(full) == block  # one F, shared by all powers
    assert n(mpoly) == 3 * block  # three independent blocks
    assert block < n(released) < 3 * block  # shared convs, per-order norms and projections
    norms = _unit("poly-3", "norms")
    bn_params = sum(p.numel() for m in BLOCK().modules() if isinstance(m, nn.BatchNorm2d)
                    for p in m.parameters())  # fmt: skip
    assert n(norms) == block + 2 * bn_params  # every weight shared, two more sets of norms


def test_norms_sharing_is_the_papers_poly_k_with_a_batchnorm_per_power():
    full, norms = _unit("poly-2", "full"), _unit("poly-2", "norms")
    block = norms.blocks["F"]
    assert block.proj[1].conv is block.proj[0].conv
    # With equal norms in both powers it computes exactly the fully shared F(F(x)).
    shared = full.blocks["F"]
    for order in range(2):
        block.norms[order].load_state_dict(shared.norms[0].state_dict())
        block.proj[order].bn.load_state_dict(shared.proj[0].bn.state_dict())
    x = _x()
    torch.testing.assert_close(norms(x), full(x), rtol=0, atol=1e-12)
    # In training each power keeps its own running statistics: x and F(x) differ.
    norms.train()(x)
    first, second = (block.proj[order].bn.running_mean for order in range(2))
    assert not torch.allclose(first, second)


def test_residual_scale_multiplies_every_path():
    unit = PolyInception("I + F + G", {"F": nn.Identity(), "G": nn.Identity()}, scale=0.3)
    x = torch.rand(1, 2, 3, 3)  # non-negative so the final ReLU is the identity
    torch.testing.assert_close(unit(x), x + 0.3 * (x + x))


def test_letter_without_block_is_an_error():
    with pytest.raises(ValueError, match="letter 'G' has no block"):
        PolyInception("I + F + GF", {"F": nn.Identity()})


def test_bad_sharing_and_drop_probability():
    with pytest.raises(ValueError, match="sharing"):
        PolyInception("2-way", BLOCK, sharing="some")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        PolyInception("2-way", BLOCK, drop_prob=1.0)


def test_stochastic_paths_drop_whole_paths_per_sample_with_inverted_scaling():
    torch.manual_seed(0)
    ones = {"F": nn.Identity(), "G": nn.Identity()}
    unit = PolyInception("I + F + G", ones, scale=1.0, drop_prob=0.5).train()
    x = torch.ones(4000, 1, 1, 1)
    residual = (unit(x) - x).flatten()
    # Each path contributes 0 (dropped) or 1 / keep = 2 (kept): sums 0, 2 or 4 only.
    assert set(residual.unique().tolist()) <= {0.0, 2.0, 4.0}
    assert residual.mean().item() == pytest.approx(2.0, abs=0.1)  # expectation unchanged
    assert (residual == 0).float().mean().item() == pytest.approx(0.25, abs=0.03)
    unit.eval()
    torch.testing.assert_close(unit(x) - x, torch.full_like(x, 2.0))  # eval: nothing dropped
