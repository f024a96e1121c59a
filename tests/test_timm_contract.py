"""timm's whole model contract, for every registered model (issue #15).

Models are built narrow (ImageNet-stem models at width 1/16, inputs of 75 px; the small models
as registered, at 28 px) so that the registry stays fast on two CPU cores; shape questions at
the full width and the default input size are asked on the meta device, which costs nothing.
"""

from functools import cache, partial

import pytest
import timm
import torch
from timm.data import ImageNetInfo
from torch import nn

import polynet
from polynet.cli import main
from polynet.data import FASHION_MNIST_CLASSES
from polynet.inference.export import example_input, export, exported_max_error
from polynet.io.checkpoint import save_checkpoint
from polynet.io.weights import save_weights, to_port_layout
from polynet.model.blocks import STAGE_BLOCKS, InceptionBlock
from polynet.model.modules import PolyInception
from polynet.model.network import feature_map_size
from polynet.model.regional import Stage
from polynet.model.specs import NetworkSpec
from polynet.model.zoo import FEATURE_CLASSES, MODELS, STAGE_NAMES

ALL = list(MODELS)
SMALL_STEM = {name for name, d in MODELS.items() if d.kwargs.get("stem") == "small"}
# One of each kind: the small stem, the mixed stage B, the released sharing of poly-3.
REPRESENTATIVE = ["polynet_small", "polynet_6_12_6_mixed", "polynet_very_deep"]
NARROW = dict(width_mult=0.0625)
# 331 px (the released input) and 299 px through the ImageNet stem, 28 px through the small one.
KNOWN_POOL_SIZES = {
    "polynet_very_deep": (9, 9),
    "polynet_ir_3_6_3": (8, 8),
    "polynet_small": (7, 7),
}


def _build(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **{**({} if name in SMALL_STEM else NARROW), **kwargs})


def _input(model, batch=2):
    size = 28 if model.config.stem == "small" else 75
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, model.in_chans, size, size, generator=generator)


def _randomise_norms(model):
    """Non-trivial BatchNorm statistics, so that eval-mode normalisation is exercised."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.num_batches_tracked.fill_(7)
    return model


def _stage_outputs(model, x):
    """What stage_a, stage_b and stage_c output in forward_features, seen by forward hooks."""
    seen = {}
    handles = [
        getattr(model, name).register_forward_hook(
            lambda _m, _i, out, name=name: seen.__setitem__(name, out)
        )
        for name in STAGE_NAMES
    ]
    features = model.forward_features(x)
    for handle in handles:
        handle.remove()
    return features, [seen[name] for name in STAGE_NAMES]


@cache
def _reference(name):
    """A fresh eval-mode model's input, stage outputs and logits, for tests to read."""
    model = _build(name).eval()
    x = _input(model)
    with torch.no_grad():
        features, stages = _stage_outputs(model, x)
        logits = model.forward_head(features)
    return x, stages, logits


def _same(got, want):
    return len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def _one_line_error(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# --- forward_intermediates --------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_forward_intermediates_are_the_stage_outputs_for_every_index_form(name):
    model = _build(name).eval()
    x = _input(model)
    with torch.no_grad():
        features, stages = _stage_outputs(model, x)
        final, intermediates = model.forward_intermediates(x)
        assert torch.equal(final, features)
        assert _same(intermediates, stages)
        assert [t.shape[1] for t in intermediates] == [i["num_chs"] for i in model.feature_info]
        # None: all; an int: the last n; a list or tuple: those named, negative from the end.
        for indices, want in ((None, [0, 1, 2]), (2, [1, 2]), ([0, 2], [0, 2]), ((-1,), [2])):
            got = model.forward_intermediates(x, indices=indices, intermediates_only=True)
            assert isinstance(got, list) and _same(got, [stages[i] for i in want]), indices
        ran_c = []
        model.stage_c.register_forward_pre_hook(lambda *_: ran_c.append(1))
        final, got = model.forward_intermediates(x, indices=[-3, 1], stop_early=True)
        assert not ran_c  # nothing after stage B ran
        assert _same(got, stages[:2]) and torch.equal(final, stages[1])


@pytest.mark.parametrize("name", ALL)
def test_forward_intermediates_with_grad_checkpointing_recompute_and_match(name):
    model = _build(name).train()  # batch statistics: both passes normalise alike
    x = _input(model)
    features, stages = _stage_outputs(model, x)
    model.set_grad_checkpointing(True)
    calls = []
    # A pre-hook: non-reentrant recomputation may stop early, before forward hooks would run.
    model.stage_c[0].register_forward_pre_hook(lambda *_: calls.append(1))
    final, intermediates = model.forward_intermediates(x)
    (final.square().mean() + intermediates[0].mean()).backward()
    assert len(calls) == 2  # run, then recomputed in the backward pass
    torch.testing.assert_close(final, features, rtol=0, atol=0)
    for got, want in zip(intermediates, stages, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# --- prune_intermediate_layers ----------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_prune_intermediate_layers_drops_what_is_not_asked_for(name):
    x, stages, logits = _reference(name)
    with torch.no_grad():
        cases = (([0], 0), ((-2,), 1), ([0, 2], 2)) if name in REPRESENTATIVE else (([-2], 1),)
        for indices, last in cases:
            model = _build(name).eval()
            kept = model.prune_intermediate_layers(indices)
            assert max(kept) == last
            assert _same(model.forward_intermediates(x, indices=kept, intermediates_only=True),
                         [stages[i] for i in kept])  # fmt: skip
            # The head is gone and the model ends at the last stage kept, unpooled.
            assert isinstance(model.get_classifier(), nn.Identity)
            assert torch.equal(model(x), stages[last])
            assert model.num_features == stages[last].shape[1]
            gone = ("reduction_a", "stage_b", "reduction_b", "stage_c")[2 * last :]
            assert not [k for k in model.state_dict() if k.split(".")[0] in gone]
            assert model.pretrained_cfg["num_classes"] == 0
        model = _build(name).eval()
        model.prune_intermediate_layers([1, 2], prune_head=False)
        assert torch.equal(model(x), logits)


FEATURE_CASES = [("getter", name) for name in ALL] + [
    (cls, name) for cls in ("list", "dict", "hook") for name in REPRESENTATIVE
]  # timm's default FeatureListNet is tested on every model in test_models.py


@pytest.mark.parametrize(("feature_cls", "name"), FEATURE_CASES)
def test_every_feature_cls_gives_the_stage_outputs(feature_cls, name):
    features = _build(name, features_only=True, feature_cls=feature_cls, out_indices=(0, -1))
    x, stages, _ = _reference(name)
    with torch.no_grad():
        got = features.eval()(x)
    got = list(got.values()) if isinstance(got, dict) else got
    assert _same(got, [stages[0], stages[2]])
    assert features.feature_info.channels() == [stages[0].shape[1], stages[2].shape[1]]
    assert features.default_cfg is features.pretrained_cfg


@pytest.mark.parametrize("name", REPRESENTATIVE[:2])  # FX tracing costs seconds per deep model
def test_fx_feature_extraction_gives_the_stage_outputs(name):
    features = _build(name, features_only=True, feature_cls="fx", out_indices=(1, 2)).eval()
    x, stages, _ = _reference(name)
    with torch.no_grad():
        assert _same(features(x), stages[1:])


@pytest.mark.parametrize("feature_cls", FEATURE_CLASSES)
@pytest.mark.parametrize("out_indices", [(3,), (0, -4), 4, 0, ()])
def test_out_indices_out_of_range_is_one_clear_value_error(feature_cls, out_indices):
    with pytest.raises(ValueError, match=r"3 feature maps \(stage_a, stage_b, stage_c\)") as err:
        timm.create_model(
            "polynet_small", features_only=True, feature_cls=feature_cls, out_indices=out_indices
        )
    assert f"out_indices={out_indices!r}" in _one_line_error(err)


def test_bad_indices_and_feature_cls_are_clear_errors():
    model = _build("polynet_small").eval()
    with pytest.raises(ValueError, match="feature index 3 is out of range") as err:
        model.forward_intermediates(_input(model), indices=[3])
    _one_line_error(err)
    with pytest.raises(ValueError, match="cannot take the last 5 feature maps"):
        model.prune_intermediate_layers(5)
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW'"):
        model.forward_intermediates(_input(model), output_fmt="NHWC")
    with pytest.raises(ValueError, match="unknown feature_cls 'graph'; choose one of list"):
        timm.create_model("polynet_small", features_only=True, feature_cls="graph")


# --- pretrained_cfg ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_pool_size_is_the_unpooled_feature_map_at_the_default_input(name):
    """A real forward at the registered input size; widths do not change sizes."""
    model = _build(name).eval()
    cfg = model.pretrained_cfg
    with torch.no_grad():
        features = model.forward_features(example_input(model, batch_size=1))
    assert (
        tuple(features.shape[-2:])
        == cfg["pool_size"]
        == KNOWN_POOL_SIZES.get(name, cfg["pool_size"])
    )
    assert timm.models.get_pretrained_cfg(name).pool_size == cfg["pool_size"]
    x, stages, _ = _reference(name)  # and at the tests' own input size
    stem = (model.config.stem, model.config.stem_stride)
    assert feature_map_size(tuple(x.shape[-2:]), *stem) == tuple(stages[2].shape[-2:])
    assert model.default_cfg is cfg
    assert len(cfg["label_names"]) == cfg["num_classes"] == model.num_classes


def test_pool_size_follows_the_arguments_that_change_it():
    model = _build("polynet_small", stem_stride=2).eval()
    with torch.no_grad():
        features = model.forward_features(example_input(model, batch_size=1))
    assert tuple(features.shape[-2:]) == model.pretrained_cfg["pool_size"] == (4, 4)
    with pytest.raises(ValueError, match="a 60x60 input is smaller than the 75 px") as err:
        feature_map_size((60, 60))
    _one_line_error(err)


def test_the_released_model_at_full_width_and_331_px_on_the_meta_device():
    """34 GMACs and 95M parameters for nothing: meta tensors carry shapes, not data."""
    model = timm.create_model("polynet_very_deep", device="meta")
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    features = model.forward_features(torch.empty(1, 3, 331, 331, device="meta"))
    assert features.shape == (1, 2048, 9, 9)
    assert model.pretrained_cfg["pool_size"] == (9, 9)
    assert polynet.create_model("polynet_small", device="meta").last_linear.weight.is_meta


def test_class_names_are_those_of_the_data_set():
    very_deep = timm.models.get_pretrained_cfg("polynet_very_deep")
    imagenet = ImageNetInfo("imagenet-1k")
    assert very_deep.label_names == tuple(imagenet.label_names())
    assert very_deep.label_descriptions["n01440764"] == imagenet.label_name_to_description(
        "n01440764"
    )
    assert timm.models.get_pretrained_cfg("polynet_small").label_names == tuple(
        FASHION_MNIST_CLASSES
    )


def test_other_classes_are_counted_and_not_named_after_imagenet():
    model = timm.create_model("polynet_very_deep", num_classes=10, device="meta")
    assert model.pretrained_cfg["num_classes"] == 10 == model.num_classes
    assert "label_names" not in model.pretrained_cfg
    assert "label_descriptions" not in model.pretrained_cfg
    model = polynet.create_model("polynet_small", device="meta")
    cfg = model.pretrained_cfg
    model.reset_classifier(10)  # as many classes: the names still count them
    assert cfg["label_names"] == tuple(FASHION_MNIST_CLASSES)
    model.reset_classifier(4)
    assert cfg["num_classes"] == 4 == model.config.num_classes and "label_names" not in cfg
    model.reset_classifier(0)
    assert cfg["num_classes"] == 0 and model.default_cfg is cfg is model.pretrained_cfg
    assert polynet.create_model("polynet_small", num_classes=3).pretrained_cfg["num_classes"] == 3


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_folder_trained_file_names_its_own_classes(tmp_path, suffix):
    names = ["cat", "dog", "fox"]
    source = _build("polynet_small", num_classes=3)
    path = tmp_path / f"folder{suffix}"
    if suffix == ".pt":
        state = dict(model_name="polynet_small", model=source.state_dict(), class_names=names)
        save_checkpoint(path, state)
    else:
        save_weights(path, source.state_dict(), "polynet_small", class_names=names)
    model = timm.create_model(
        "polynet_small", num_classes=3, pretrained=True, pretrained_cfg_overlay=dict(file=path)
    )
    assert model.pretrained_cfg["label_names"] == tuple(names)
    assert "label_descriptions" not in model.pretrained_cfg
    assert torch.equal(model.last_linear.weight, source.last_linear.weight)
    # Fine-tuned to another number of classes: the file's names are not the outputs'.
    with pytest.warns(UserWarning, match="re-initialised"):
        other = timm.create_model(
            "polynet_small", num_classes=5, pretrained=True, pretrained_cfg_overlay=dict(file=path)
        )
    assert "label_names" not in other.pretrained_cfg


# --- pretrained=True through timm -------------------------------------------------------------


def test_timm_pretrained_without_a_file_says_where_to_get_it_and_how_to_pass_it():
    with pytest.raises(ValueError, match="docs/released-weights.md") as err:
        timm.create_model("polynet_very_deep", pretrained=True)
    message = _one_line_error(err)
    assert "pretrained_cfg_overlay=dict(file=PATH)" in message and "checkpoint_path=" in message
    with pytest.raises(ValueError, match="polynet_small.*no released weights") as err:
        timm.create_model("polynet_small", pretrained=True)
    _one_line_error(err)
    with pytest.raises(ValueError, match="meta device"):
        timm.create_model(
            "polynet_small", pretrained=True, device="meta", pretrained_cfg_overlay=dict(file="x")
        )
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        timm.create_model(
            "polynet_small", pretrained=True, pretrained_cfg_overlay=dict(file="missing.pth")
        )


@pytest.fixture(scope="module")
def very_deep_files(tmp_path_factory):
    """A narrow Very Deep PolyNet saved as the port's file (without BatchNorm counters, as the
    2017 release), as converted safetensors and as a polynet checkpoint."""
    source = _randomise_norms(_build("polynet_very_deep"))
    state = source.state_dict()
    folder = tmp_path_factory.mktemp("weights")
    port = {k: v for k, v in to_port_layout(state, source).items() if "num_batches" not in k}
    torch.save(port, folder / "port.pth")
    save_weights(folder / "ours.safetensors", state, "polynet_very_deep", source.config.to_dict())
    save_checkpoint(folder / "run.pt", dict(model_name="polynet_very_deep", model=state))
    return folder, state


@pytest.mark.parametrize("file", ["port.pth", "ours.safetensors", "run.pt"])
def test_timm_loads_exactly_what_polynet_loads(very_deep_files, file):
    folder, state = very_deep_files
    path = folder / file
    reference = polynet.create_model(
        "polynet_very_deep", pretrained=True, checkpoint_path=path, **NARROW
    ).state_dict()
    for key, value in state.items():  # the port's file has no counters: they start at zero
        assert torch.equal(reference[key], value) or key.endswith("num_batches_tracked")
    loaded = [
        timm.create_model(
            "polynet_very_deep", pretrained=True, pretrained_cfg_overlay=dict(file=path), **NARROW
        ),
        timm.create_model("polynet_very_deep", checkpoint_path=str(path), **NARROW),
    ]
    for model in loaded:
        assert list(model.state_dict()) == list(reference)
        assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())


def test_a_feature_extractor_loads_the_released_layout_before_it_is_wrapped(very_deep_files):
    folder, state = very_deep_files
    features = timm.create_model(
        "polynet_very_deep",
        features_only=True,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=folder / "port.pth"),
        **NARROW,
    )
    assert all(
        torch.equal(v, state[k]) or "num_batches" in k for k, v in features.state_dict().items()
    )


# --- heads, devices and dtypes ----------------------------------------------------------------


@pytest.mark.parametrize("name", REPRESENTATIVE)  # one head for all; test_models resets them all
def test_reset_classifier_and_global_pool_shapes(name):
    model = _build(name).eval()
    x = _input(model)
    with torch.no_grad():
        features = model.forward_features(x)
        n, c = features.shape[:2]
        model.reset_classifier(0)
        assert model(x).shape == (n, c)
        model.reset_classifier(0, "")
        assert torch.equal(model(x), features)
        model.reset_classifier(5, "catavgmax")
        assert model(x).shape == (n, 5) and model.head_hidden_size == 2 * c
        assert model.forward_head(features, pre_logits=True).shape == (n, 2 * c)
        assert model.config.global_pool == "catavgmax" and model.config.num_classes == 5
        unpooled = _build(name, num_classes=0, global_pool="").eval()
        assert unpooled(x).shape == features.shape


def test_unpooled_features_cannot_feed_a_classifier():
    with pytest.raises(ValueError, match="global_pool='' passes the feature map") as err:
        timm.create_model("polynet_small", global_pool="")
    assert "num_classes=0" in _one_line_error(err)


def test_dtype_builds_every_tensor_in_it_and_computes_in_it():
    model = polynet.create_model("polynet_small", dtype=torch.bfloat16).eval()
    assert {t.dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()} == {
        torch.bfloat16
    }
    reference = polynet.create_model("polynet_small").eval()
    reference.load_state_dict(model.state_dict())  # the same (bf16-rounded) weights
    x = _input(model)
    with torch.no_grad():
        out = model(x.bfloat16())
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), reference(x), atol=0.1, rtol=0.05)
    assert model.config == reference.config  # device and dtype are not the architecture's
    model.reset_classifier(3)
    assert model.last_linear.weight.dtype == torch.bfloat16
    both = timm.create_model("polynet_very_deep", device="meta", dtype=torch.float16)
    assert {(t.device.type, t.dtype) for t in both.parameters()} == {("meta", torch.float16)}
    both.reset_classifier(7)
    assert both.last_linear.weight.is_meta


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(dtype=torch.int64), "dtype must be a floating-point torch.dtype"),
        (dict(dtype="bf16"), "dtype must be a floating-point torch.dtype"),
        (dict(device="gpu0"), "device 'gpu0' is not a torch device"),
    ],
)
def test_bad_device_or_dtype_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        timm.create_model("polynet_small", **kwargs)
    _one_line_error(err)


# --- TorchScript and torch.export -------------------------------------------------------------


def _unit_kinds():
    """Every (stage, module, sharing) in the registry: the unit types TorchScript compiles."""
    kinds = set()
    for definition in MODELS.values():
        sharing = definition.kwargs.get("sharing", "full")
        for stage in NetworkSpec.parse(definition.spec).stages:
            kinds.update((stage.name, unit, sharing) for unit in stage.units)
    return sorted(kinds)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize(("stage", "module", "sharing"), _unit_kinds())
def test_every_kind_of_unit_in_the_registry_scripts_to_its_eager_output(stage, module, sharing):
    """TorchScript compiles each module type once: with every unit type of every registered
    model and the models below (both stems, all reductions, the head), every model scripts;
    scripting each whole model would repeat per-instance work for seconds a model."""
    block = partial(InceptionBlock, 16, STAGE_BLOCKS[stage], 0.0625)
    unit = _randomise_norms(PolyInception(module, block, 0.3, sharing)).eval()
    scripted = torch.jit.script(unit)
    x = torch.randn(2, 16, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), unit(x), rtol=0, atol=1e-6)


def _one_unit_of_each_kind(model):
    """The model with each stage cut to the first unit of every kind it holds (same types)."""
    for name in STAGE_NAMES:
        kinds = {}
        for unit in getattr(model, name):
            kinds.setdefault((unit.expression, unit.sharing), unit)
        setattr(model, name, Stage(*kinds.values()))
    return model


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_models_script_to_the_eager_outputs(name):
    model = _randomise_norms(_build(name)).eval()
    if name != "polynet_small":  # the small model is scripted whole
        model = _one_unit_of_each_kind(model)
    scripted = torch.jit.script(model)
    x = _input(model, batch=3)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(
            scripted.forward_features(x), model.forward_features(x), rtol=0, atol=1e-6
        )


def test_cli_exports_a_torch_export_program_and_checks_it(tmp_path, capsys):
    model = _randomise_norms(_build("polynet_small")).eval()
    checkpoint, out = tmp_path / "small.pt", tmp_path / "small.pt2"
    save_checkpoint(checkpoint, dict(model_name="polynet_small", model=model.state_dict()))
    argv = ["export", "polynet_small", "--checkpoint", str(checkpoint), "--format", "exported"]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "(exported, input 1x28x28, any batch)" in printed
    assert float(printed.split("max |difference| ")[1]) < 1e-5
    program = torch.export.load(str(out)).module()
    for batch in (1, 4):  # exported at 2: the batch dimension is dynamic
        x = example_input(model, batch_size=batch)
        with torch.no_grad():
            torch.testing.assert_close(program(x), model(x), rtol=0, atol=1e-5)


def test_exported_program_of_an_imagenet_stem_model_with_released_sharing(tmp_path):
    model = _randomise_norms(
        _build("polynet", spec="A: 2-way | B: poly-3 | C: mpoly-2", sharing="released")
    ).eval()
    path = export(model, tmp_path / "net.pt2", "exported", input_size=(3, 75, 75))
    assert exported_max_error(model, path, example_input(model, (3, 75, 75), 3)) < 1e-5


def test_a_pruned_model_is_described_by_its_config_and_rebuilt_from_it():
    from polynet.model.network import PolyNet

    model = polynet.create_model("polynet_small").eval()
    assert model.prune_intermediate_layers([0, 1]) == [0, 1]
    config = model.config
    assert (config.num_stages, config.num_classes) == (2, 0)
    assert model.num_features == model.feature_info[1]["num_chs"] and model.num_classes == 0
    rebuilt = PolyNet(**config.to_dict()).eval()
    assert rebuilt.config == config and rebuilt.num_features == model.num_features
    rebuilt.load_state_dict(model.state_dict())  # the same modules, strictly
    x = torch.randn(2, 1, 28, 28)
    assert torch.allclose(rebuilt(x), model(x))
