"""Hostile and broken inputs through the ``polynet`` command, and files that carry code.

Each case checks what the user sees (exit status 2 and one ``polynet: error:`` line without a
traceback, or a logged skip) and that data, checkpoints and results are left as they were.
Cases already covered elsewhere are listed in docs/reliability.md with their test names.
"""

import errno
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import polynet
from _shared import TINY, needs_fashion
from polynet.cli import main
from polynet.data import MAX_IMAGE_PIXELS
from polynet.io.checkpoint import load_checkpoint, save_checkpoint
from polynet.training.config import TrainConfig

QUICK = dict(
    model="polynet_small",
    model_kwargs=TINY,
    data="fashion-mnist",
    train_subset=32,
    batch_size=16,
    epochs=1,
    lr=0.05,
    weight_decay=0.0,
    eval_every=0,
    final_eval=False,
    workers=0,
    threads=1,
    progress=False,
)


def one_line_error(capsys) -> str:
    """The command's stderr: exactly one ``polynet: error:`` line, no traceback."""
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if not line.startswith("polynet: warning")]
    assert lines and lines[-1].startswith("polynet: error: "), err
    assert "Traceback" not in err and all(
        line.startswith("polynet: ") for line in err.splitlines()
    ), err
    return lines[-1]


def train_cli(tmp_path, capsys=None, extra=(), **values):
    """Run ``polynet train --config <yaml> ...`` with QUICK settings updated by ``values``."""
    config = tmp_path / "config-in.yaml"
    settings = {**QUICK, "out": str(tmp_path / "run"), **values}
    config.write_text(yaml.safe_dump({k: v for k, v in settings.items() if v is not None}))
    return main(["train", "--config", str(config), *extra])


def snapshot(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` but the log (which records refusals)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "train.log"
    }


class CreatesMarker:
    """A pickle payload that creates a file when unpickled: stands for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def evil_checkpoint(path: Path, marker: Path) -> Path:
    """A file shaped like a polynet checkpoint whose unpickling would run code."""
    torch.save({"format": "polynet-checkpoint", "version": 1, "model": CreatesMarker(marker)}, path)
    return path


# ---------------------------------------------------------------------------------------------
# Broken and unusual images in a data set: logged skips, correct decoding, data untouched


def _image_folder(root: Path) -> dict[str, Path]:
    """Two classes of 6 good images in every colour mode plus every kind of broken file."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, name in enumerate(("dark", "light")):
            folder = root / split / name
            folder.mkdir(parents=True)
            base = 40 + 150 * c
            pixels = np.clip(base + rng.integers(-20, 20, (20, 20)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).convert("RGB").save(folder / "rgb.jpg")
            Image.fromarray(pixels).convert("CMYK").save(folder / "cmyk.jpg")
            Image.fromarray(pixels.astype(np.uint16) * 257).save(folder / "grey16.png")
            Image.fromarray(pixels).convert("P").save(folder / "palette.png")
            Image.fromarray(pixels).convert("RGBA").save(folder / "rgba.png")
            Image.fromarray(pixels, mode="L").save(folder / "grey.png")
            (folder / "notes.txt").write_text("not an image extension: ignored")
    broken = root / "train" / "dark"
    bad = {
        "corrupt": broken / "corrupt.jpg",
        "truncated": broken / "truncated.jpg",
        "zero-byte": broken / "empty.png",
        "non-image": broken / "text.jpg",
        "bomb": root / "train" / "light" / "bomb.png",
        "nan": root / "train" / "light" / "nan.tiff",
        "val-corrupt": root / "val" / "light" / "corrupt.png",
    }
    bad["corrupt"].write_bytes(b"\xff\xd8\xff\xe0" + rng.bytes(300))
    noise = Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8))
    noise.save(bad["truncated"], quality=95)
    bad["truncated"].write_bytes(bad["truncated"].read_bytes()[:500])
    bad["zero-byte"].write_bytes(b"")
    bad["non-image"].write_text("hello, I am text with an image name")
    side = int(MAX_IMAGE_PIXELS**0.5) + 10
    Image.new("1", (side, side)).save(bad["bomb"])  # a few KB on disk, ~180 MP decoded
    Image.fromarray(np.full((20, 20), np.nan, np.float32), mode="F").save(bad["nan"])
    bad["val-corrupt"].write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(100))
    return bad


def test_training_skips_broken_images_logs_each_and_leaves_the_data_untouched(tmp_path, capsys):
    data = tmp_path / "data"
    bad = _image_folder(data)
    before = snapshot(data)
    # 18 train images (12 good, 6 broken) in one batch of 18: every file is read once.
    status = train_cli(
        tmp_path, data=str(data), batch_size=18, train_subset=None, eval_every=1,
        model_kwargs=dict(TINY, in_chans=3),
    )  # fmt: skip
    err = capsys.readouterr().err
    assert status == 0, err
    for kind in ("corrupt", "truncated", "zero-byte", "non-image", "bomb", "nan"):
        assert f"skipped unreadable training image {bad[kind]}" in err, kind
    assert "0 bytes" in err and "decompression bomb" in err and "not all finite" in err
    assert f"skipped unreadable validation image {bad['val-corrupt']}" in err
    assert "Traceback" not in err
    assert snapshot(data) == before
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert rows[0]["val_images"] == 12  # the broken validation image is left out, not counted


def test_colour_modes_decode_to_the_same_pixels(tmp_path):
    root = tmp_path / "data"
    _image_folder(root)
    folder = root / "val" / "light"
    reference = np.asarray(polynet.data.read_image(folder / "grey.png"), dtype=int)
    for name in ("cmyk.jpg", "grey16.png", "palette.png", "rgba.png", "rgb.jpg"):
        decoded = np.asarray(polynet.data.read_image(folder / name), dtype=int)
        assert decoded.shape == reference.shape
        error = np.abs(decoded - reference)
        if name.endswith(".jpg"):  # lossy; a wrong conversion (e.g. inverted CMYK) is ~100 off
            assert error.mean() < 6, name
        else:
            assert error.max() == 0, name


@pytest.mark.parametrize(
    "layout, message",
    [
        ("empty-class", "class folders without images in"),
        ("extra-val-class", "has classes not in"),
        ("missing", "is neither 'fashion-mnist' nor an existing folder"),
        ("no-class-folders", "holds no class folders"),
    ],
)
def test_bad_dataset_layouts_are_one_line_errors(tmp_path, capsys, layout, message):
    data = tmp_path / "data"
    for split, classes in (("train", ("a", "b")), ("val", ("a", "b"))):
        for name in classes:
            (data / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8), (9, 9, 9)).save(data / split / name / "x.png")
    if layout == "empty-class":
        (data / "train" / "c").mkdir()
    elif layout == "extra-val-class":
        (data / "val" / "zebra").mkdir()
        Image.new("RGB", (8, 8)).save(data / "val" / "zebra" / "z.png")
    elif layout == "missing":
        data = tmp_path / "nowhere"
    else:
        for name in ("a", "b"):
            for file in (data / "train" / name).iterdir():
                file.unlink()
            (data / "train" / name).rmdir()
    assert train_cli(tmp_path, data=str(data), eval_every=1) == 2
    assert message in one_line_error(capsys)
    # A run that could not start leaves no run behind: the corrected command is not refused.
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_missing_debian_package_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("POLYNET_FASHION_MNIST_DIR", str(tmp_path / "no-package"))
    assert train_cli(tmp_path) == 2
    assert "apt-get install dataset-fashion-mnist" in one_line_error(capsys)


# ---------------------------------------------------------------------------------------------
# Models, inputs and checkpoints that do not fit


@needs_fashion
@pytest.mark.parametrize(
    "values, message",
    [
        (dict(model="polynet_nope"), "unknown model 'polynet_nope'"),
        (dict(model_kwargs=dict(spec="A: ir | B: ir")), "bad network spec"),
        (dict(model_kwargs=dict(width_mult=-1)), "width_mult"),
    ],
)
def test_bad_model_names_and_specs_are_one_line_errors(tmp_path, capsys, values, message):
    assert train_cli(tmp_path, **values) == 2
    assert message in one_line_error(capsys)


def test_inputs_the_model_cannot_take_are_clear_errors():
    model = polynet.create_model("polynet_ir_3_6_3", width_mult=0.0625).eval()
    with pytest.raises(ValueError, match="input 64x64 is smaller than the 75x75"):
        model(torch.zeros(1, 3, 64, 64))
    small = polynet.create_model("polynet_small", **TINY).eval()
    with pytest.raises(ValueError, match=r"expected a batch of shape \(N, 1, H, W\)"):
        small(torch.zeros(1, 3, 28, 28))


@needs_fashion
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_stop_training_and_keep_the_last_good_checkpoint(
    tmp_path, capsys, monkeypatch, bad
):
    from polynet.training import batches

    real = batches.TensorTrainBatches.__call__

    def poisoned(self, indices, epoch, step):
        images, labels = real(self, indices, epoch, step)
        if step == 2:  # third step: after the checkpoint of step 2
            images[0, 0, 5, 5] = bad
        return images, labels

    monkeypatch.setattr(batches.TensorTrainBatches, "__call__", poisoned)
    assert train_cli(tmp_path, checkpoint_every=2, train_subset=64) == 2
    assert "the training loss became" in one_line_error(capsys)
    saved = load_checkpoint(tmp_path / "run" / "last.pt")
    assert saved["train_state"]["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    model = polynet.create_model("polynet_small", **TINY)
    path = tmp_path_factory.mktemp("ckpt") / "small.pt"
    save_checkpoint(
        path, dict(model_name="polynet_small", model_kwargs=TINY, model=model.state_dict())
    )
    return path


@needs_fashion
def test_checkpoint_of_another_model_is_a_one_line_error(small_checkpoint, capsys):
    before = small_checkpoint.read_bytes()
    argv = ["eval", "--checkpoint", str(small_checkpoint), "--data", "fashion-mnist"]
    assert main([*argv, "--model", "polynet_small_ir", "--limit", "4", "--no-progress"]) == 2
    assert "holds polynet_small weights, not polynet_small_ir" in one_line_error(capsys)
    assert small_checkpoint.read_bytes() == before


# ---------------------------------------------------------------------------------------------
# Configuration files and hyperparameters


@pytest.mark.parametrize(
    "text, message",
    [
        ("epochs: 2\nwarmpu: 1\n", "unknown config key 'warmpu'.*did you mean 'warmup'"),
        ("model_kwargs: 3\n", "'model_kwargs' must be a mapping"),
        ("batch_size: 8.5\n", "'batch_size' must be an integer"),
        ("deterministic: yes please\n", "'deterministic' must be true or false"),
        ("- just\n- a list\n", "must hold a mapping"),
        ("epochs: [1\n", "not valid YAML"),
    ],
)
def test_bad_config_files_are_one_line_errors(tmp_path, capsys, text, message):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    import re

    assert re.search(message, one_line_error(capsys))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "-0.1"], "lr must be positive"),
        (["--path-drop", "1.5"], "path_drop must be a probability in [0, 1)"),
        (["--batch-size", "0"], "batch_size must be at least 1"),
        (["--hflip", "2"], "hflip must be a probability"),
        (["--epochs", "0"], "epochs must be positive"),
        (["--crop-scale", "0.9", "0.1"], "crop_scale must satisfy"),
        (["--lr", "nan"], "lr must be positive"),
    ],
)
def test_out_of_range_hyperparameters_are_one_line_errors(tmp_path, capsys, flags, message):
    assert main(["train", "--out", str(tmp_path / "run"), *flags]) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Output folders: unwritable, full, or holding another run


@needs_fashion
@pytest.mark.parametrize("where", ["under-a-file", "sysfs"])
def test_unwritable_output_folder_is_a_one_line_error(tmp_path, capsys, where):
    # The tests run as root, which chmod does not stop: use places no user can create folders
    # in, a path below a regular file and the kernel's read-only sysfs.
    blocker = tmp_path / "a-file"
    blocker.write_text("keep")
    out = blocker / "run" if where == "under-a-file" else Path("/sys/polynet-test-run")
    assert train_cli(tmp_path, out=str(out)) == 2
    assert f"cannot create output folder {out}" in one_line_error(capsys)
    assert blocker.read_text() == "keep"


@needs_fashion
def test_full_disk_while_saving_is_one_line_and_keeps_the_previous_checkpoint(
    tmp_path, capsys, monkeypatch
):
    real_save, saves = torch.save, []

    def full_disk(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    assert train_cli(tmp_path, checkpoint_every=1) == 2
    assert "No space left on device" in one_line_error(capsys)
    out = tmp_path / "run"
    assert load_checkpoint(out / "last.pt")["train_state"]["global_step"] == 1
    assert not list(out.glob(".*.tmp"))


@needs_fashion
def test_folder_holding_a_different_run_is_refused_and_left_intact(tmp_path, capsys):
    assert train_cli(tmp_path) == 0
    capsys.readouterr()
    before = snapshot(tmp_path / "run")
    assert train_cli(tmp_path) == 2
    assert "already holds a run; pass --resume" in one_line_error(capsys)
    assert train_cli(tmp_path, extra=["--resume", "--lr", "0.1"]) == 2
    assert "was started with lr=0.05" in one_line_error(capsys)
    assert snapshot(tmp_path / "run") == before


# ---------------------------------------------------------------------------------------------
# No code from files


@needs_fashion
def test_pickles_carrying_code_are_refused_by_every_command_and_never_run(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    evil = evil_checkpoint(tmp_path / "evil.pt", marker)

    argv = ["eval", "--checkpoint", str(evil), "--data", "fashion-mnist", "--limit", "2"]
    assert main(argv) == 2
    assert "a pickle that carries code, which is refused" in one_line_error(capsys)
    assert main(["grow", "--from", str(evil), "--to", "polynet_small", "--out", "g.pt"]) == 2
    assert "a pickle that carries code, which is refused" in one_line_error(capsys)
    assert train_cli(tmp_path, init_from=str(evil)) == 2
    assert "a pickle that carries code, which is refused" in one_line_error(capsys)

    # As the checkpoint of a run being resumed: refused, and the run is not restarted over it.
    out = tmp_path / "run"
    out.mkdir(exist_ok=True)
    (out / "config.yaml").write_text(
        yaml.safe_dump(TrainConfig(**dict(QUICK, out=str(out))).to_dict(), sort_keys=False)
    )
    evil_checkpoint(out / "last.pt", marker)
    before = snapshot(out)
    assert train_cli(tmp_path, extra=["--resume"]) == 2
    assert "no usable checkpoint" in one_line_error(capsys)
    assert snapshot(out) == before
    assert not marker.exists()


def test_yaml_with_python_tags_is_refused_everywhere(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    tag = f"!!python/object/apply:os.system ['touch {marker}']"
    config = tmp_path / "c.yaml"
    config.write_text(f"epochs: {tag}\n")
    assert main(["train", "--config", str(config)]) == 2
    assert "not valid YAML" in one_line_error(capsys)
    with pytest.raises(SystemExit) as exit_info:  # argparse rejects the flag's value
        main(["train", "--model-kwargs", tag])
    assert exit_info.value.code == 2
    assert "argument --model-kwargs: not valid YAML" in capsys.readouterr().err
    # A tampered config.yaml in the output folder of a run being resumed.
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(f"model: {tag}\n")
    assert main(["train", "--out", str(out), "--resume"]) == 2
    assert "not valid YAML" in one_line_error(capsys)
    assert not marker.exists()
