import onnx
import pytest
import torch

import polynet
from polynet.cli import main
from polynet.inference.export import example_input, export, export_onnx, onnx_max_error
from polynet.io.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    model = polynet.create_model("polynet_small")
    for module in model.modules():  # non-trivial statistics so that eval-mode BN matters
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _batch_dim(path) -> str:
    graph = onnx.load(str(path), load_external_data=False).graph
    return graph.input[0].type.tensor_type.shape.dim[0].dim_param


def test_small_model_onnx_matches_pytorch_for_any_batch(small_model, tmp_path):
    path = export_onnx(small_model, tmp_path / "small.onnx")
    assert _batch_dim(path) == "batch"
    for batch_size in (1, 5):  # traced at 2: the batch dimension is dynamic
        assert (
            onnx_max_error(small_model, path, example_input(small_model, batch_size=batch_size))
            < 1e-4
        )


def test_torchscript_matches_pytorch(small_model, tmp_path):
    path = export(small_model, tmp_path / "small.pt", "torchscript")
    with pytest.warns(FutureWarning):  # torch.jit.load is deprecated but works
        loaded = torch.jit.load(str(path))
    x = example_input(small_model, batch_size=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small_model(x), atol=1e-5, rtol=0)


def test_unknown_format_is_an_error(small_model, tmp_path):
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export(small_model, tmp_path / "x", "tflite")


def test_cli_exports_a_checkpoint_and_checks_it(small_model, tmp_path, capsys):
    checkpoint = tmp_path / "small.pt"
    save_checkpoint(checkpoint, dict(model_name="polynet_small", model=small_model.state_dict()))
    out = tmp_path / "small.onnx"
    argv = ["export", "polynet_small", "--checkpoint", str(checkpoint), "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "input 1x28x28, any batch" in printed
    error = float(printed.split("max |difference| ")[1])
    assert error < 1e-4
    assert main(["export", "polynet_smal", "--out", str(out)]) == 2
    assert "did you mean polynet_small" in capsys.readouterr().err


@pytest.mark.slow
def test_very_deep_onnx_matches_pytorch(tmp_path):
    """The released architecture, all 40 units and 95M parameters, at a small input to save time.

    BatchNorm statistics are randomised so that every normalisation is exercised.
    """
    torch.manual_seed(0)
    model = polynet.create_model("polynet_very_deep")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
    model.eval()
    size = (3, 107, 107)  # 107 -> 11 -> 5 -> 2 px at the three stages
    path = export_onnx(model, tmp_path / "very_deep.onnx", input_size=size)
    assert _batch_dim(path) == "batch"
    x = example_input(model, size, batch_size=3)
    with torch.no_grad():
        assert model(x).abs().max() > 0.1  # logits of a meaningful scale
    assert onnx_max_error(model, path, x) < 1e-4
