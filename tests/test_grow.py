import pytest
import torch
from torch import nn

import polynet
from polynet.cli import main
from polynet.io.checkpoint import save_checkpoint
from polynet.io.loading import load_model
from polynet.model.grow import GrowthMap, grow, interleaved_slots

SMALL = dict(stem="small", width_mult=0.0625, in_chans=1, num_classes=10)
IR_1_2_1 = "A: ir | B: ir x2 | C: ir"


def trained_like(spec: str = IR_1_2_1, seed: int = 0, **kwargs) -> polynet.PolyNet:
    """A small model whose every tensor differs from a fresh init, as after training."""
    torch.manual_seed(seed)
    model = polynet.create_model("polynet", spec=spec, **{**SMALL, **kwargs})
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(7)
    return model.eval()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models: threads only add contention on the shared cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def assert_same_tensors(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    a.eval(), b.eval()
    with torch.no_grad():
        return (a(x) - b(x)).abs().max().item()


@pytest.mark.parametrize(
    ("n", "m", "slots"),
    [
        (3, 6, (0, 2, 4)),
        (1, 1, (0,)),
        (2, 3, (0, 1)),
        (1, 3, (0,)),
        (2, 5, (0, 2)),
        (6, 12, (0, 2, 4, 6, 8, 10)),
        (4, 6, (0, 1, 3, 4)),
    ],
)
def test_interleaved_slots(n, m, slots):
    assert interleaved_slots(n, m) == slots


def test_interleaved_slots_rejects_shrinking():
    with pytest.raises(ValueError, match="at least as many units"):
        interleaved_slots(3, 2)


def test_copied_tensors_are_bitwise_equal_and_interleaved():
    source = trained_like("A: ir | B: ir x3 | C: ir x2")
    target, growth = grow(source, "A: mpoly-2 x2 | B: 2-way x6 | C: ir x3")
    # Doubling interleaves (old, new, old, new, ...); 2 -> 3 keeps the old units at 0 and 1.
    assert growth.unit_sources == (0, None, 1, None, 2, None, 3, None, 4, 5, None)
    for part in ("stem", "reduction_a", "reduction_b", "last_linear"):
        assert_same_tensors(getattr(target, part), getattr(source, part))
    for index, origin in enumerate(growth.unit_sources):
        if origin is not None:
            assert_same_tensors(target.units[index].blocks["F"], source.units[origin].blocks["F"])
    # New blocks keep their fresh random init: not a copy of F.
    new_g = target.stage_b[0].blocks["G"].proj[0].conv.weight
    assert not torch.equal(new_g, source.stage_b[0].blocks["F"].proj[0].conv.weight)
    # Kept units keep their scale; inserted ones take the scale below them.
    assert [u.scale for u in target.units] == [0.3] * len(target.units)
    assert not growth.preserves_function


def test_map_lists_copied_inserted_and_initialised():
    source = trained_like()
    _, growth = grow(source, "A: mpoly-2 | B: ir x4 | C: ir", zero_init=True)
    text = str(growth)
    assert isinstance(growth, GrowthMap)
    actions = [(e.action, e.target, e.source) for e in growth.entries]
    assert actions == [
        ("copied", "stem", "stem"),
        ("copied", "stage_a.0.blocks.F", "stage_a.0.blocks.F"),
        ("initialised", "stage_a.0.blocks.G", None),
        ("copied", "reduction_a", "reduction_a"),
        ("copied", "stage_b.0.blocks.F", "stage_b.0.blocks.F"),
        ("inserted", "stage_b.1", None),
        ("copied", "stage_b.2.blocks.F", "stage_b.1.blocks.F"),
        ("inserted", "stage_b.3", None),
        ("copied", "reduction_b", "reduction_b"),
        ("copied", "stage_c.0.blocks.F", "stage_c.0.blocks.F"),
        ("copied", "last_linear", "last_linear"),
    ]
    assert "stage_b.2.blocks.F <- stage_b.1.blocks.F" in text
    assert "function: preserved" in text
    assert growth.copied_params == sum(p.numel() for p in source.parameters())
    assert growth.new_params > 0


@pytest.mark.parametrize(
    ("target", "kwargs"),
    [
        ("A: mpoly-2 x2 | B: (2-way, mpoly-3) x2 | C: 3-way x3", {}),  # replace and deepen
        ("A: ir x2 | B: ir x4 | C: ir x2", {}),  # deepen only
        ("A: poly-3 | B: poly-2 x3 | C: mpoly-3", {"sharing": "released"}),
        ("polynet_6_12_6_mixed", {"sharing": "released"}),  # the paper's example, Fig. 9
    ],
)
def test_zero_init_computes_the_source_function(images, target, kwargs):
    source = trained_like()
    grown, growth = grow(source, target, zero_init=True, **kwargs)
    assert growth.preserves_function, growth.reasons
    assert max_diff(grown, source, images) <= 1e-5
    # It is a real change of architecture, not a copy.
    assert sum(p.numel() for p in grown.parameters()) > sum(p.numel() for p in source.parameters())


def test_zero_init_of_released_orders_shares_order_zero(images):
    source = trained_like("A: poly-2 | B: ir x2 | C: ir", sharing="released")
    grown, growth = grow(source, "A: poly-3 | B: ir x2 | C: ir", zero_init=True)
    src_f, new_f = source.stage_a[0].blocks["F"], grown.stage_a[0].blocks["F"]
    assert_same_tensors(new_f.convs, src_f.convs)
    for order in (0, 1):  # trained orders copied
        assert_same_tensors(new_f.norms[order], src_f.norms[order])
        assert_same_tensors(new_f.proj[order], src_f.proj[order])
    # The new order starts from order 0's norms and conv, with its output silenced.
    assert_same_tensors(new_f.norms[2], src_f.norms[0])
    assert torch.equal(new_f.proj[2].conv.weight, src_f.proj[0].conv.weight)
    assert not new_f.proj[2].bn.weight.any() and not new_f.proj[2].bn.bias.any()
    assert ("shared", "stage_a.0.blocks.F[order 2]") in [
        (e.action, e.target) for e in growth.entries
    ]
    assert growth.preserves_function
    assert max_diff(grown, source, images) <= 1e-5


def test_full_sharing_poly_cannot_start_exact(images):
    source = trained_like()
    grown, growth = grow(source, "A: poly-3 | B: ir x2 | C: ir", zero_init=True)
    assert not growth.preserves_function
    assert "F^2, F^3" in growth.reasons[0] and "sharing='released'" in growth.reasons[0]
    assert max_diff(grown, source, images) > 1e-3


def test_random_init_changes_the_function(images):
    source = trained_like()
    grown, growth = grow(source, "A: mpoly-2 x2 | B: ir x2 | C: ir")
    assert not growth.preserves_function
    assert any("stage_a.1: inserted unit starts with random" in r for r in growth.reasons)
    assert max_diff(grown, source, images) > 1e-3


def test_grow_into_a_built_model():
    source = trained_like()
    target = polynet.create_model("polynet", spec="A: 2-way | B: ir x2 | C: ir", **SMALL)
    grown, growth = grow(source, target, zero_init=True)
    assert grown is target and growth.preserves_function
    assert_same_tensors(grown.stem, source.stem)
    rescaled = polynet.create_model(
        "polynet", spec="A: 2-way | B: ir x2 | C: ir", residual_scale=1.0, **SMALL
    )
    _, growth = grow(source, rescaled, zero_init=True)
    assert not growth.preserves_function
    assert "residual scale 1.0 differs" in growth.reasons[0]


@pytest.mark.parametrize(
    ("target", "kwargs", "message"),
    [
        ("A: ir | B: ir | C: ir", {}, "stage B has 1 units but the source has 2"),
        (
            "A: mpoly-2 | B: ir x2 | C: ir",
            {"_source": "A: 2-way | B: ir x2 | C: ir"},
            r"lacks the path\(s\) G",
        ),
        ("polynet_ir_3_6_3", {"_target_kwargs": dict(width_mult=0.25)}, "different widths"),
        (
            "polynet_ir_3_6_3",
            {"_target_kwargs": dict(stem="imagenet", width_mult=0.125)},
            "different stem",
        ),
        ("polynet_ir_3_6_3", {"_target_kwargs": dict(num_classes=7)}, "different num_classes"),
        ("polynet_small", {"_source_kwargs": dict(width_mult=0.25)}, "fixes width_mult=0.125"),
        ("A: ir | B: ir x2 | C: ir", {"width_mult": 0.25}, "different widths"),
        ("polynet_nope", {}, "unknown model 'polynet_nope'"),
        ("A: ir | B: ir x2", {}, "bad network spec"),
    ],
)
def test_incompatible_models_raise_clear_errors(target, kwargs, message):
    kwargs = dict(kwargs)
    source = trained_like(kwargs.pop("_source", IR_1_2_1), **kwargs.pop("_source_kwargs", {}))
    if "_target_kwargs" in kwargs:
        built = {**SMALL, **kwargs.pop("_target_kwargs")}
        target = polynet.create_model(target, **built)
    with pytest.raises(ValueError, match=message):
        grow(source, target, **kwargs)


def test_source_must_be_a_polynet():
    with pytest.raises(ValueError, match="source must be a polynet PolyNet"):
        grow(nn.Linear(2, 2), "A: ir | B: ir | C: ir")


def test_cli_grows_a_checkpoint(tmp_path, images, capsys):
    source = trained_like(IR_1_2_1, width_mult=0.125)  # polynet_small_ir
    src_path, out_path = tmp_path / "ir.pt", tmp_path / "grown.pt"
    save_checkpoint(
        src_path,
        {"model_name": "polynet_small_ir", "model_kwargs": {}, "model": source.state_dict()},
    )
    status = main(
        [
            "grow",
            "--from",
            str(src_path),
            "--to",
            "polynet_small",
            "--out",
            str(out_path),
            "--zero-init",
            "--sharing",
            "released",
        ]
    )
    assert status == 0
    printed = capsys.readouterr().out
    assert "growth map (zero-init)" in printed and "function: preserved" in printed
    grown, file = load_model(out_path)
    assert file.model_name == "polynet_small"
    assert str(grown.spec) == "A: 2-way | B: (mpoly-2, poly-2) | C: 2-way"
    assert file.model_config["sharing"] == "released" == grown.config.sharing
    assert "growth_map" in file.payload
    assert max_diff(grown, source, images) <= 1e-5


def test_cli_reports_incompatible_target_in_one_line(tmp_path, capsys):
    source = trained_like()
    src_path = tmp_path / "ir.pt"
    kwargs = dict(SMALL, spec=IR_1_2_1)
    save_checkpoint(
        src_path, {"model_name": "polynet", "model_kwargs": kwargs, "model": source.state_dict()}
    )
    status = main(
        [
            "grow",
            "--from",
            str(src_path),
            "--to",
            "A: ir | B: ir | C: ir",
            "--out",
            str(tmp_path / "x.pt"),
        ]
    )
    assert status == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stage B has 1 units but the source has 2" in err
    assert not (tmp_path / "x.pt").exists()


def test_grown_model_keeps_the_source_preprocessing():
    source = polynet.create_model("polynet_small_ir")
    _, growth = grow(source, "polynet_small", sharing="released")
    assert growth.model_name == "polynet_small"
    # polynet_6_12_6_mixed is registered for 299 px RGB; the grown model takes 28 px grey.
    grown, growth = grow(source, "polynet_6_12_6_mixed", zero_init=True)
    assert growth.model_name == "polynet_small_ir"
    assert grown.pretrained_cfg["input_size"] == (1, 28, 28)
    rebuilt = polynet.create_model(growth.model_name, **growth.model_config.to_dict())
    assert str(rebuilt.spec) == "A: ir x6 | B: (3-way, mpoly-3, poly-3) x4 | C: ir x6"
    rebuilt.load_state_dict(grown.state_dict())  # strict: every tensor fits
    assert [u.scale for u in rebuilt.units] == [u.scale for u in grown.units]
