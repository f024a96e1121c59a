"""Inference fusion (polynet.inference.fuse) and the training-path optimisations keep results."""

import copy

import pytest
import torch
from torch import nn

import polynet
from polynet.inference.fuse import (
    FoldedPolyInception,
    PackedConv2d,
    fold_conv_bn,
    join_convs,
    optimize_for_inference,
)
from polynet.model.blocks import ConvNormAct, InceptionBlock, Mixed
from polynet.model.modules import PolyInception
from polynet.model.network import compile_units

TOL = 1e-4
SMALL = dict(stem="small", width_mult=1 / 16, in_chans=1, num_classes=10, drop_rate=0.0)
MIXED = "A: 3-way | B: (mpoly-3, poly-3) | C: 2-way"


def _randomise_norms(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so that folding has something to fold."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model


CASES = [
    ("polynet_small", {}, 28),  # 2-way, mpoly-2, poly-2 with the small stem
    ("polynet_very_deep", dict(width_mult=1 / 16), 75),  # released poly-3 sharing, 2-way
    ("polynet", dict(spec=MIXED, **SMALL), 28),  # 3-way, mpoly-3, poly-3 with full sharing
    ("polynet", dict(spec=MIXED, sharing="norms", **SMALL), 28),  # a BatchNorm per power
]


@pytest.mark.parametrize("name,kwargs,size", CASES)
def test_fused_model_equals_eval_model(name, kwargs, size):
    torch.manual_seed(0)
    model = _randomise_norms(polynet.create_model(name, **kwargs)).eval()
    x = torch.randn(2, model.in_chans, size, size)
    fused = optimize_for_inference(model)
    with torch.no_grad():
        expected = model(x)
        naive_free = fused(x)
    assert torch.allclose(naive_free, expected, atol=TOL, rtol=0)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    # The original is untouched: still trainable, still with its norms.
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_two_way_unit_joins_entry_convs_and_up_projections():
    model = polynet.create_model("polynet_very_deep", width_mult=1 / 16).eval()
    two_way = model.stage_a[0]
    fused = FoldedPolyInception(two_way)
    firsts = [convs[0] for block in two_way.blocks.values() for convs in block.convs]
    assert len(firsts) == 6  # F and G have three 1x1 branch entries each
    assert fused.root_entry.out_channels == sum(c.out_channels for c in firsts)
    assert fused.leaf_proj.out_channels == two_way.blocks["F"].proj[0].conv.out_channels
    x = torch.randn(2, fused.root_entry.in_channels, 9, 9)
    with torch.no_grad():
        assert torch.allclose(fused(x), two_way(x), atol=TOL, rtol=0)


def test_fold_and_join_are_exact():
    torch.manual_seed(0)
    convs = [nn.Conv2d(4, c, 1, bias=False) for c in (3, 5)]
    bns = [_randomise_norms(nn.BatchNorm2d(c)).eval() for c in (3, 5)]
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        folded = [fold_conv_bn(c, b) for c, b in zip(convs, bns, strict=True)]
        expected = torch.cat([b(c(x)) for c, b in zip(convs, bns, strict=True)], dim=1)
        assert torch.allclose(join_convs(folded)(x), expected, atol=1e-5)
        summed = join_convs(folded[:1] * 2, scales=[0.5, 0.25])
        assert torch.allclose(summed(torch.cat([x, x], 1)), 0.75 * folded[0](x), atol=1e-5)


def test_fold_rejects_norms_without_running_statistics():
    with pytest.raises(ValueError, match="BatchNorm2d"):
        fold_conv_bn(nn.Conv2d(2, 4, 1), nn.GroupNorm(2, 4))


def _outputs_and_grads(model: nn.Module, x: torch.Tensor):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same(a, b):
    assert torch.allclose(a[0], b[0], atol=TOL, rtol=0)
    for name, grad in a[1].items():
        assert torch.allclose(grad, b[1][name], atol=TOL, rtol=0), name


@pytest.mark.parametrize("sharing", ["full", "released"])
def test_inplace_activations_keep_outputs_and_grads(sharing):
    torch.manual_seed(0)
    model = polynet.create_model("polynet", spec=MIXED, sharing=sharing, **SMALL).train()
    reference = copy.deepcopy(model)
    inplace = [m for m in model.modules() if isinstance(m, nn.ReLU) and m.inplace]
    assert inplace  # the optimisation is in effect
    for m in reference.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    x = torch.randn(2, 1, 28, 28)
    _assert_same(_outputs_and_grads(model, x), _outputs_and_grads(reference, x))


def test_grad_checkpointing_keeps_outputs_and_grads():
    torch.manual_seed(0)
    model = polynet.create_model("polynet_small").train()
    checkpointed = copy.deepcopy(model)
    checkpointed.set_grad_checkpointing(True)
    x = torch.randn(2, 1, 28, 28)
    _assert_same(_outputs_and_grads(checkpointed, x), _outputs_and_grads(model, x))
    # The recomputation must not feed the batch into the running statistics a second time.
    buffers = dict(model.named_buffers())
    for name, buffer in checkpointed.named_buffers():
        assert torch.allclose(buffer.float(), buffers[name].float(), atol=1e-6, rtol=0), name


def test_cascaded_equals_naive_after_inplace_change():
    torch.manual_seed(0)
    model = _randomise_norms(polynet.create_model("polynet_small")).eval()
    x = torch.randn(2, 1, 14, 14)
    with torch.no_grad():
        for unit in model.units:
            h = torch.randn(2, unit.blocks["F"].proj[0].conv.out_channels, 7, 7)
            assert torch.allclose(unit(h), unit.forward_naive(h), atol=TOL, rtol=0)
        model(x)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (CPU build)")
@pytest.mark.parametrize(
    "name,kwargs,relus_folded",
    [
        ("polynet_very_deep", dict(width_mult=1 / 16), True),  # released poly-3, 2-way, stem
        ("polynet", dict(spec=MIXED, **{**SMALL, "in_chans": 3}, act_layer="gelu"), False),
    ],
)
def test_prepacked_convolutions_compute_the_same_and_stay_ordinary_modules(
    name, kwargs, relus_folded
):
    torch.manual_seed(0)
    model = _randomise_norms(polynet.create_model(name, **kwargs)).eval()
    plain = optimize_for_inference(model, prepack=False)
    packed = optimize_for_inference(model)
    convs = [m for m in packed.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(m, PackedConv2d) for m in convs)
    relus = sum(isinstance(m, nn.ReLU) for m in packed.modules())
    assert (relus < sum(isinstance(m, nn.ReLU) for m in plain.modules())) == relus_folded
    assert any(m.post_op == "relu" for m in convs) == relus_folded
    x = torch.randn(2, 3, 75, 75)
    with torch.inference_mode():
        expected = plain(x)
        assert torch.allclose(packed(x), expected, atol=1e-5, rtol=0)
        assert torch.allclose(packed(x[:1]), expected[:1], atol=1e-5, rtol=0)  # new shape
    assert packed.state_dict().keys() == plain.state_dict().keys()
    # Gradients take the ordinary path and still flow.
    x.requires_grad_(True)
    packed(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # A copy leaves the packed weight behind; a changed weight is re-packed, not reused stale.
    conv = copy.deepcopy(convs[-1])
    assert hasattr(convs[-1], "_packed") and not hasattr(conv, "_packed")
    h = torch.randn(2, conv.in_channels, 5, 5).contiguous(memory_format=torch.channels_last)
    bias = conv.bias.view(1, -1, 1, 1)
    with torch.inference_mode():
        before = conv(h)
        conv.weight.mul_(2.0)
        assert torch.allclose(conv(h), 2 * (before - bias) + bias, atol=1e-5, rtol=0)


def test_compile_units_compiles_each_unit_kind_once_in_place_and_keeps_results():
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    # The released layout: 40 units whose residual scales all differ.
    model = polynet.create_model("polynet_very_deep", width_mult=1 / 16, drop_rate=0.0)
    model = _randomise_norms(model)
    reference = copy.deepcopy(model)
    keys = model.state_dict().keys()
    torch._dynamo.reset()
    counter = CompileCounter()  # dynamo tracing only, no inductor: fast on any CPU
    compiled = compile_units(model, backend=counter)
    assert compiled is model and model.state_dict().keys() == keys  # no "_orig_mod." prefix
    units = [m for m in model.modules() if isinstance(m, PolyInception)]
    assert len(units) == 40 and all(u._compiled_call_impl is not None for u in units)
    x = torch.randn(2, 3, 75, 75)
    _assert_same(_outputs_and_grads(model.train(), x), _outputs_and_grads(reference.train(), x))
    assert counter.frame_count <= 12  # a graph per unit kind and Mixed part, not one per unit
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), reference.eval()(x), atol=TOL, rtol=0)


@pytest.mark.parametrize("name", [n for n in polynet.list_models() if n != "polynet"])
def test_every_registered_model_fuses_completely(name):
    # On the meta device at width 1/16: the structure (units, sharing, stem, reductions) is the
    # registered model's, and fusing it is a rewrite of that structure.
    model = polynet.create_model(name, device="meta", width_mult=1 / 16)
    fused = optimize_for_inference(model, prepack=False, strict=True)
    left = [
        type(m).__name__
        for m in fused.modules()
        if isinstance(m, (nn.BatchNorm2d, PolyInception, InceptionBlock, Mixed, ConvNormAct))
    ]
    assert not left, f"{name}: {len(left)} parts unfused, e.g. {left[:3]}"


def test_a_part_that_cannot_fold_is_named_loudly_and_refused_with_strict():
    from polynet.inference.fuse import FusionError, FusionWarning

    model = polynet.create_model("polynet_small", norm_layer="layernorm2d").eval()
    x = torch.randn(2, 1, 28, 28)
    with pytest.warns(FusionWarning, match=r"left 8 parts unfused.*stem\.conv1: cannot fold"):
        fused = optimize_for_inference(model)
    assert torch.allclose(fused(x), model(x), atol=TOL)  # the unfused parts run as built
    with pytest.raises(FusionError, match="cannot fold LayerNorm2d"):
        optimize_for_inference(model, strict=True)


def test_packed_weights_are_reused_across_batch_sizes():
    conv = PackedConv2d(16, 24, 3, padding=1).eval()
    reference = nn.Conv2d(16, 24, 3, padding=1).eval()
    reference.load_state_dict(conv.state_dict())
    with torch.no_grad():
        if not conv._use_packed(torch.randn(1, 16, 9, 9)):
            pytest.skip("this PyTorch has no oneDNN")
    packs = []
    real = torch._C._nn.mkldnn_reorder_conv2d_weight

    def counted(*args):
        packs.append(args[-1])
        return real(*args)

    torch._C._nn.mkldnn_reorder_conv2d_weight = counted
    try:
        with torch.no_grad():
            for n in (36, 1, 7, 36):  # multi-crop batches vary in size
                x = torch.randn(n, 16, 9, 9)
                assert torch.allclose(conv(x), reference(x), atol=TOL)
    finally:
        torch._C._nn.mkldnn_reorder_conv2d_weight = real
    assert len(packs) == 1


def test_drop_probabilities_are_tensors_and_cause_no_recompiles():
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    model = polynet.create_model("polynet_very_deep", width_mult=1 / 16, drop_rate=0.0)
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.reset()
    counter = CompileCounter()
    compile_units(model, backend=counter)
    assert torch._dynamo.config.recompile_limit == limit  # dynamo's limits are left alone
    x = torch.randn(2, 3, 75, 75)
    model.train().set_path_drop(0.25)  # 0 at the first unit rising to 0.25: 40 rates
    model(x).sum().backward()
    frames = counter.frame_count
    assert frames <= 14  # a graph per unit kind (dropping or not) and Mixed part
    model.set_path_drop(0.1)
    model(x).sum().backward()
    assert counter.frame_count == frames  # new rates, no new graph
