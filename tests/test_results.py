"""The /reaction groups: creation, growth, refusal of other settings, in-place rows."""

from __future__ import annotations

import numpy as np
import pytest

from store.errors import InputError
from store.results import (
    EpochResult,
    SplitImages,
    computed_checkpoints,
    create_results_file,
    prepare_split,
    read_split_results,
    write_epoch_result,
)
from store.spec import ReactionSpec

CLASSES = ["a", "b"]
IMAGES = SplitImages(["a/1.png", "b/2.png", "b/3.png"], np.array([0, 1, 1]))
SETTINGS = {**ReactionSpec("features.5").attributes(), "backend": "torch"}


def result(epoch: int) -> EpochResult:
    return EpochResult(epoch, np.array([0.1, 0.2, 0.0], np.float32) * epoch,
                       np.array([0, 1, 0], np.int16), np.array([0.1, 0.1]) * epoch,
                       np.array([1.0, 0.5]), np.array([0.3, 0.4]), np.array([0, 1]),
                       0.1 * epoch, 0.5, f"epoch_{epoch:04d}.pt", "ab" * 32)


def prepared(tmp_path, epochs=(1, 2, 3)):
    path = tmp_path / "results.h5"
    create_results_file(path, CLASSES)
    prepare_split(path, "train", epochs=list(epochs), class_names=CLASSES, images=IMAGES,
                  settings=SETTINGS, device="cpu")
    return path


def test_rows_are_stored_and_only_computed_epochs_are_read(tmp_path):
    path = prepared(tmp_path)
    write_epoch_result(path, "train", result(2))
    assert set(computed_checkpoints(path, "train")) == {2}
    stored = read_split_results(path, "train")
    assert stored["epoch"].tolist() == [2]
    np.testing.assert_allclose(stored["image_reaction"][0], [0.2, 0.4, 0.0])
    assert stored["prediction"][0].tolist() == [0, 1, 0]
    assert stored["empty_maps"][0].tolist() == [0, 1]
    assert stored["checkpoint_file"][0] == b"epoch_0002.pt"
    assert stored["image"].tolist() == IMAGES.ids and stored["settings"] == SETTINGS


def test_growing_the_epoch_axis_keeps_earlier_results(tmp_path):
    path = prepared(tmp_path, epochs=(10, 20))
    write_epoch_result(path, "train", result(20))
    prepare_split(path, "train", epochs=[5, 15, 25], class_names=CLASSES, images=IMAGES,
                  settings=SETTINGS, device="cpu")
    stored = read_split_results(path, "train")
    assert stored["epoch"].tolist() == [20]
    np.testing.assert_allclose(stored["model_reaction"], [2.0])
    write_epoch_result(path, "train", result(5))
    assert set(computed_checkpoints(path, "train")) == {5, 20}


@pytest.mark.parametrize("setting", ["layer", "score", "target", "backend"])
def test_other_settings_are_refused_and_results_untouched(tmp_path, setting):
    path = prepared(tmp_path)
    write_epoch_result(path, "train", result(1))
    before = path.read_bytes()
    with pytest.raises(InputError, match=setting):
        prepare_split(path, "train", epochs=[1], class_names=CLASSES, images=IMAGES,
                      settings={**SETTINGS, setting: "other"}, device="cpu")
    assert path.read_bytes() == before


def test_other_images_are_refused(tmp_path):
    path = prepared(tmp_path)
    other = SplitImages(IMAGES.ids, np.array([0, 0, 1]))
    with pytest.raises(InputError, match="other images"):
        prepare_split(path, "train", epochs=[1], class_names=CLASSES, images=other,
                      settings=SETTINGS, device="cpu")


def test_xarray_reads_labelled_reaction_arrays(tmp_path):
    xarray = pytest.importorskip("xarray")
    path = prepared(tmp_path)
    write_epoch_result(path, "train", result(3))
    dataset = xarray.open_dataset(path, engine="h5netcdf", group="reaction/train")
    assert dataset["image_reaction"].dims == ("epoch", "image")
    assert dataset["class_reaction"].dims == ("epoch", "class")
    assert dataset["image"].values.tolist() == IMAGES.ids
    assert float(dataset["image_reaction"].sel(epoch=3, image="b/2.png")) == pytest.approx(0.6)
