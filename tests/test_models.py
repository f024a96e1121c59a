"""The model contract, parametrised over the registry rather than written per model."""

import pytest
import timm
import torch

import polynet
from polynet.model.cost import count_macs, count_params, model_cost
from polynet.model.network import released_scales

ALL = polynet.list_models()
# The contract checks run on a narrow instance of each registered topology (same spec, stem,
# sharing and scales; width 1/8) so that the whole registry stays fast on a 2-core CPU.
NARROW = dict(width_mult=0.125)


def _input(model, batch=2):
    size = model.min_input_size if model.min_input_size > 8 else 28
    return torch.randn(
        batch, model.in_chans, size, size, generator=torch.Generator().manual_seed(0)
    )


def _narrow(name, **kwargs):
    torch.manual_seed(0)
    return polynet.create_model(name, **{**NARROW, "drop_rate": 0.0, **kwargs})


def test_registry_has_the_issue_models():
    required = {
        "polynet_very_deep", "polynet_ir_3_6_3", "polynet_ir_5_10_5", "polynet_ir_6_12_6",
        "polynet_ir_20_56_20", "polynet_6_12_6_mixed", "polynet_6_12_6_poly3",
        "polynet_6_12_6_mpoly3", "polynet_6_12_6_3way", "polynet_small", "polynet_small_ir",
    }  # fmt: skip
    required |= {
        f"polynet_3_6_3_{s}_{m}"
        for s in "abc"
        for m in ("2way", "3way", "poly2", "poly3", "mpoly2", "mpoly3")
    }
    assert required <= set(ALL)


def test_very_deep_polynet_matches_the_released_layout():
    model = polynet.create_model("polynet_very_deep").eval()
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(model) == 95_366_600
    assert n(model.stem) == 605_728
    assert n(model.reduction_a) == 2_902_528
    assert n(model.reduction_b) == 3_542_784
    assert n(model.last_linear) == 2_049_000
    assert {n(u) for u in model.stage_a} == {275_904}
    assert [n(u) for u in model.stage_b[:2]] == [2_065_088, 2_346_112]
    assert [n(u) for u in model.stage_c[:2]] == [3_857_472, 4_021_632]
    assert [u.scale for u in model.units] == [round(1 - 0.3 * i / 39, 6) for i in range(40)]
    assert model.units[-1].scale == 0.7
    assert model.pretrained_cfg["input_size"] == (3, 331, 331)
    assert model.pretrained_cfg["crop_mode"] == "squash"
    assert round(331 / model.pretrained_cfg["crop_pct"]) == 378


def test_very_deep_feature_shapes_at_331():
    model = polynet.create_model("polynet_very_deep", features_only=True).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 331, 331))
    assert [tuple(f.shape[1:]) for f in feats] == [(384, 39, 39), (1152, 19, 19), (2048, 9, 9)]
    assert model.feature_info.channels() == [384, 1152, 2048]


def test_very_deep_cost():
    report = model_cost(polynet.create_model("polynet_very_deep"))
    assert report.total.params == 95_366_600
    assert report.total.macs / 1e9 == pytest.approx(34.7, abs=0.05)
    assert report.module_types["B: I + F + F^2 + F^3"].count == 10


def test_released_scales():
    assert released_scales(40)[:2] == [1.0, 0.992308] and released_scales(40)[-1] == 0.7


@pytest.mark.parametrize("name", ["polynet_ir_20_56_20", "polynet_6_12_6_mixed", "polynet_small"])
def test_full_width_forward_at_the_smallest_input(name):
    model = polynet.create_model(name).eval()
    with torch.no_grad():
        out = model(_input(model, 1))
    assert out.shape == (1, model.num_classes) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL)
def test_backward_reaches_every_parameter(name):
    model = _narrow(name).train()
    model(_input(model)).logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


@pytest.mark.parametrize("name", ALL)
def test_jit_trace_and_fx_match_eager(name):
    model = _narrow(name).eval()
    x = _input(model)
    with torch.no_grad():
        expected = model(x)
        traced = torch.jit.trace(model, x, check_trace=False)  # compared below instead
        graph = torch.fx.symbolic_trace(model)
        torch.testing.assert_close(traced(x), expected)
        torch.testing.assert_close(graph(x), expected)


@pytest.mark.parametrize("name", ALL)
def test_features_only_and_heads(name):
    features = _narrow(name, features_only=True).eval()
    model = _narrow(name).eval()
    x = _input(model)
    with torch.no_grad():
        feats = features(x)
        assert [f.shape[1] for f in feats] == features.feature_info.channels()
        assert [f.shape[1] for f in feats] == [i["num_chs"] for i in model.feature_info]
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
        assert pre.shape == (2, model.num_features)
        model.reset_classifier(7)
        assert model(x).shape == (2, 7) and model.get_classifier().out_features == 7
        model.reset_classifier(0)
        assert model(x).shape == (2, model.num_features)


@pytest.mark.parametrize("name", ALL)
def test_grad_checkpointing_recomputes_and_matches(name):
    torch.manual_seed(0)
    model = _narrow(name).train()
    x = _input(model)
    calls = []
    # A pre-hook: non-reentrant recomputation may stop early, before forward hooks would run.
    model.stage_b[0].register_forward_pre_hook(lambda *_: calls.append(1))

    def run(checkpointing):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        torch.manual_seed(1)
        out = model(x)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    out_a, grads_a = run(False)
    assert len(calls) == 1
    out_b, grads_b = run(True)
    assert len(calls) == 3  # forward, then recomputed in backward
    torch.testing.assert_close(out_b, out_a)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["polynet_small", "polynet_3_6_3_b_mpoly3", "polynet_very_deep"])
def test_timm_builds_the_same_model(name):
    ours, theirs = polynet.create_model(name, **NARROW), timm.create_model(name, **NARROW)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    assert theirs.pretrained_cfg["input_size"] == ours.pretrained_cfg["input_size"]


def test_create_model_with_any_spec_and_channels():
    model = polynet.create_model(
        "polynet", spec="A: [I + (I + G)F] | B: 2-way | C: poly-2", in_chans=5, num_classes=3,
        **NARROW,
    ).eval()  # fmt: skip
    assert model.stage_a[0].expression == "I + F + GF"
    assert model(torch.randn(1, 5, 80, 80)).shape == (1, 3)


def test_small_variant_keeps_resolution_and_takes_any_channels():
    model = polynet.create_model("polynet_small", in_chans=3, width_mult=0.25).eval()
    feats = polynet.create_model("polynet_small", features_only=True).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
        assert [f.shape[-1] for f in feats(torch.randn(1, 1, 28, 28))] == [28, 14, 7]
        assert [f.shape[-1] for f in feats(torch.randn(1, 1, 64, 64))] == [64, 32, 16]


def test_small_stem_stride_two_halves_every_stage_and_its_cost():
    kwargs = dict(width_mult=0.125, sharing="released")
    full = polynet.create_model("polynet_small", **kwargs).eval()
    half = polynet.create_model("polynet_small", stem_stride=2, **kwargs).eval()
    feats = polynet.create_model("polynet_small", features_only=True, stem_stride=2).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert half(x).shape == (2, 10)
        assert [f.shape[-1] for f in feats(x)] == [14, 7, 4]
    assert [i["reduction"] for i in feats.feature_info] == [2, 4, 8]
    # Same parameters, a quarter of the work in every stage (the stem's first conv excepted).
    assert count_params(half) == count_params(full)
    assert count_macs(half, x[:1]) < 0.3 * count_macs(full, x[:1])
    assert half.min_input_size == 16
    with pytest.raises(ValueError, match="input 8x8 is smaller than the 16x16"):
        half(torch.randn(1, 1, 8, 8))


def test_path_drop_schedule_is_linear_and_eval_is_unchanged():
    model = _narrow("polynet_3_6_3_b_poly3").eval()
    x = _input(model)
    with torch.no_grad():
        before = model(x)
        model.set_path_drop(0.25)
        after = model(x)
    rates = [u.drop_prob for u in model.units]
    assert rates[0] == 0.0 and rates[-1] == 0.25
    assert rates == pytest.approx([0.25 * i / 11 for i in range(12)])
    torch.testing.assert_close(after, before)
    with pytest.raises(ValueError, match="path drop rate"):
        model.set_path_drop(1.5)


def test_errors_say_what_is_wrong_and_list_choices():
    with pytest.raises(ValueError, match="unknown model 'polynet_verydeep'; did you mean") as e:
        polynet.create_model("polynet_verydeep")
    assert "polynet_very_deep" in str(e.value) and "polynet_small" in str(e.value)
    with pytest.raises(ValueError, match="bad network spec"):
        polynet.create_model("polynet", spec="A: ir | B: ir")
    model = _narrow("polynet_ir_3_6_3")
    with pytest.raises(ValueError, match="input 64x64 is smaller than the 75x75"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"expected a batch of shape \(N, 3, H, W\)"):
        model(torch.randn(1, 1, 80, 80))
    with pytest.raises(ValueError, match="needs checkpoint_path"):
        polynet.create_model("polynet_very_deep", pretrained=True)
    with pytest.raises(ValueError, match="width_mult"):
        polynet.create_model("polynet_small", width_mult=0)
    with pytest.raises(ValueError, match="small stem's stride must be 1 or 2, got 3"):
        polynet.create_model("polynet_small", stem_stride=3)
    with pytest.raises(ValueError, match="stem_stride applies to the small stem only"):
        polynet.create_model("polynet_ir_3_6_3", stem_stride=2)
