"""Data sets on disk: digits, MNIST IDX files and image folders, written for real in tmp_path."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from store.datasets import (
    SPLITS,
    DataSource,
    folder_images,
    load_split,
    open_source,
    parse_image_size,
    plan_splits,
)
from store.errors import InputError

DIGITS_COUNT = 1797


@pytest.fixture(scope="module")
def digits() -> DataSource:
    return open_source("digits")


def _class_counts(labels: np.ndarray) -> np.ndarray:
    return np.bincount(labels, minlength=10)


# --- digits -------------------------------------------------------------------------------------


def test_digits_source_describes_itself(digits):
    assert digits.kind == "digits"
    assert digits.class_names == [str(digit) for digit in range(10)]
    assert digits.native_size == (8, 8)
    assert digits.description == "scikit-learn digits (1797 images, 10 classes)"


def test_digits_splits_are_disjoint_and_cover_every_image(digits):
    plan = plan_splits(digits, 0.1, seed=0)
    all_ids = [image_id for split in SPLITS for image_id in plan.ids[split]]
    assert len(all_ids) == len(set(all_ids)) == DIGITS_COUNT
    assert set(all_ids) == {str(index) for index in range(DIGITS_COUNT)}
    for split in SPLITS:
        assert plan.labels[split].dtype == np.int64
        assert len(plan.labels[split]) == len(plan.ids[split])


def test_digits_test_set_is_a_fixed_stratified_fifth_whatever_the_seed(digits):
    first, second = plan_splits(digits, 0.1, seed=0), plan_splits(digits, 0.3, seed=7)
    assert first.ids["test"] == second.ids["test"]
    assert len(first.ids["test"]) == 360
    from sklearn.datasets import load_digits

    every_class = _class_counts(load_digits().target)
    np.testing.assert_allclose(_class_counts(first.labels["test"]), 0.2 * every_class, atol=1)


def test_digits_validation_takes_a_rounded_tenth_of_every_class(digits):
    plan = plan_splits(digits, 0.1, seed=3)
    pool_counts = _class_counts(digits.pool("train")[1])
    expected = [round(0.1 * count) for count in pool_counts]
    assert _class_counts(plan.labels["val"]).tolist() == expected
    assert (_class_counts(plan.labels["train"]) == pool_counts - expected).all()


def test_digits_plan_repeats_for_a_seed_and_changes_with_another(digits):
    first, again, other = (plan_splits(digits, 0.1, seed) for seed in (5, 5, 6))
    assert first.ids == again.ids
    assert first.ids["val"] != other.ids["val"]


def test_split_ids_keep_the_pool_order(digits):
    plan = plan_splits(digits, 0.25, seed=1)
    for split in SPLITS:
        indices = [int(image_id) for image_id in plan.ids[split]]
        assert indices == sorted(indices)


def test_digits_pixels_are_float32_in_unit_range_and_match_the_data(digits):
    from sklearn.datasets import load_digits

    plan = plan_splits(digits, 0.1, seed=0)
    val = load_split(digits, plan, "val", channels=1, size=(8, 8))
    assert val.images.dtype == np.float32 and val.labels.dtype == np.int64
    assert val.images.shape == (len(plan.ids["val"]), 1, 8, 8)
    assert val.images.min() == 0 and val.images.max() == 1
    raw = load_digits()
    rows = [int(image_id) for image_id in val.ids]
    np.testing.assert_allclose(val.images[:, 0], raw.images[rows] / 16, rtol=1e-6)
    assert val.labels.tolist() == raw.target[rows].tolist()


def test_digits_in_three_channels_repeat_the_grey_and_resize(digits):
    plan = plan_splits(digits, 0.1, seed=0)
    test = load_split(digits, plan, "test", channels=3, size=(16, 12))
    assert test.images.shape == (360, 3, 16, 12)
    assert (test.images[:, 0] == test.images[:, 2]).all()
    assert test.images.min() >= 0 and test.images.max() <= 1


def test_zero_val_fraction_gives_an_empty_val_split_of_the_right_shape(digits):
    plan = plan_splits(digits, 0.0, seed=0)
    val = load_split(digits, plan, "val", channels=3, size=(8, 8))
    assert val.images.shape == (0, 3, 8, 8) and val.images.dtype == np.float32
    assert val.labels.shape == (0,) and val.ids == []


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, float("nan")])
def test_val_fraction_outside_zero_to_one_is_rejected(digits, fraction):
    with pytest.raises(InputError, match="val-fraction"):
        plan_splits(digits, fraction, seed=0)


def test_digits_reject_a_test_folder(tmp_path):
    with pytest.raises(InputError, match="--test applies to folder data only"):
        open_source("digits", str(tmp_path))


@pytest.mark.parametrize("channels", [0, 2, 4])
def test_channels_other_than_one_or_three_are_rejected(digits, channels):
    plan = plan_splits(digits, 0.1, seed=0)
    with pytest.raises(InputError, match="channels"):
        load_split(digits, plan, "train", channels=channels, size=(8, 8))


# --- image sizes --------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "size"), [("50x200", (50, 200)), (" 28X28 ", (28, 28))])
def test_image_size_text_is_height_by_width(text, size):
    assert parse_image_size(text) == size


@pytest.mark.parametrize("text", ["", "28", "28x", "x28", "-3x4", "2.5x4", "0x8", "8x0", "axb"])
def test_bad_image_size_text_is_rejected(text):
    with pytest.raises(InputError, match="image size"):
        parse_image_size(text)


# --- folders ------------------------------------------------------------------------------------

RED = (255, 0, 128)
GREEN = (10, 200, 30)
BLUE = (0, 40, 250)


def _solid(path: Path, mode: str, color, size=(12, 10), **save) -> None:
    """Write a one-colour image of ``size`` (W, H) in ``mode``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save)


def _make_folder(root: Path, colours=(RED, GREEN, BLUE)) -> Path:
    """Three classes, every file a different format, size or mode, plus files to skip."""
    cat, dog, emu = colours
    _solid(root / "cat" / "a.png", "RGB", cat, size=(12, 10))
    _solid(root / "cat" / "b.BMP", "RGB", cat, size=(5, 7))
    _solid(root / "dog" / "c.jpg", "RGB", dog, size=(20, 20), quality=100)
    _solid(root / "dog" / "d.png", "RGBA", (*dog, 128), size=(3, 4))
    palette = Image.new("RGB", (9, 6), emu).quantize(colors=4)
    palette.info["transparency"] = 3
    (root / "emu" / "deeper").mkdir(parents=True)
    palette.save(root / "emu" / "e.png", transparency=3)
    _solid(root / "emu" / "deeper" / "f.jpeg", "RGB", emu, size=(8, 8), quality=100)
    (root / "cat" / "README.txt").write_text("not an image")
    (root / "dog" / "Thumbs.db").write_bytes(b"\0\1")
    _solid(root / "dog" / ".hidden.png", "RGB", RED)
    (root / ".cache" / "x").mkdir(parents=True)
    (root / "notes.txt").write_text("top-level files are not classes")
    return root


def test_folder_lists_classes_relative_ids_and_labels(tmp_path):
    classes, ids, labels = folder_images(_make_folder(tmp_path / "data"))
    assert classes == ["cat", "dog", "emu"]
    assert ids == ["cat/a.png", "cat/b.BMP", "dog/c.jpg", "dog/d.png", "emu/e.png",
                   "emu/deeper/f.jpeg"]
    assert labels.dtype == np.int64 and labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_folder_images_of_any_size_and_mode_load_at_the_requested_size(tmp_path):
    source = open_source(str(_make_folder(tmp_path / "data")))
    assert source.kind == "folder" and source.native_size is None
    assert source.description == f"folder {(tmp_path / 'data').resolve()} (train)"
    plan = plan_splits(source, 0.0, seed=0)
    rgb = load_split(source, plan, "train", channels=3, size=(6, 9))
    assert rgb.images.shape == (6, 3, 6, 9) and rgb.images.dtype == np.float32
    expected = np.array([RED, RED, GREEN, GREEN, BLUE, BLUE], dtype=np.float32) / 255
    # one colour stays one colour through any resize; JPEG may move it by a step or two
    np.testing.assert_allclose(rgb.images.mean(axis=(2, 3)), expected, atol=3 / 255)
    assert np.ptp(rgb.images, axis=(2, 3)).max() <= 3 / 255
    grey = load_split(source, plan, "train", channels=1, size=(6, 9))
    assert grey.images.shape == (6, 1, 6, 9)
    red_as_grey = Image.new("RGB", (1, 1), RED).convert("L").getpixel((0, 0)) / 255
    np.testing.assert_allclose(grey.images[0], red_as_grey, rtol=1e-6)
    assert grey.labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_folder_image_at_the_requested_size_keeps_its_exact_pixels(tmp_path):
    pixels = np.arange(24, dtype=np.uint8).reshape(4, 6) * 10
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    Image.fromarray(pixels).save(root / "a" / "ramp.png")
    _solid(root / "b" / "flat.png", "L", 7)
    source = open_source(str(root))
    images = source.load(["a/ramp.png"], channels=1, size=(4, 6))
    np.testing.assert_array_equal(images[0, 0], pixels / np.float32(255))


def test_sixteen_bit_grey_png_is_scaled_not_clipped(tmp_path):
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    Image.fromarray(np.full((5, 5), 32768, dtype=np.uint16)).save(root / "a" / "deep.png")
    _solid(root / "b" / "flat.png", "L", 0)
    images = open_source(str(root)).load(["a/deep.png"], channels=3, size=(3, 3))
    np.testing.assert_allclose(images, 32768 / 65535, rtol=1e-6)


def test_folder_without_test_has_an_empty_test_split(tmp_path):
    source = open_source(str(_make_folder(tmp_path / "data")))
    ids, labels = source.pool("test")
    assert ids == [] and labels.dtype == np.int64 and labels.shape == (0,)
    test = load_split(source, plan_splits(source, 0.0, seed=0), "test", 1, (5, 5))
    assert test.images.shape == (0, 1, 5, 5)


def test_test_folder_is_read_from_its_own_root(tmp_path):
    train_root = _make_folder(tmp_path / "train")
    test_root = _make_folder(tmp_path / "test", colours=(BLUE, RED, GREEN))
    source = open_source(str(train_root), str(test_root))
    assert source.description == f"folder {train_root.resolve()} (train) + {test_root.resolve()}"
    plan = plan_splits(source, 0.0, seed=0)
    assert plan.ids["test"] == plan.ids["train"]  # same relative paths, different folders
    test = load_split(source, plan, "test", channels=3, size=(4, 4))
    np.testing.assert_allclose(test.images[0].mean(axis=(1, 2)), np.array(BLUE) / 255,
                               atol=1 / 255)
    train = load_split(source, plan, "train", channels=3, size=(4, 4))
    np.testing.assert_allclose(train.images[0].mean(axis=(1, 2)), np.array(RED) / 255,
                               atol=1 / 255)


def test_small_folder_plan_keeps_a_training_image_in_every_class(tmp_path):
    root = tmp_path / "data"
    for name, count in (("a", 2), ("b", 3)):
        for index in range(count):
            _solid(root / name / f"{index}.png", "L", index)
    source = open_source(str(root))
    plan = plan_splits(source, 0.1, seed=0)
    assert _class_counts(plan.labels["val"]).tolist()[:2] == [1, 1]
    with pytest.raises(InputError, match="class 'a' has 2 training images"):
        plan_splits(source, 0.9, seed=0)


# --- MNIST --------------------------------------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as stream:
            stream.write(payload)
    else:
        path.write_bytes(payload)


def _make_mnist(root: Path, gz_train: bool, gz_test: bool) -> dict[str, tuple[np.ndarray, ...]]:
    rng = np.random.default_rng(0)
    written = {}
    root.mkdir(parents=True, exist_ok=True)
    pools = (("train", "train", 20, gz_train), ("test", "t10k", 3, gz_test))
    for which, prefix, count, gz in pools:
        images = rng.integers(0, 256, size=(count, 6, 5), dtype=np.uint8)
        labels = rng.permutation(np.arange(count) % 10).astype(np.uint8)
        suffix = ".gz" if gz else ""
        _write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images, 0x803)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels, 0x801)
        written[which] = (images, labels)
    return written


@pytest.mark.parametrize(("gz_train", "gz_test"), [(True, False), (False, True)])
def test_mnist_idx_files_are_parsed_plain_or_gzipped(tmp_path, gz_train, gz_test):
    written = _make_mnist(tmp_path / "mnist", gz_train, gz_test)
    source = open_source(f"mnist:{tmp_path / 'mnist'}")
    assert source.kind == "mnist" and source.native_size == (6, 5)
    assert source.class_names == [str(digit) for digit in range(10)]
    for which, (images, labels) in written.items():
        ids, pool_labels = source.pool(which)
        assert ids == [f"{which}/{row}" for row in range(len(labels))]
        assert pool_labels.dtype == np.int64 and pool_labels.tolist() == labels.tolist()
        loaded = source.load(ids[::-1], channels=1, size=(6, 5), which=which)
        np.testing.assert_allclose(loaded[:, 0], images[::-1] / 255, rtol=1e-6)


def test_mnist_splits_load_with_their_labels(tmp_path):
    written = _make_mnist(tmp_path / "mnist", True, True)
    source = open_source(f"mnist:{tmp_path / 'mnist'}")
    plan = plan_splits(source, 0.0, seed=0)
    test = load_split(source, plan, "test", channels=3, size=(12, 10))
    assert test.images.shape == (3, 3, 12, 10)
    assert test.labels.tolist() == written["test"][1].tolist()
    assert plan.labels["train"].tolist() == written["train"][1].tolist()


def test_class_absent_from_the_training_data_is_named(tmp_path):
    root = tmp_path / "mnist"
    root.mkdir()
    for prefix in ("train", "t10k"):
        _write_idx(root / f"{prefix}-images-idx3-ubyte", np.zeros((9, 2, 2)), 0x803)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte", np.arange(9), 0x801)
    with pytest.raises(InputError, match="class '9' has no images in the training data"):
        plan_splits(open_source(f"mnist:{root}"), 0.1, seed=0)


def test_truncated_idx_file_is_named(tmp_path):
    _make_mnist(tmp_path / "mnist", False, False)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(InputError, match="train-images-idx3-ubyte is truncated"):
        open_source(f"mnist:{tmp_path / 'mnist'}")


def test_idx_file_with_a_wrong_magic_number_is_named(tmp_path):
    _make_mnist(tmp_path / "mnist", False, False)
    labels = tmp_path / "mnist" / "t10k-labels-idx1-ubyte"
    labels.write_bytes((0x803).to_bytes(4, "big") + labels.read_bytes()[4:])
    with pytest.raises(InputError, match=r"t10k-labels-idx1-ubyte .*magic number 0x00000803"):
        open_source(f"mnist:{tmp_path / 'mnist'}")


def test_corrupt_gzip_idx_file_is_named(tmp_path):
    _make_mnist(tmp_path / "mnist", True, False)
    path = tmp_path / "mnist" / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:15])
    with pytest.raises(InputError, match=r"train-labels-idx1-ubyte\.gz"):
        open_source(f"mnist:{tmp_path / 'mnist'}")


def test_missing_idx_file_is_named(tmp_path):
    _make_mnist(tmp_path / "mnist", False, False)
    (tmp_path / "mnist" / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(InputError, match=r"t10k-images-idx3-ubyte .*not found"):
        open_source(f"mnist:{tmp_path / 'mnist'}")


def test_mnist_rejects_a_missing_folder_and_a_test_folder(tmp_path):
    with pytest.raises(InputError, match="MNIST folder"):
        open_source(f"mnist:{tmp_path / 'absent'}")
    with pytest.raises(InputError, match="--test applies to folder data only"):
        open_source(f"mnist:{tmp_path}", str(tmp_path))


# --- bad folders --------------------------------------------------------------------------------


def test_missing_data_folder_is_rejected_with_the_accepted_forms(tmp_path):
    with pytest.raises(InputError, match=r"does not exist \(--data takes 'digits'"):
        open_source(str(tmp_path / "digts"))


def test_data_path_that_is_a_file_is_rejected(tmp_path):
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(InputError, match="is not a directory"):
        open_source(str(tmp_path / "file.png"))


def test_empty_folder_has_no_class_sub_folders(tmp_path):
    with pytest.raises(InputError, match="no class sub-folders"):
        open_source(str(tmp_path))


def test_single_class_is_rejected(tmp_path):
    _solid(tmp_path / "only" / "a.png", "L", 1)
    with pytest.raises(InputError, match="at least 2 classes"):
        open_source(str(tmp_path))


def test_class_without_images_is_named(tmp_path):
    _solid(tmp_path / "a" / "a.png", "L", 1)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "README").write_text("no images here")
    with pytest.raises(InputError, match=r"class folder .*b has no images"):
        open_source(str(tmp_path))


def test_corrupt_image_is_named_when_loaded(tmp_path):
    _solid(tmp_path / "a" / "good.png", "L", 1)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    source = open_source(str(tmp_path))
    plan = plan_splits(source, 0.0, seed=0)
    with pytest.raises(InputError, match=r"cannot decode image .*broken\.png"):
        load_split(source, plan, "train", channels=1, size=(4, 4))


def test_test_folder_with_other_classes_says_which(tmp_path):
    train_root = _make_folder(tmp_path / "train")
    for name in ("cat", "emu", "yak"):
        _solid(tmp_path / "test" / name / "x.png", "L", 1)
    with pytest.raises(InputError, match=r"other classes .*missing dog; extra yak"):
        open_source(str(train_root), str(tmp_path / "test"))


def test_unknown_split_is_rejected(digits):
    plan = plan_splits(digits, 0.1, seed=0)
    with pytest.raises(InputError, match="unknown split 'holdout'"):
        load_split(digits, plan, "holdout", channels=1, size=(8, 8))


def test_a_tilde_in_mnist_dir_means_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    _make_mnist(tmp_path / "data" / "mnist", False, False)
    source = open_source("mnist:~/data/mnist")
    assert source.kind == "mnist" and str(tmp_path / "data" / "mnist") in source.description
