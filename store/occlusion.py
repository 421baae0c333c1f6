"""Occlusion maps in HDF5: group ``/occlusion/<split>/`` of a run file or of a results file.

Per split (every name documented in ``docs/FORMAT.md``)::

    epoch [epoch], image [image], row [row], col [col],        coordinates
    channel [channel], y [y], x [x]
    label [image]                                     the target class of every image
    pixels [image, channel, y, x]                     the occluded images as the model sees them
    probability, logit [epoch, image, row, col]       target class, patch at (row, col)
    prediction [epoch, image, row, col]               most probable class, patch at (row, col)
    unoccluded_probability, unoccluded_logit [epoch, image]
    sensitivity [epoch, image]                        unoccluded probability - min over positions
    checkpoint_file, checkpoint_sha256, seconds [epoch]
    computed [epoch]                                  1 once the epoch's row is whole (written last)

Attributes: ``patch``, ``stride``, ``fill`` (numbers), ``fill_source``, ``target``,
``backend``, ``devices``. Rows are pre-allocated (NaN, -1) and rewritten in place; adding
epochs replaces the file atomically (see :mod:`store.h5io`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from store.errors import InputError
from store.h5io import (
    ROOM,
    add_coordinate,
    add_variable,
    open_for_reading,
    read_strings,
    replace_atomically,
    write_epoch_row,
)

GROUP = "occlusion"
_MAP_DIMS = ("epoch", "image", "row", "col")
_MAP_VARIABLES = {
    "probability": ("f4", np.nan, "softmax probability of the target class with the patch's "
                    "top-left pixel at (row, col)", "1"),
    "logit": ("f4", np.nan, "pre-softmax logit of the target class with the patch at "
              "(row, col)", None),
    "prediction": ("i2", -1, "most probable class with the patch at (row, col) (-1: not "
                   "computed)", None),
}
_IMAGE_VARIABLES = {
    "unoccluded_probability": ("f4", np.nan, "softmax probability of the target class, no "
                               "patch", "1"),
    "unoccluded_logit": ("f4", np.nan, "logit of the target class, no patch", None),
    "sensitivity": ("f4", np.nan, "unoccluded probability minus the minimum probability over "
                    "the patch positions", "1"),
}
_EPOCH_VARIABLES = {
    "seconds": ("f8", np.nan, "wall time to compute the checkpoint's maps for the split", "s"),
    "checkpoint_file": ("S256", b"", "checkpoint file name", None),
    "checkpoint_sha256": ("S64", b"", "SHA-256 of the checkpoint file, hex", None),
    "computed": ("u1", 0, "1 once the epoch's maps are whole (written last)", None),
}
_ROW_VARIABLES = (*_MAP_VARIABLES, *_IMAGE_VARIABLES, *_EPOCH_VARIABLES)


@dataclass(frozen=True)
class OcclusionSettings:
    """How the maps are computed: what a group holds is only ever extended with the same.

    Attributes:
        patch: side of the square, in pixels.
        stride: step between patch positions, in pixels (rows and columns).
        fill: the value every pixel (and channel) under the patch is set to.
        fill_source: ``"mean"`` (the split's mean pixel value) or ``"given"`` (``--fill``).
        backend: ``torch`` or ``onnx``.
        target: the class whose probability is mapped: ``label`` (the true class).
    """

    patch: int
    stride: int
    fill: float
    fill_source: str
    backend: str
    target: str = "label"

    def attributes(self) -> dict[str, object]:
        """The settings as group attributes (numbers stay numbers)."""
        return {"patch": int(self.patch), "stride": int(self.stride), "fill": float(self.fill),
                "fill_source": self.fill_source, "backend": self.backend,
                "target": self.target}

    @classmethod
    def from_attributes(cls, attributes: h5py.AttributeManager) -> OcclusionSettings:
        """Inverse of :meth:`attributes`."""
        return cls(int(attributes["patch"]), int(attributes["stride"]),
                   float(attributes["fill"]), str(attributes["fill_source"]),
                   str(attributes["backend"]), str(attributes["target"]))

    def differences(self, other: OcclusionSettings) -> list[tuple[str, object, object]]:
        """``(setting, self's value, other's value)`` for every setting that differs."""
        mine, theirs = self.attributes(), other.attributes()
        return [(key, mine[key], theirs[key]) for key in mine
                if not _same(mine[key], theirs[key])]


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


@dataclass(frozen=True)
class OcclusionImages:
    """The images a group maps: ids in the split, target classes, pixels ``[N, C, H, W]``."""

    ids: list[str]
    labels: np.ndarray
    pixels: np.ndarray


@dataclass(frozen=True)
class OcclusionEpoch:
    """One checkpoint's maps for one split (arrays ``[image, row, col]`` and ``[image]``)."""

    epoch: int
    probability: np.ndarray
    logit: np.ndarray
    prediction: np.ndarray
    unoccluded_probability: np.ndarray
    unoccluded_logit: np.ndarray
    sensitivity: np.ndarray
    seconds: float
    checkpoint_file: str
    checkpoint_sha256: str


@dataclass(frozen=True)
class StoredOcclusion:
    """A group's computed epochs, read back (``arrays`` keyed by the variable names)."""

    split: str
    settings: OcclusionSettings
    images: OcclusionImages
    rows: np.ndarray
    cols: np.ndarray
    epochs: np.ndarray
    arrays: dict[str, np.ndarray]

    def only_images(self, ids: Sequence[str]) -> StoredOcclusion:
        """The same maps restricted to the images ``ids``, in that order."""
        rows = [self.images.ids.index(image_id) for image_id in ids]
        images = OcclusionImages(list(ids), self.images.labels[rows], self.images.pixels[rows])
        arrays = {name: values[:, rows] if values.ndim > 1 else values
                  for name, values in self.arrays.items()}
        return StoredOcclusion(self.split, self.settings, images, self.rows, self.cols,
                               self.epochs, arrays)

    def only_epochs(self, epochs: Sequence[int]) -> StoredOcclusion:
        """The same maps restricted to ``epochs`` (those it holds)."""
        keep = np.isin(self.epochs, list(epochs))
        return StoredOcclusion(self.split, self.settings, self.images, self.rows, self.cols,
                               self.epochs[keep],
                               {name: values[keep] for name, values in self.arrays.items()})


def occlusion_splits(path: Path) -> list[str]:
    """The splits with an ``/occlusion`` group in ``path``."""
    with open_for_reading(Path(path)) as handle:
        return sorted(handle.get(GROUP, {}))


def stored_image_ids(path: Path, split: str) -> list[str] | None:
    """The images ``/occlusion/<split>`` maps, or None when there is no such group."""
    with open_for_reading(Path(path)) as handle:
        group = handle.get(f"{GROUP}/{split}")
        return None if group is None else read_strings(group["image"])


def prepare_occlusion(path: Path, split: str, *, epochs: Sequence[int], images: OcclusionImages,
                      rows: Sequence[int], cols: Sequence[int], settings: OcclusionSettings,
                      device: str) -> dict[int, str]:
    """Make ``/occlusion/<split>`` ready to receive ``epochs``, keeping every earlier map.

    Creates the group or grows its epoch axis. Refuses a group that holds maps computed with
    other settings or of other images (those are never overwritten).

    Returns:
        the epochs already computed, with the SHA-256 of the checkpoint each came from.
    """
    path = Path(path)
    known: list[int] = []
    with open_for_reading(path) as handle:
        group = handle.get(f"{GROUP}/{split}")
        if group is not None:
            _check_same(path, group, split, images, settings)
            known = group["epoch"][()].tolist()
            if set(epochs) <= set(known) and device in json.loads(group.attrs["devices"]):
                return _computed(group)
    per_epoch = len(images.ids) * (len(rows) * len(cols) * 10 + 40) + 400  # maps f4, f4, i2
    room = ROOM + 2 * images.pixels.nbytes + len(set(epochs) | set(known)) * per_epoch
    with replace_atomically(path, room=room) as handle:
        old = handle.get(f"{GROUP}/{split}")
        saved = None if old is None else _read_rows(old)
        devices = set() if old is None else set(json.loads(old.attrs["devices"]))
        if old is not None:
            del handle[f"{GROUP}/{split}"]
        axis = sorted(set(epochs) | set(saved["epoch"].tolist() if saved else []))
        group = handle.require_group(GROUP).create_group(split)
        _create_group(group, axis, images, rows, cols)
        group.attrs.update(settings.attributes())
        group.attrs["devices"] = json.dumps(sorted(devices | {device}))
        if saved is not None:
            _restore_rows(group, saved, axis)
        return _computed(group)


def _check_same(path: Path, group: h5py.Group, split: str, images: OcclusionImages,
                settings: OcclusionSettings) -> None:
    stored = OcclusionSettings.from_attributes(group.attrs)
    for name, was, now in stored.differences(settings):
        raise InputError(f"{path} already holds {split} occlusion maps computed with "
                         f"{name}={was!r}, not {now!r}: write these to another file with "
                         "--results")
    if read_strings(group["image"]) != list(images.ids):
        raise InputError(f"{path} already holds {split} occlusion maps of other images "
                         f"({group['image'].shape[0]} images): choose at most "
                         f"--images {group['image'].shape[0]}, or write these to another file "
                         "with --results")
    if not np.array_equal(group["pixels"][()], np.asarray(images.pixels, dtype="f4")):
        raise InputError(f"{path} already holds {split} occlusion maps of these images with "
                         "other pixels (another --image-size, --channels or data?): write "
                         "these to another file with --results")


def _computed(group: h5py.Group) -> dict[int, str]:
    rows = zip(group["epoch"][()], group["computed"][()], group["checkpoint_sha256"][()],
               strict=True)
    return {int(epoch): sha.decode() for epoch, done, sha in rows if done}


def _create_group(group: h5py.Group, epochs: list[int], images: OcclusionImages,
                  rows: Sequence[int], cols: Sequence[int]) -> None:
    channels, height, width = images.pixels.shape[1:]
    add_coordinate(group, "epoch", np.asarray(epochs, dtype="i4"), "checkpoint epoch")
    add_coordinate(group, "image", list(images.ids),
                   "image id: index or relative path in the source")
    add_coordinate(group, "row", np.asarray(rows, dtype="i4"),
                   "top pixel row of the patch", "pixel")
    add_coordinate(group, "col", np.asarray(cols, dtype="i4"),
                   "left pixel column of the patch", "pixel")
    add_coordinate(group, "channel", np.arange(channels, dtype="i4"), "input channel")
    add_coordinate(group, "y", np.arange(height, dtype="i4"), "pixel row", "pixel")
    add_coordinate(group, "x", np.arange(width, dtype="i4"), "pixel column", "pixel")
    label = add_variable(group, "label", ["image"], 0, "i8", "target class index (the true "
                         "class)")
    label[...] = np.asarray(images.labels, dtype="i8")
    pixels = add_variable(group, "pixels", ["image", "channel", "y", "x"], 0.0, "f4",
                          "the image as the model sees it, without the patch", "1")
    pixels[...] = np.asarray(images.pixels, dtype="f4")
    for table, dims in ((_MAP_VARIABLES, _MAP_DIMS), (_IMAGE_VARIABLES, ["epoch", "image"]),
                        (_EPOCH_VARIABLES, ["epoch"])):
        for name, (dtype, fill, long_name, units) in table.items():
            add_variable(group, name, dims, fill, dtype, long_name, units)


def _read_rows(group: h5py.Group) -> dict[str, np.ndarray]:
    return {name: group[name][()] for name in ("epoch", *_ROW_VARIABLES)}


def _restore_rows(group: h5py.Group, saved: dict[str, np.ndarray], axis: list[int]) -> None:
    rows = np.searchsorted(axis, saved["epoch"])
    for name in _ROW_VARIABLES:
        data = group[name][()]
        data[rows] = saved[name]
        group[name][...] = data


def write_occlusion_epoch(path: Path, split: str, result: OcclusionEpoch) -> None:
    """Store one checkpoint's maps in place; the ``computed`` flag goes last."""
    write_epoch_row(path, f"{GROUP}/{split}", result.epoch,
                    {name: getattr(result, name) for name in _ROW_VARIABLES
                     if name != "computed"})


def read_occlusion(path: Path, split: str) -> StoredOcclusion:
    """The computed epochs of ``/occlusion/<split>``, with the images and the settings."""
    with open_for_reading(Path(path)) as handle:
        group = handle.get(f"{GROUP}/{split}")
        if group is None:
            raise InputError(f"{path} has no occlusion maps for the {split} split")
        done = group["computed"][()].astype(bool)
        arrays = {name: group[name][()][done] for name in _ROW_VARIABLES if name != "computed"}
        images = OcclusionImages(read_strings(group["image"]), group["label"][()],
                                 group["pixels"][()])
        return StoredOcclusion(split, OcclusionSettings.from_attributes(group.attrs), images,
                               group["row"][()], group["col"][()], group["epoch"][()][done],
                               arrays)


def describe_occlusion(group: h5py.Group) -> dict:
    """What `analyzer info` says of one ``/occlusion/<split>`` group."""
    epochs = group["epoch"][()][group["computed"][()].astype(bool)]
    return {"computed_epochs": [int(e) for e in epochs],
            "images": int(group["image"].shape[0]),
            "positions": [int(group["row"].shape[0]), int(group["col"].shape[0])],
            "settings": OcclusionSettings.from_attributes(group.attrs).attributes(),
            "devices": json.loads(group.attrs.get("devices", "[]"))}
