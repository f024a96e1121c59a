import numpy as np
import pytest
import torch
from PIL import Image

import polynet
from polynet.data import (
    MAX_IMAGE_PIXELS,
    FashionMNIST,
    UnreadableImageError,
    build_dataset,
    eval_transform,
    read_image,
    train_transform,
)

FASHION = polynet.data.fashion_mnist_dir()
needs_fashion = pytest.mark.skipif(
    not (FASHION / "t10k-images-idx3-ubyte.gz").is_file(), reason="dataset-fashion-mnist missing"
)


def make_folder(root, classes=("cat", "dog"), per_class=2, split="train", size=(12, 10)):
    for c, name in enumerate(classes):
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", size, (40 * c, 100, 10 * i)).save(folder / f"{i}.png")
    return root


@needs_fashion
def test_fashion_mnist_decoded_once_into_tensors():
    test = build_dataset("fashion-mnist", "test")
    assert isinstance(test, FashionMNIST)
    assert len(test) == 10_000 and test.images.dtype == torch.uint8
    assert test.images.shape == (10_000, 28, 28) and len(test.classes) == 10
    img, label = test[0]
    assert img.mode == "L" and img.size == (28, 28) and label == int(test.targets[0])
    assert len(build_dataset("fashion-mnist", "val")) == 10_000  # val aliases test


def test_missing_fashion_mnist_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYNET_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        build_dataset("fashion-mnist", "train")


def test_truncated_fashion_mnist_file_is_reported(tmp_path):
    import gzip

    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(b"\x00\x00\x08\x03" + (5).to_bytes(4, "big") * 3 + b"\x00" * 10)
    with pytest.raises(ValueError, match="truncated"):
        build_dataset(str(tmp_path), "train")


def test_folder_classes_labels_and_ignored_files(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    ds = build_dataset(str(tmp_path), "train")
    assert ds.classes == ["cat", "dog"] and len(ds) == 4
    img, label = ds[3]
    assert img.mode == "RGB" and label == 1


def test_val_subset_keeps_training_labels_and_extra_class_is_an_error(tmp_path):
    make_folder(tmp_path, ("a", "b", "c"))
    make_folder(tmp_path, ("b",), split="val")
    val = build_dataset(str(tmp_path), "val")
    assert val.classes == ["a", "b", "c"] and {label for _, label in val.samples} == {1}
    make_folder(tmp_path, ("zebra",), split="val")
    with pytest.raises(ValueError, match="zebra"):
        build_dataset(str(tmp_path), "val")


def test_empty_class_folder_and_missing_split_are_errors(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(ValueError, match="without images.*empty"):
        build_dataset(str(tmp_path), "train")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset(str(tmp_path), "val")
    with pytest.raises(FileNotFoundError, match="neither"):
        build_dataset(str(tmp_path / "nowhere"), "train")


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty file"),
        (b"this is text, not an image", "cannot identify"),
        ("truncated", "(?i)truncated"),
    ],
)
def test_unreadable_images_raise_from_getitem(tmp_path, content, reason):
    make_folder(tmp_path)
    bad = tmp_path / "train" / "cat" / "bad.jpg"
    if content == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
            bad, quality=95
        )
        bad.write_bytes(bad.read_bytes()[:600])
    else:
        bad.write_bytes(content)
    ds = build_dataset(str(tmp_path), "train")
    index = [p for p, _ in ds.samples].index(str(bad))
    with pytest.raises(UnreadableImageError, match=reason) as info:
        ds[index]
    assert info.value.path == str(bad) and isinstance(info.value, ValueError)


def test_decompression_bomb_is_refused(tmp_path):
    side = int(MAX_IMAGE_PIXELS**0.5) + 10
    path = tmp_path / "bomb.png"
    Image.new("1", (side, side)).save(path)  # a few KB on disk, ~190 MP decoded
    with pytest.raises(UnreadableImageError, match="decompression bomb"):
        read_image(path)


def test_colour_modes_decode_correctly(tmp_path):
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(cmyk)  # pure red
    r, g, b = read_image(cmyk).getpixel((1, 1))
    assert r > 240 and g < 15 and b < 15

    grey16 = tmp_path / "grey16.png"
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(grey16)
    assert read_image(grey16).getpixel((0, 0)) == (128, 128, 128)  # not clipped to 255

    palette = Image.new("P", (8, 8))
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.putpixel((0, 0), 1)
    palette.save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").getpixel((0, 0)) == (10, 200, 30)

    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 0))  # fully transparent black shows as white
    rgba.save(tmp_path / "a.png")
    decoded = read_image(tmp_path / "a.png")
    assert decoded.getpixel((0, 0)) == (255, 0, 0) and decoded.getpixel((1, 0)) == (255,) * 3

    Image.new("L", (8, 8), 77).save(tmp_path / "l.png")
    assert read_image(tmp_path / "l.png").getpixel((2, 2)) == (77, 77, 77)


def test_transforms_match_model_channels():
    grey = Image.new("L", (30, 30), 128)
    rgb = Image.new("RGB", (30, 30), (255, 0, 0))
    small = polynet.create_model("polynet_small").pretrained_cfg
    assert train_transform(small)(rgb).shape == (1, 28, 28)  # RGB -> grey for a 1-channel model
    rgb_cfg = {**small, "input_size": (3, 28, 28)}
    out = eval_transform(rgb_cfg)(grey)
    assert out.shape == (3, 28, 28)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])  # channel repetition


def test_train_transform_is_seeded_by_torch_and_random():
    cfg = {"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), np.uint8))
    t = train_transform(cfg)
    torch.manual_seed(3)
    a = t(img)
    torch.manual_seed(3)
    assert torch.equal(a, t(img))
    assert not torch.equal(a, t(img))


def test_eval_transform_center_and_squash():
    img = Image.new("RGB", (400, 300))
    center = eval_transform({"input_size": (3, 224, 224), "crop_pct": 0.875})
    assert [type(s).__name__ for s in center.transforms][1:3] == ["Resize", "CenterCrop"]
    assert center.transforms[1].size == 256
    squash = eval_transform(polynet.model.zoo.MODELS["polynet_very_deep"].cfg)
    assert squash.transforms[1].size == (378, 378)  # 331 / (331/378), not floored to 377
    assert squash(img).shape == (3, 331, 331)
