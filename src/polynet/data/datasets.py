"""Data sets: Fashion-MNIST from its Debian package and ImageNet-layout folders.

``build_dataset(source, split, transform)`` returns a map-style data set whose items are
``(transform(pil_image), label)``; every data set has ``.classes``. Fashion-MNIST is decoded once
into a ``uint8`` tensor (``.images``, ``.targets``) so training can batch and augment it on
tensors without per-image PIL work. Folder images are decoded defensively: any colour mode is
converted correctly to RGB, and an unreadable file or a decompression bomb raises
:class:`UnreadableImageError` from ``__getitem__`` for the caller to skip and report.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from polynet.errors import UserError
from polynet.model.registry import FASHION_MNIST_CLASSES

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_ENV = "POLYNET_FASHION_MNIST_DIR"
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
INSTALL_HINT = (
    "install it with 'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu) or put the four "
    f"gzipped IDX files in a folder named by ${FASHION_MNIST_ENV}"
)
# Images above this many pixels are refused as possible decompression bombs (about 180 MP,
# twice Pillow's warning threshold; the released models need 331 x 331).
MAX_IMAGE_PIXELS = 2 * 89_478_485

Transform = Callable[[Image.Image], Any]


# Images with a side below this are refused: resized up to the model's input they are a few
# flat blocks, and training on them or predicting them is noise (Fashion-MNIST is 28 px).
MIN_IMAGE_SIDE = 8


class UnreadableImageError(UserError):
    """An image file that cannot be decoded: corrupt, truncated, not an image or too large.

    Attributes:
        path: The file.
        reason: What went wrong, in a few words.

    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Keep (path, reason) when the error crosses from a DataLoader worker.
        return type(self), (self.path, self.reason)


# --------------------------------------------------------------------------------------------
# Decoding


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, keeping the meaning of the pixel values.

    Pillow's plain ``convert("RGB")`` clips 16/32-bit grey to 255 and drops alpha onto
    whatever colour the transparent pixels happen to hold, so those cases are handled here.
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit grey (PNG/TIFF): scale 0..65535 to 0..255 instead of clipping.
        values = np.asarray(img, dtype=np.float64)
        grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if img.mode == "F":
        grey = np.asarray(img, dtype=np.float64)
        if not np.isfinite(grey).all():  # NaN would cast to an arbitrary byte, inf to 255
            raise ValueError("pixel values are not all finite (NaN or inf in a float image)")
        if grey.size and grey.max() <= 1.0:  # float images are usually in [0, 1]
            grey = grey * 255.0
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), mode="L").convert(
            "RGB"
        )
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels are shown on white, as an image viewer would.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, ...


def read_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image file to an RGB Pillow image.

    Raises:
        UnreadableImageError: If the file is missing, empty, truncated, not an image, has a
            side under :data:`MIN_IMAGE_SIDE` pixels, or has more than
            :data:`MAX_IMAGE_PIXELS` pixels (a possible decompression bomb).

    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise UnreadableImageError(path, "empty file (0 bytes)")
        with warnings.catch_warnings():
            # Pillow only warns between its two thresholds; treat that as a refusal too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if min(width, height) < MIN_IMAGE_SIDE:
                    raise UnreadableImageError(
                        path,
                        f"{width}x{height} pixels is too small to classify (a side under "
                        f"{MIN_IMAGE_SIDE} px carries no picture once resized)",
                    )
                if width * height > MAX_IMAGE_PIXELS:
                    raise UnreadableImageError(
                        path,
                        f"{width}x{height} pixels exceeds the {MAX_IMAGE_PIXELS} pixel limit "
                        "(possible decompression bomb)",
                    )
                img.load()  # decode now so truncation surfaces here, not in a transform
                return _to_rgb(img)
    except UnreadableImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise UnreadableImageError(path, f"possible decompression bomb ({err})") from err
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnreadableImageError(path, reason[:200]) from err


# --------------------------------------------------------------------------------------------
# Fashion-MNIST


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read a gzipped IDX file of unsigned bytes with ``ndim`` dimensions."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise ValueError(
            f"cannot read {path}: {err}; reinstall the data set ({INSTALL_HINT})"
        ) from err
    header = 4 + 4 * ndim
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else -1
    if len(raw) < header or magic != 0x0800 + ndim:
        raise ValueError(f"{path} is not a {ndim}-d IDX file of bytes; reinstall the data set")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - header != math.prod(shape):
        raise ValueError(f"{path} is truncated: expected {math.prod(shape)} values")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


@functools.lru_cache(maxsize=4)
def _read_fashion_mnist(image_file: Path, label_file: Path, stamp: tuple) -> tuple[np.ndarray, ...]:
    """Decode a split once per process (``stamp`` holds the files' mtimes and sizes)."""
    return _read_idx(image_file, 3), _read_idx(label_file, 1)


def fashion_mnist_dir(root: str | os.PathLike | None = None) -> Path:
    """Return the Fashion-MNIST folder: ``root``, ``$POLYNET_FASHION_MNIST_DIR`` or Debian's."""
    return Path(root or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)


class FashionMNIST(Dataset):
    """Fashion-MNIST, decoded once into memory.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000; ``"val"`` is an alias).
        transform: Applied to each 28 x 28 Pillow image of mode ``"L"``.
        root: Folder with the four gzipped IDX files (default: see :func:`fashion_mnist_dir`).

    Attributes:
        images: ``uint8`` tensor of shape (N, 28, 28).
        targets: ``int64`` tensor of shape (N,).
        classes: The ten class names.

    Raises:
        FileNotFoundError: If the files are missing, with the command that installs them.
        ValueError: For an unknown split or corrupt files.

    """

    def __init__(
        self,
        split: str = "train",
        transform: Transform | None = None,
        root: str | os.PathLike | None = None,
    ) -> None:
        split = {"val": "test"}.get(split, split)
        if split not in _FASHION_MNIST_FILES:
            raise ValueError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
        folder = fashion_mnist_dir(root)
        image_file, label_file = (folder / name for name in _FASHION_MNIST_FILES[split])
        for file in (image_file, label_file):
            if not file.is_file():
                raise FileNotFoundError(f"Fashion-MNIST file {file} is missing; {INSTALL_HINT}")
        stamp = tuple((f.stat().st_mtime_ns, f.stat().st_size) for f in (image_file, label_file))
        images, labels = _read_fashion_mnist(image_file, label_file, stamp)
        if len(images) != len(labels) or labels.size and labels.max() >= 10:
            raise ValueError(f"Fashion-MNIST files in {folder} do not match; reinstall them")
        self.images = torch.from_numpy(images.copy())  # writable, owned by this data set
        self.targets = torch.from_numpy(labels.astype(np.int64))
        self.classes = list(FASHION_MNIST_CLASSES)
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = Image.fromarray(self.images[index].numpy(), mode="L")
        return (self.transform(img) if self.transform else img), int(self.targets[index])


# --------------------------------------------------------------------------------------------
# Image folders


def _class_folders(directory: Path) -> list[str]:
    if not directory.is_dir():
        raise FileNotFoundError(
            f"image folder {directory} does not exist; expected <root>/train/<class>/*.jpg and "
            "<root>/val/<class>/*.jpg"
        )
    classes = sorted(e.name for e in os.scandir(directory) if e.is_dir())
    if not classes:
        raise ValueError(f"{directory} holds no class folders; expected {directory}/<class>/*.jpg")
    return classes


class ImageFolder(Dataset):
    """An ImageNet-layout split: ``<root>/<split>/<class>/<image>``.

    Files whose extension is not an image type (``.jpg``, ``.png``, ...) are ignored; a class
    folder without images is an error. Classes are the sorted folder names; for ``"val"`` they
    must be the training classes (a subset is allowed and keeps the training label numbers).

    Args:
        root: The data set root holding ``train/`` and ``val/``.
        split: ``"train"`` or ``"val"``.
        transform: Applied to each RGB Pillow image.

    Raises:
        FileNotFoundError: If the split folder is missing.
        ValueError: For empty class folders or val classes not among the training classes.

    """

    def __init__(self, root: str | os.PathLike, split: str, transform: Transform | None = None):
        if split not in ("train", "val"):
            raise ValueError(f"unknown split {split!r} for an image folder; use 'train' or 'val'")
        root = Path(root)
        own = _class_folders(root / split)
        classes = own
        if split == "val" and (root / "train").is_dir():
            classes = _class_folders(root / "train")
            extra = sorted(set(own) - set(classes))
            if extra:
                raise ValueError(
                    f"{root / 'val'} has classes not in {root / 'train'}: {', '.join(extra[:5])}"
                    "; train and val must use the same class folder names"
                )
        self.classes = classes
        self.class_to_idx = {name: i for i, name in enumerate(classes)}
        self.samples: list[tuple[str, int]] = []
        empty = []
        for name in own:
            files = sorted(
                e.path
                for e in os.scandir(root / split / name)
                if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS)
            )
            if not files:
                empty.append(name)
            self.samples += [(f, self.class_to_idx[name]) for f in files]
        if empty:
            raise ValueError(
                f"class folders without images in {root / split}: {', '.join(empty[:5])}; "
                f"add images ({', '.join(IMG_EXTENSIONS)}) or remove the folders"
            )
        self.targets = [label for _, label in self.samples]
        self.root, self.split, self.transform = root, split, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        img = read_image(path)
        return (self.transform(img) if self.transform else img), label


def build_dataset(source: str, split: str, transform: Transform | None = None) -> Dataset:
    """Build a data set by name or folder.

    Args:
        source: ``"fashion-mnist"`` (the Debian package, or ``$POLYNET_FASHION_MNIST_DIR``), a
            folder with the four Fashion-MNIST IDX files, or an ImageNet-layout root.
        split: ``"train"`` or ``"val"`` (``"test"`` for Fashion-MNIST; ``"val"`` is its alias).
        transform: Applied to each Pillow image (mode ``"L"`` for Fashion-MNIST, ``"RGB"`` for
            folders).

    Returns:
        A map-style data set of ``(transform(image), label)`` with ``.classes``.

    """
    if source.lower().replace("_", "-") in ("fashion-mnist", "fashionmnist"):
        return FashionMNIST(split, transform)
    path = Path(source).expanduser()
    if (path / _FASHION_MNIST_FILES["train"][0]).is_file():
        return FashionMNIST(split, transform, root=path)
    if not path.exists():
        raise FileNotFoundError(
            f"data source {source!r} is neither 'fashion-mnist' nor an existing folder"
        )
    return ImageFolder(path, split, transform)
