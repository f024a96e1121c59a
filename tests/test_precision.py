"""bf16 and int8 inference (inference.fuse precision=..., inference.quantize) keep accuracy.

Accuracy bounds, on 1000 Fashion-MNIST test images of a small model trained for 64 steps:
bf16 top-1 within 0.5 points of fp32 and int8 within 1 point (at this tiny width a few flipped
images are a large share; the issue's 0.5-point bound for int8 is for full-size models).
"""

import copy
import json

import pytest
import torch
from torch import nn

import polynet
from _shared import needs_fashion
from polynet.cli import main
from polynet.data import build_dataset
from polynet.devices import default_precision, native_bf16, resolve_precision
from polynet.errors import UserError
from polynet.evaluation import SingleCrop, evaluate
from polynet.inference.fuse import CastModel, PackedConv2d, inference_model, optimize_for_inference
from polynet.inference.quantize import OnnxRuntimeModel
from polynet.io.loading import load_model
from polynet.training import train

torch.set_num_threads(1)

SMALL = dict(width_mult=0.0625, sharing="released", stem_stride=2)
TEST_IMAGES = 1000


def _random_model() -> nn.Module:
    """A small PolyNet with non-trivial BatchNorm statistics (from two random batches)."""
    torch.manual_seed(0)
    model = polynet.create_model("polynet_small", **SMALL)
    model.train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None  # a plain average over the batches
        for _ in range(2):
            model(torch.randn(16, 1, 28, 28))
    return model.eval()


def test_bf16_fused_matches_bf16_eager_and_fp32():
    model = _random_model()
    x = torch.randn(8, 1, 28, 28)
    fused = optimize_for_inference(model, precision="bf16")
    assert isinstance(fused, CastModel) and fused.num_classes == model.num_classes
    convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(m.weight.dtype == torch.bfloat16 for m in convs)
    assert all(isinstance(m, PackedConv2d) for m in convs)  # packed bf16, ReLU post-ops
    assert any(m.post_op == "relu" for m in convs)
    eager = CastModel(copy.deepcopy(model).to(torch.bfloat16), torch.bfloat16)
    with torch.no_grad():
        expected, got, reference = eager(x), fused(x), model(x)
    assert got.dtype == torch.float32 and got.shape == reference.shape
    scale = reference.abs().max()
    # bf16 keeps 8 bits of mantissa: each layer rounds at ~0.4 %; the eager copy also rounds
    # its BatchNorm separately, so the two bf16 results differ by a few such steps.
    assert (got - expected).abs().max() <= 0.05 * scale
    assert (got - reference).abs().max() <= 0.05 * scale


def test_fp32_path_is_unchanged_by_the_precision_argument():
    model = _random_model()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        default, explicit = (
            optimize_for_inference(model)(x),
            optimize_for_inference(model, precision="fp32")(x),
        )
        assert torch.equal(default, explicit)
        assert torch.allclose(default, model(x), atol=1e-4, rtol=0)
    assert inference_model(model, "fp32", fuse=False) is model


def test_int8_runs_on_torch_tensors_close_to_fp32():
    model = _random_model()
    calibration = [torch.randn(16, 1, 28, 28) for _ in range(2)]
    int8 = optimize_for_inference(model, precision="int8", calibration=calibration)
    assert isinstance(int8, OnnxRuntimeModel) and int8.num_classes == model.num_classes
    x = torch.randn(5, 1, 28, 28)  # another batch size than the calibration batches
    with torch.no_grad():
        got, reference = int8(x), model(x)
    assert got.dtype == torch.float32 and got.shape == reference.shape
    assert (got - reference).abs().max() <= 0.15 * reference.abs().max()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: optimize_for_inference(m, precision="int8"), "calibration"),
        (lambda m: optimize_for_inference(m, precision="fp16"), "unknown precision"),
        (lambda m: resolve_precision("int4"), "unknown precision"),
    ],
)
def test_bad_precisions_are_one_line_errors(call, message):
    with pytest.raises(UserError, match=message):
        call(_random_model())


def test_native_bf16_follows_the_cpu_flags(monkeypatch):
    import polynet.devices as devices

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(devices, "_cpu_flags", lambda: {"avx2", "avx512_bf16"})
    assert native_bf16("cpu") and default_precision("cpu") == "bf16"
    monkeypatch.setattr(devices, "_cpu_flags", lambda: {"avx2"})
    assert not native_bf16("cpu") and default_precision("cpu") == "fp32"
    assert resolve_precision("auto", "cpu") == "fp32"


def test_training_autocast_auto_follows_the_hardware_and_is_part_of_the_identity(monkeypatch):
    import polynet.devices as devices
    from polynet.training import build_config, run_identity

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    for flags, chosen in (({"avx512_bf16"}, "bf16"), ({"amx_bf16"}, "bf16"), (set(), "none")):
        monkeypatch.setattr(devices, "_cpu_flags", lambda flags=flags: flags)
        assert devices.training_amp("auto", "cpu") == chosen
        # A cache keyed by the identity never mixes an fp32 run with a bf16 one.
        assert run_identity(build_config(amp="auto", device="cpu"))["amp"] == chosen
    assert devices.training_amp("bf16", "cpu") == "bf16"  # asked for: emulated where not native
    with pytest.raises(UserError, match="--amp fp16 needs CUDA"):
        devices.training_amp("fp16", "cpu")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small PolyNet trained for 64 steps on Fashion-MNIST: its checkpoint file."""
    out = tmp_path_factory.mktemp("precision") / "run"
    train(
        dict(
            model="polynet_small",
            model_kwargs=SMALL,
            data="fashion-mnist",
            train_subset=2048,
            batch_size=32,
            epochs=1,
            lr=0.05,
            lr_schedule="cosine",
            weight_decay=0.0,
            crop_scale=(0.8, 1.0),
            progress=False,
            final_eval=False,
            workers=0,
            out=str(out),
        )
    )
    return out / "last.pt"


@needs_fashion
def test_bf16_and_int8_accuracy_is_within_bounds_of_fp32(trained):
    model, _ = load_model(trained)
    test = build_dataset("fashion-mnist", "val")
    calibration = build_dataset("fashion-mnist", "train")
    top1 = {}
    for precision in ("fp32", "bf16", "int8"):
        result = evaluate(
            model,
            test,
            SingleCrop(),
            batch_size=250,
            device="cpu",
            limit=TEST_IMAGES,
            progress=False,
            precision=precision,
            calibration=calibration,
        )
        assert result.precision == precision
        top1[precision] = result.metrics.summary()["top1_accuracy"]  # in percent
    print("top-1 by precision:", top1)
    assert top1["fp32"] > 50.0, top1  # it learned something, so flips would show
    assert abs(top1["bf16"] - top1["fp32"]) <= 0.5, top1
    assert abs(top1["int8"] - top1["fp32"]) <= 1.0, top1


@needs_fashion
def test_cli_precision_is_printed_and_reported(trained, tmp_path, capsys):
    report = tmp_path / "report.json"
    args = ["eval", "--checkpoint", str(trained), "--data", "fashion-mnist", "--limit", "64"]
    args += ["--precision", "int8", "--no-progress", "--workers", "0", "--json", str(report)]
    assert main(args) == 0
    assert "in int8" in capsys.readouterr().out
    assert '"precision": "int8"' in report.read_text()
    images = []
    for i, (image, _) in zip(range(3), build_dataset("fashion-mnist", "val"), strict=False):
        path = tmp_path / f"{i}.png"
        image.save(path)
        images.append(str(path))
    assert main(["predict", *images, "--checkpoint", str(trained), "--precision", "bf16"]) == 0
    assert "polynet: precision bf16" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["predict", images[0], "--checkpoint", str(trained), "--precision", "fp16"])


def test_fp32_in_onnx_runtime_equals_the_torch_copy():
    model = _random_model()
    ort = optimize_for_inference(model, runtime="onnxruntime")
    assert isinstance(ort, OnnxRuntimeModel) and ort.num_classes == model.num_classes
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ort(x), optimize_for_inference(model)(x), atol=1e-4, rtol=0)
        torch.testing.assert_close(ort(x), model(x), atol=1e-4, rtol=0)
    with pytest.raises(UserError, match="no bf16 convolutions"):
        optimize_for_inference(model, precision="bf16", runtime="onnxruntime")
    with pytest.raises(UserError, match="unknown runtime 'tvm'"):
        inference_model(model, "fp32", runtime="tvm")
    assert resolve_precision("auto", "cpu", "onnxruntime") == "fp32"  # never bf16 there


@needs_fashion
def test_cli_onnx_runtime_is_printed_reported_and_agrees_with_torch(trained, tmp_path, capsys):
    reports = {}
    for runtime in ("torch", "onnxruntime"):
        report = tmp_path / f"{runtime}.json"
        args = ["eval", "--checkpoint", str(trained), "--data", "fashion-mnist", "--limit", "200"]
        args += ["--precision", "fp32", "--runtime", runtime, "--no-progress", "--workers", "0"]
        assert main([*args, "--json", str(report)]) == 0
        reports[runtime] = json.loads(report.read_text())
    assert reports["onnxruntime"]["runtime"]["engine"] == "onnxruntime"
    assert reports["torch"]["runtime"]["engine"] == "torch"
    top1 = {k: r["metrics"]["top1_accuracy"] for k, r in reports.items()}
    assert abs(top1["onnxruntime"] - top1["torch"]) <= 0.5, top1  # one image of 200 at most
    capsys.readouterr()
    args = ["eval", "--checkpoint", str(trained), "--data", "fashion-mnist", "--limit", "8"]
    assert main([*args, "--runtime", "onnxruntime", "--no-progress", "--workers", "0"]) == 0
    assert "polynet: precision fp32 (auto), onnxruntime" in capsys.readouterr().err
    assert main([*args, "--runtime", "onnxruntime", "--precision", "bf16"]) == 2
    assert "no bf16 convolutions" in capsys.readouterr().err
    images = []
    for i, (image, _) in zip(range(3), build_dataset("fashion-mnist", "val"), strict=False):
        image.save(tmp_path / f"{i}.png")
        images.append(str(tmp_path / f"{i}.png"))
    printed = {}
    for runtime in ("torch", "onnxruntime"):
        flags = ["--precision", "fp32", "--runtime", runtime, "--top-k", "1"]
        assert main(["predict", *images, "--checkpoint", str(trained), *flags]) == 0
        out, err = capsys.readouterr()
        assert err.startswith("polynet: precision fp32") and (runtime in err) == (
            runtime == "onnxruntime"
        )
        printed[runtime] = [line.split("%")[1] for line in out.splitlines() if "%" in line]
    assert printed["onnxruntime"] == printed["torch"] and len(printed["torch"]) == 3
