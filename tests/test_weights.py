import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import safetensors
import torch
from PIL import Image
from pretrainedmodels.models.polynet import PolyNet as PortPolyNet
from timm.data import ImageNetInfo
from timm.models._manipulate import adapt_input_conv
from torchvision.transforms import CenterCrop, Resize

import polynet
from polynet.cli import main
from polynet.data import eval_transform
from polynet.inference.predict import predict
from polynet.io.checkpoint import CheckpointError, save_checkpoint
from polynet.io.loading import convert, load_model
from polynet.io.weights import (
    WeightsFile,
    fit_state_dict,
    load_pretrained,
    port_key_map,
    preprocessing,
    read_weights,
    save_weights,
)

SMALL_CLASSES = [f"item {i}" for i in range(10)]


def _meta(name="polynet_very_deep", **kwargs):
    with torch.device("meta"):
        return polynet.create_model(name, **kwargs)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A polynet_small training checkpoint with non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    model = polynet.create_model("polynet_small")
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("small") / "small.pt"
    save_checkpoint(
        path,
        dict(
            model_name="polynet_small",
            model_kwargs={},
            model=model.state_dict(),
            class_names=SMALL_CLASSES,
        ),
    )
    return path, model.eval()


# --- the port's key layout (structure only: meta device, no memory, no compute) -------------


def test_port_key_map_is_a_bijection_onto_the_port_with_equal_shapes():
    ours, port = _meta(), None
    with torch.device("meta"):
        port = PortPolyNet(num_classes=1000)
    key_map = port_key_map(ours)
    ours_sd, port_sd = ours.state_dict(), port.state_dict()
    assert list(key_map) == list(ours_sd)
    assert sorted(key_map.values()) == sorted(port_sd)  # every port key, each exactly once
    assert len(port_sd) == 3104
    for ours_key, port_key in key_map.items():
        assert ours_sd[ours_key].shape == port_sd[port_key].shape, (ours_key, port_key)
    # Examples named in the reference, checked explicitly.
    assert key_map["stem.conv1.conv.weight"] == "stem.conv1.0.conv.weight"
    assert key_map["stage_a.3.blocks.G.norms.0.0.2.running_var"] == (
        "stage_a.3.blocks.1.path0.2.bn.running_var"
    )
    assert key_map["stage_b.0.blocks.F.convs.0.1.weight"] == "stage_b.0.path0_1x7.conv.weight"
    assert key_map["stage_b.0.blocks.F.norms.2.0.1.weight"] == (
        "stage_b.0.path0_1x7.bn_blocks.2.weight"
    )
    assert key_map["stage_b.0.blocks.F.proj.1.conv.weight"] == (
        "stage_b.0.conv2d_blocks.1.conv.weight"
    )
    assert key_map["stage_b.1.blocks.F.convs.1.0.weight"] == "stage_b.1.blocks.0.path1.conv.weight"
    assert key_map["stage_c.0.blocks.F.convs.0.2.weight"] == "stage_c.0.path0_3x1.conv.weight"
    assert key_map["reduction_b.branches.2.1.bn.bias"] == "reduction_b.path2.1.bn.bias"
    assert key_map["stem.mixed3.branches.1.0.conv.weight"] == "stem.conv2_branch.conv.weight"


def test_port_key_map_refuses_models_the_port_cannot_express():
    with pytest.raises(ValueError, match="no released-port layout"):
        port_key_map(_meta("polynet_small"))
    with pytest.raises(ValueError, match="no counterpart in the released port"):
        port_key_map(_meta("polynet_6_12_6_mpoly3"))


def test_port_file_without_batchnorm_counters_is_accepted():
    """Files saved before PyTorch 0.4 have no num_batches_tracked."""
    with torch.device("meta"):
        port_sd = PortPolyNet().state_dict()
    old = {k: v for k, v in port_sd.items() if not k.endswith("num_batches_tracked")}
    model = _meta()
    state = fit_state_dict(WeightsFile(Path("old.pth"), old, "state_dict"), model, adapt=False)
    assert set(state) == set(model.state_dict())
    assert int(state["stem.conv1.bn.num_batches_tracked"]) == 0


# --- the acceptance test: the real port, random weights, logits within 1e-4 -----------------


@pytest.fixture(scope="module")
def port_file(tmp_path_factory):
    """The port with random weights and randomised BatchNorm statistics, saved like the release."""
    torch.manual_seed(0)
    port = PortPolyNet(num_classes=1000)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in port.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
    path = tmp_path_factory.mktemp("port") / "polynet-random.pth"
    torch.save(port.state_dict(), path)
    return path, port.eval()


@pytest.fixture(scope="module")
def converted_port_file(port_file, tmp_path_factory):
    """``polynet convert`` of the random port file, and its summary."""
    dst = tmp_path_factory.mktemp("converted") / "polynet_very_deep.safetensors"
    return dst, convert(port_file[0], dst)


@pytest.mark.slow
@pytest.mark.xdist_group("released_port")  # share the 380 MB port file
def test_released_port_logits_match_after_conversion(port_file, converted_port_file):
    src, port = port_file
    dst, summary = converted_port_file
    assert summary["params"] == 95_366_600 and summary["tensors"] == 3104

    with safetensors.safe_open(str(dst), framework="pt") as f:
        meta = f.metadata()
    assert meta["model_name"] == "polynet_very_deep"
    cfg = json.loads(meta["pretrained_cfg"])
    assert cfg["input_size"] == [3, 331, 331] and cfg["crop_mode"] == "squash"
    assert round(331 / cfg["crop_pct"]) == 378
    assert cfg["mean"] == pytest.approx([0.485, 0.456, 0.406])

    # create_model takes the released file directly; the safetensors holds the same tensors.
    ours = polynet.create_model("polynet_very_deep", pretrained=True, checkpoint_path=src).eval()
    converted = read_weights(dst).state_dict
    for key, value in ours.state_dict().items():
        assert torch.equal(value, converted[key]), key

    x = torch.rand(2, 3, 331, 331, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = port(x), ours(x)
    assert expected.abs().max() > 0.1  # a meaningful comparison, not two vectors of zeros
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.xdist_group("released_port")  # share the 380 MB port file
def test_reverse_export_loads_strictly_into_the_port(port_file, converted_port_file, tmp_path):
    _, port = port_file
    ours_file, _ = converted_port_file
    back = tmp_path / "back.pth"
    assert main(["convert", "--to-port", str(ours_file), str(back)]) == 0
    original = {k: v.clone() for k, v in port.state_dict().items()}
    exported = torch.load(back, weights_only=True)
    port.load_state_dict(exported, strict=True)
    for key, value in original.items():
        assert torch.equal(exported[key], value), key


# --- fine-tuning adaptations ------------------------------------------------------------------


def test_other_num_classes_reinitialises_the_classifier_with_a_warning(small_checkpoint):
    path, source = small_checkpoint
    with pytest.warns(UserWarning, match="10-class classifier; it is re-initialised"):
        model = polynet.create_model("polynet_small", num_classes=3, checkpoint_path=path)
    assert model.last_linear.weight.shape == (3, model.num_features)
    src = source.state_dict()
    for key, value in model.state_dict().items():
        if not key.startswith("last_linear"):
            assert torch.equal(value, src[key]), key


def test_other_in_chans_adapts_the_first_conv_as_timm_does(small_checkpoint):
    path, source = small_checkpoint
    model = polynet.create_model("polynet_small", in_chans=3, checkpoint_path=path)
    expected = adapt_input_conv(3, source.stem.conv1.conv.weight, base_chans=1)
    assert model.stem.conv1.conv.weight.shape[1] == 3
    torch.testing.assert_close(model.stem.conv1.conv.weight, expected)
    # A grey image repeated over 3 channels gives the same logits as the 1-channel model.
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x.repeat(1, 3, 1, 1)), source(x), atol=1e-5, rtol=0)


# --- formats and round trips --------------------------------------------------------------------


def test_checkpoint_converts_to_safetensors_with_metadata(small_checkpoint, tmp_path):
    path, source = small_checkpoint
    dst = tmp_path / "small.safetensors"
    assert main(["convert", str(path), str(dst)]) == 0
    weights = read_weights(dst)
    assert weights.kind == "safetensors" and weights.model_name == "polynet_small"
    assert weights.class_names == SMALL_CLASSES
    assert weights.pretrained_cfg["input_size"] == [1, 28, 28]
    model, _ = load_model(dst)
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), atol=0, rtol=0)


def test_destination_must_be_safetensors(small_checkpoint, tmp_path, capsys):
    path, _ = small_checkpoint
    assert main(["convert", str(path), str(tmp_path / "out.pth")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err


# --- clear failures -----------------------------------------------------------------------------


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("polynet: error:"), err
    return err


def test_wrong_architecture_is_one_error_listing_first_mismatches(small_checkpoint, capsys):
    path, _ = small_checkpoint
    with pytest.raises(CheckpointError) as info:
        polynet.create_model("polynet_small_ir", checkpoint_path=path)
    message = str(info.value)
    assert "does not fit polynet_small_ir" in message
    assert "unexpected keys (first: stage_a.0.blocks.G." in message
    assert "it holds polynet_small weights" in message
    # A file that names its model fixes the architecture: another --model is refused at once.
    assert main(["convert", str(path), "x.safetensors", "--model", "polynet_very_deep"]) == 2
    err = _one_line_error(capsys)
    assert "holds polynet_small weights, not polynet_very_deep" in err
    # Its tensors in a model of another shape: one error naming keys and shapes.
    with pytest.raises(CheckpointError) as info:
        polynet.create_model("polynet_small", width_mult=0.25, checkpoint_path=path)
    assert "wrong shapes (file vs model) (first: stem.conv1.conv.weight" in str(info.value)


def test_missing_unexpected_and_misshapen_keys_are_listed(small_checkpoint, tmp_path):
    _, source = small_checkpoint
    state = dict(source.state_dict())
    del state["stage_c.0.blocks.G.proj.0.bn.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["last_linear.bias"] = torch.zeros(11)
    path = tmp_path / "edited.pth"
    torch.save(state, path)
    model = polynet.create_model("polynet_small")
    with pytest.raises(CheckpointError) as info:
        fit_state_dict(read_weights(path), model, adapt=False)
    message = str(info.value)
    assert "1 missing keys (first: stage_c.0.blocks.G.proj.0.bn.bias)" in message
    assert "1 unexpected keys (first: extra.weight)" in message
    assert "last_linear.bias (11,) vs (10,)" in message


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file_is_a_clear_error(small_checkpoint, tmp_path, suffix, capsys):
    path, source = small_checkpoint
    whole = tmp_path / f"whole{suffix}"
    if suffix == ".pth":
        torch.save(source.state_dict(), whole)
    else:
        convert(path, whole)
    data = whole.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read"):
        load_pretrained(polynet.create_model("polynet_small"), cut)
    assert main(["convert", str(cut), str(tmp_path / "out.safetensors")]) == 2
    assert "truncated" in _one_line_error(capsys)


class _CreatesMarker:
    """A pickle payload that creates a file when unpickled: stands for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_carrying_code_is_refused_and_never_run(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pth"
    torch.save({"stem.conv1.conv.weight": torch.zeros(1), "payload": _CreatesMarker(marker)}, evil)

    with pytest.raises(CheckpointError, match="carries code, which is refused"):
        polynet.create_model("polynet_small", checkpoint_path=evil)
    assert main(["convert", str(evil), str(tmp_path / "out.safetensors")]) == 2
    assert "refused" in _one_line_error(capsys)
    assert main(["predict", str(evil), "--checkpoint", str(evil)]) == 2
    _one_line_error(capsys)
    assert not marker.exists()

    # The file really carries code: an unsafe unpickler runs it.
    with open(evil, "rb") as f:
        torch.load(f, weights_only=False, pickle_module=pickle)
    assert marker.exists()


def test_missing_file_is_a_clear_error(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nope.pth"), str(tmp_path / "x.safetensors")]) == 2
    assert "does not exist" in _one_line_error(capsys)


# --- predict ------------------------------------------------------------------------------------


def _images(tmp_path, n=2):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        pixels = rng.integers(0, 256, size=(40 + 7 * i, 30, 3), dtype=np.uint8)
        path = tmp_path / f"img{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def test_predict_prints_top5_with_recorded_class_names(small_checkpoint, tmp_path, capsys):
    path, _ = small_checkpoint
    images = _images(tmp_path)
    assert main(["predict", *map(str, images), "--checkpoint", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(images[0]) and lines[6] == str(images[1])
    ranked = lines[1:6]
    assert [line.split(".")[0].strip() for line in ranked] == ["1", "2", "3", "4", "5"]
    assert all(any(name in line for name in SMALL_CLASSES) for line in ranked)


def test_predict_uses_imagenet_names_and_sorted_probabilities(tmp_path):
    model = polynet.create_model("polynet_small", num_classes=1000).eval()
    top = predict(model, _images(tmp_path, 3), top_k=5)
    info = ImageNetInfo()
    names = {info.index_to_description(i) for i in range(1000)}
    assert len(top) == 3 and all(len(t) == 5 for t in top)
    for preds in top:
        assert all(p.label in names for p in preds)
        probs = [p.probability for p in preds]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


def test_released_preprocessing_is_squash_378_then_centre_crop_331(tmp_path):
    cfg = preprocessing(_meta())  # what convert stores in the safetensors metadata
    transform = eval_transform(cfg)
    resize = next(t for t in transform.transforms if isinstance(t, Resize))
    crop = next(t for t in transform.transforms if isinstance(t, CenterCrop))
    assert tuple(resize.size) == (378, 378) and tuple(crop.size) == (331, 331)
    image = Image.fromarray(np.zeros((300, 500, 3), dtype=np.uint8))
    assert transform(image).shape == (3, 331, 331)


def test_tied_weights_of_norms_sharing_round_trip_through_safetensors(tmp_path):
    kwargs = dict(sharing="norms", width_mult=0.0625)
    model = polynet.create_model("polynet_small", **kwargs).eval()
    path = tmp_path / "small.safetensors"
    save_weights(path, model.state_dict(), "polynet_small", model.config.to_dict())
    loaded, _ = load_model(path)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    block = loaded.stage_b[1].blocks["F"]  # the poly-2 unit
    assert block.proj[1].conv is block.proj[0].conv  # still one module after loading


def test_the_model_record_owns_its_payload_keys_and_reads_older_spellings():
    from polynet.io.checkpoint import ModelRecord

    state = {"w": torch.ones(2)}
    record = ModelRecord("polynet_small", state, {"spec": "A: ir"}, class_names=["a", "b"])
    payload = record.payload(optimizer={"lr": 1.0})
    assert payload["model"] is not state and torch.equal(payload["model"]["w"], state["w"])
    assert payload["class_names"] == ["a", "b"] and payload["optimizer"] == {"lr": 1.0}
    with pytest.raises(ValueError, match="belong to the model record"):
        record.payload(model_name="other")
    older = {"model_name": "polynet_small", "model": state, "classes": ["x", "y"]}
    read = ModelRecord.read(older)  # before class_names was settled
    assert read.class_names == ["x", "y"] and read.model_config == {}
