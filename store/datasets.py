"""Image data sets on disk: scikit-learn's digits, MNIST IDX files and folders of class folders.

A data source has a training pool and a test set; ``plan_splits`` cuts the pool into train
and val, stratified by class and reproducible from a seed. Images are decoded only when a
split is loaded, into float32 arrays ``[N, channels, H, W]`` with pixels in [0, 1].

Accepted ``--data`` values:

* ``digits``: scikit-learn's bundled 8x8 digits (1797 images); a fixed stratified 20% of
  them is the test set, whatever the seed.
* ``mnist:DIR``: the four MNIST IDX files (optionally gzipped) in ``DIR``.
* ``DIR``: one sub-folder of PNG/JPEG/BMP images per class; ``--test`` may name a second
  folder with the same class sub-folders.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from store.errors import InputError

SPLITS = ("train", "val", "test")
POOLS = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")

_DIGITS_TEST_FRACTION = 0.2
_DIGITS_TEST_SEED = 0  # the digits test set must not move when the user changes --seed
_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
_DIGIT_CLASSES = [str(digit) for digit in range(10)]
_IMAGE_SIZE_PATTERN = re.compile(r"\s*(\d+)\s*[xX]\s*(\d+)\s*")


@dataclass(frozen=True)
class ImageSet:
    """One loaded split: pixels in [0, 1], labels and the images' identifiers."""

    images: np.ndarray  # float32 [N, channels, H, W]
    labels: np.ndarray  # int64 [N]
    ids: list[str]


@dataclass(frozen=True)
class SplitPlan:
    """The exact image list of every split (``train``, ``val``, ``test``)."""

    class_names: list[str]
    ids: dict[str, list[str]]
    labels: dict[str, np.ndarray]


# Reads the images ``ids`` of one pool as float32 [N, channels, H, W] in [0, 1].
PoolReader = Callable[[list[str], int, tuple[int, int]], np.ndarray]


@dataclass(frozen=True)
class DataSource:
    """An opened data set: its class names, its two pools and how to read their images."""

    kind: str  # "digits" | "mnist" | "folder"
    description: str
    class_names: list[str]
    native_size: tuple[int, int] | None  # (H, W) shared by all images, None for folders
    pools: dict[str, tuple[list[str], np.ndarray]] = field(repr=False)
    readers: dict[str, PoolReader] = field(repr=False)

    def pool(self, which: str) -> tuple[list[str], np.ndarray]:
        """All ids and int64 labels of the training pool (``train``) or the test set."""
        _check_pool(which)
        ids, labels = self.pools[which]
        return list(ids), labels.copy()

    def load(self, ids: list[str], channels: int, size: tuple[int, int],
             which: str = "train") -> np.ndarray:
        """Decode the images ``ids`` of pool ``which``: float32 ``[N, channels, H, W]`` in [0, 1].

        Ids are looked up in that pool: for folders, the relative paths of the training and the
        test folder may coincide.
        """
        _check_pool(which)
        _check_channels(channels)
        size = _check_size(size)
        if not ids:
            return np.zeros((0, channels, *size), dtype=np.float32)
        return self.readers[which](list(ids), channels, size)


def parse_image_size(text: str) -> tuple[int, int]:
    """Parse ``"HxW"`` (e.g. ``"50x200"``) into ``(50, 200)``."""
    match = _IMAGE_SIZE_PATTERN.fullmatch(text)
    if match is None:
        raise InputError(f"image size must be HEIGHTxWIDTH such as 28x28, got {text!r}")
    height, width = int(match[1]), int(match[2])
    if height < 1 or width < 1:
        raise InputError(f"image size must be positive, got {text!r}")
    return height, width


def open_source(data: str, test: str | None = None) -> DataSource:
    """Open ``digits``, ``mnist:DIR`` or a folder of class folders (``test``: folders only)."""
    if data == "digits" or data.startswith("mnist:"):
        if test is not None:
            raise InputError("--test applies to folder data only")
        return _open_digits() if data == "digits" else _open_mnist(data.removeprefix("mnist:"))
    if not Path(data).exists():
        raise InputError(f"data folder {data} does not exist (--data takes 'digits', "
                         "'mnist:DIR' or a folder with one sub-folder of images per class)")
    return _open_folders(Path(data), None if test is None else Path(test))


def plan_splits(source: DataSource, val_fraction: float, seed: int) -> SplitPlan:
    """Cut the training pool into train and val, stratified by class and reproducible from ``seed``.

    Each class ``c`` gives ``round(val_fraction * n_c)`` of its ``n_c`` pool images to val (at
    least one when ``val_fraction > 0`` and ``n_c >= 2``), drawn by a permutation per class
    from ``np.random.default_rng(seed)``. Both lists keep the pool's order.
    """
    if not 0 <= val_fraction < 1:
        raise InputError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if seed < 0:
        raise InputError(f"--seed must not be negative, got {seed}")
    pool_ids, pool_labels = source.pool("train")
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(pool_ids), dtype=bool)
    for label, name in enumerate(source.class_names):
        members = np.flatnonzero(pool_labels == label)
        if not len(members):
            raise InputError(f"class {name!r} has no images in the training data")
        val_count = _val_count(val_fraction, len(members))
        if val_count >= len(members):
            raise InputError(f"class {name!r} has {len(members)} training images, which leaves "
                             f"none for training with --val-fraction {val_fraction}")
        is_val[members[rng.permutation(len(members))[:val_count]]] = True
    test_ids, test_labels = source.pool("test")
    return SplitPlan(
        class_names=list(source.class_names),
        ids={"train": [pool_ids[i] for i in np.flatnonzero(~is_val)],
             "val": [pool_ids[i] for i in np.flatnonzero(is_val)],
             "test": test_ids},
        labels={"train": pool_labels[~is_val], "val": pool_labels[is_val], "test": test_labels},
    )


def load_split(source: DataSource, plan: SplitPlan, split: str, channels: int,
               size: tuple[int, int]) -> ImageSet:
    """Decode the images of ``split`` as planned: float32 ``[N, channels, H, W]`` in [0, 1]."""
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    ids = list(plan.ids[split])
    images = source.load(ids, channels, size, which="test" if split == "test" else "train")
    return ImageSet(images=images, labels=np.asarray(plan.labels[split], dtype=np.int64), ids=ids)


def folder_images(root: Path) -> tuple[list[str], list[str], np.ndarray]:
    """List a folder of class folders: (sorted class names, relative POSIX ids, int64 labels).

    Every sub-folder not starting with ``.`` is a class; its images are the files (searched
    recursively, hidden ones skipped) ending in .png, .jpg, .jpeg or .bmp, in any case.
    """
    root = Path(root)
    if not root.exists():
        raise InputError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise InputError(f"data folder {root} is not a directory")
    try:
        class_names = sorted(entry.name for entry in root.iterdir()
                             if entry.is_dir() and not entry.name.startswith("."))
        per_class = [_class_images(root / name) for name in class_names]
    except OSError as error:
        raise InputError(f"cannot list data folder {root}: {error.strerror}") from None
    if not class_names:
        raise InputError(f"data folder {root} has no class sub-folders "
                         "(expected one sub-folder of images per class)")
    for name, files in zip(class_names, per_class, strict=True):
        if not files:
            raise InputError(f"class folder {root / name} has no images "
                             f"({', '.join(IMAGE_SUFFIXES)})")
    if len(class_names) < 2:
        raise InputError(f"data folder {root} has only the class {class_names[0]!r}; "
                         "a classifier needs at least 2 classes")
    ids = [file.relative_to(root).as_posix() for files in per_class for file in files]
    labels = np.concatenate([np.full(len(files), label, dtype=np.int64)
                             for label, files in enumerate(per_class)])
    return class_names, ids, labels


def read_folder_images(root: Path, ids: list[str], channels: int,
                       size: tuple[int, int]) -> np.ndarray:
    """Decode the images ``root/id``: float32 ``[N, channels, H, W]`` in [0, 1], resized."""
    _check_channels(channels)
    size = _check_size(size)
    images = np.empty((len(ids), channels, *size), dtype=np.float32)
    for index, image_id in enumerate(ids):
        images[index] = _decode_image(_image_path(Path(root), image_id), channels, size)
    return images


# --- digits -------------------------------------------------------------------------------------


def _open_digits() -> DataSource:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = (digits.images / 16).astype(np.float32)
    labels = digits.target.astype(np.int64)
    pool_rows, test_rows = train_test_split(
        np.arange(len(labels)), test_size=_DIGITS_TEST_FRACTION, stratify=labels,
        random_state=_DIGITS_TEST_SEED)
    pools = {which: ([str(row) for row in sorted(rows)], labels[np.sort(rows)])
             for which, rows in (("train", pool_rows), ("test", test_rows))}
    reader = _array_reader(pixels, {str(row): row for row in range(len(labels))}, "digits")
    return DataSource(
        kind="digits",
        description=f"scikit-learn digits ({len(labels)} images, {len(_DIGIT_CLASSES)} classes)",
        class_names=list(_DIGIT_CLASSES),
        native_size=(pixels.shape[1], pixels.shape[2]),
        pools=pools,
        readers={"train": reader, "test": reader},
    )


# --- MNIST --------------------------------------------------------------------------------------


def _open_mnist(directory_text: str) -> DataSource:
    directory = Path(directory_text).expanduser()  # the shell leaves "mnist:~/x" alone
    if not directory_text or not directory.is_dir():
        raise InputError(f"MNIST folder {directory_text!r} does not exist or is not a directory "
                         "(use --data mnist:DIR)")
    pools, readers, sizes = {}, {}, set()
    for which, (images_name, labels_name) in _MNIST_FILES.items():
        images = _read_idx(directory, images_name, _IDX_IMAGES_MAGIC)
        labels = _read_idx(directory, labels_name, _IDX_LABELS_MAGIC).astype(np.int64)
        if len(images) != len(labels):
            raise InputError(f"{directory / images_name} has {len(images)} images but "
                             f"{labels_name} has {len(labels)} labels")
        if labels.size and labels.max() >= len(_DIGIT_CLASSES):
            raise InputError(f"{directory / labels_name} has label {labels.max()}; "
                             "MNIST labels are 0 to 9")
        ids = [f"{which}/{row}" for row in range(len(labels))]
        pools[which] = (ids, labels)
        readers[which] = _array_reader(images, {image_id: row for row, image_id in enumerate(ids)},
                                       f"MNIST {which}")
        sizes.add(images.shape[1:])
    if len(sizes) != 1:
        raise InputError(f"MNIST files in {directory} disagree on the image size: {sorted(sizes)}")
    (height, width), = sizes
    return DataSource(
        kind="mnist",
        description=(f"MNIST {directory.resolve()} ({len(pools['train'][0])} train + "
                     f"{len(pools['test'][0])} test images)"),
        class_names=list(_DIGIT_CLASSES),
        native_size=(height, width),
        pools=pools,
        readers=readers,
    )


def _read_idx(directory: Path, name: str, magic: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes: big-endian magic, big-endian dims, then the data."""
    path = _idx_path(directory, name)
    raw = _read_bytes(path)
    ndim = magic & 0xFF
    header_length = 4 + 4 * ndim
    if len(raw) < header_length:
        raise InputError(f"{path} is truncated: {len(raw)} bytes, shorter than an IDX header")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise InputError(f"{path} is not the expected IDX file: magic number 0x{found:08x}, "
                         f"expected 0x{magic:08x}")
    dims = tuple(int.from_bytes(raw[4 + 4 * axis:8 + 4 * axis], "big") for axis in range(ndim))
    expected = header_length + math.prod(dims)
    if len(raw) != expected:
        raise InputError(f"{path} is truncated or corrupt: {len(raw)} bytes, expected {expected} "
                         f"for shape {dims}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_length).reshape(dims)


def _idx_path(directory: Path, name: str) -> Path:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise InputError(f"MNIST file {name} (or {name}.gz) not found in {directory}")


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as stream:
                return stream.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:
        raise InputError(f"cannot read {path}: {error}") from None


# --- folders ------------------------------------------------------------------------------------


def _open_folders(root: Path, test_root: Path | None) -> DataSource:
    class_names, ids, labels = folder_images(root)
    pools = {"train": (ids, labels), "test": ([], np.zeros(0, dtype=np.int64))}
    readers = {"train": _folder_reader(root)}
    description = f"folder {root.resolve()} (train)"
    if test_root is not None:
        test_classes, test_ids, test_labels = folder_images(test_root)
        _check_same_classes(root, class_names, test_root, test_classes)
        pools["test"] = (test_ids, test_labels)
        readers["test"] = _folder_reader(test_root)
        description += f" + {test_root.resolve()}"
    else:
        readers["test"] = _folder_reader(root)  # never called: the test pool is empty
    return DataSource(kind="folder", description=description, class_names=class_names,
                      native_size=None, pools=pools, readers=readers)


def _check_same_classes(root: Path, class_names: list[str], test_root: Path,
                        test_classes: list[str]) -> None:
    if test_classes == class_names:
        return
    missing = sorted(set(class_names) - set(test_classes))
    extra = sorted(set(test_classes) - set(class_names))
    differences = ([f"missing {', '.join(missing)}"] if missing else []) + (
        [f"extra {', '.join(extra)}"] if extra else [])
    raise InputError(f"test folder {test_root} has other classes than {root}: "
                     f"{'; '.join(differences)}")


def _class_images(class_dir: Path) -> list[Path]:
    found = []
    for directory, sub_folders, files in os.walk(class_dir, followlinks=True):
        sub_folders[:] = sorted(name for name in sub_folders if not name.startswith("."))
        found.extend(Path(directory) / name for name in sorted(files)
                     if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES))
    return found


def _folder_reader(root: Path) -> PoolReader:
    def read(ids: list[str], channels: int, size: tuple[int, int]) -> np.ndarray:
        return read_folder_images(root, ids, channels, size)

    return read


def _image_path(root: Path, image_id: str) -> Path:
    relative = PurePosixPath(image_id)
    if relative.is_absolute() or ".." in relative.parts:
        raise InputError(f"image id {image_id!r} is not a path inside {root}")
    path = root.joinpath(*relative.parts)
    if not path.is_file():
        raise InputError(f"image {path} not found")
    return path


def _decode_image(path: Path, channels: int, size: tuple[int, int]) -> np.ndarray:
    """One image file as float32 ``[channels, H, W]`` in [0, 1]."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode.startswith("I") or image.mode == "F":
                return _grey_to_channels(_resize_grey(_deep_grey(image), size), channels)
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")  # what PIL asks for before dropping the alpha
            image = image.convert("L" if channels == 1 else "RGB")
            if image.size != (size[1], size[0]):
                image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            pixels = np.asarray(image, dtype=np.float32) / 255
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise InputError(f"cannot decode image {path}: {error}") from None
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def _deep_grey(image: Image.Image) -> np.ndarray:
    """A 16-bit (or float) grey image as [H, W] in [0, 1]; PIL's convert("L") would clip it."""
    pixels = np.asarray(image, dtype=np.float32)
    if image.mode != "F":
        pixels /= 65535
    return np.clip(pixels, 0, 1)


# --- pixels shared by all sources ---------------------------------------------------------------


def _array_reader(pixels: np.ndarray, rows_by_id: dict[str, int], name: str) -> PoolReader:
    """A reader of ``pixels`` ([M, H, W], uint8 0..255 or float in [0, 1]) by image id."""
    scale = 255 if pixels.dtype == np.uint8 else 1

    def read(ids: list[str], channels: int, size: tuple[int, int]) -> np.ndarray:
        unknown = [image_id for image_id in ids if image_id not in rows_by_id]
        if unknown:
            raise InputError(f"{name} has no image with id {unknown[0]!r}")
        grey = pixels[[rows_by_id[image_id] for image_id in ids]].astype(np.float32) / scale
        if grey.shape[1:] != size:
            grey = np.stack([_resize_grey(image, size) for image in grey])
        return np.repeat(grey[:, None], channels, axis=1)

    return read


def _resize_grey(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of one [H, W] float image in [0, 1] to ``size`` (H, W)."""
    if pixels.shape == size:
        return pixels
    resized = Image.fromarray(pixels.astype(np.float32)).resize(
        (size[1], size[0]), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0, 1)


def _grey_to_channels(grey: np.ndarray, channels: int) -> np.ndarray:
    return np.repeat(grey[None], channels, axis=0)


# --- checks -------------------------------------------------------------------------------------


def _val_count(val_fraction: float, class_count: int) -> int:
    if val_fraction == 0:
        return 0
    count = round(val_fraction * class_count)
    return max(count, 1) if class_count >= 2 else count


def _check_pool(which: str) -> None:
    if which not in POOLS:
        raise InputError(f"unknown pool {which!r}; expected 'train' or 'test'")


def _check_channels(channels: int) -> None:
    if channels not in (1, 3):
        raise InputError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    height, width = (int(value) for value in size)
    if height < 1 or width < 1:
        raise InputError(f"image size must be positive, got {height}x{width}")
    return height, width
