"""Reaction results in HDF5: group ``/reaction/<split>/`` of a run file or of a results file.

Per split (every name documented in ``docs/FORMAT.md``)::

    epoch [epoch], class [class], image [image]      coordinates
    label [image]                                    true class of every image
    image_reaction [epoch, image]                    Reaction per image (float32, NaN = not yet)
    prediction [epoch, image]                        predicted class (-1 = not yet)
    class_reaction, accuracy, loss [epoch, class]    per-class means
    empty_maps [epoch, class]                        images whose map was empty (-1 = not yet)
    model_reaction [epoch]                           mean of the class Reactions
    checkpoint_file, checkpoint_sha256, seconds [epoch]
    computed [epoch]                                 1 once the epoch's row is whole (written last)

Every array is pre-allocated, so storing one checkpoint's results rewrites raw bytes in place;
adding epochs or a split replaces the file atomically (see :mod:`store.h5io`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from store.errors import InputError
from store.h5io import (
    add_coordinate,
    add_variable,
    open_for_reading,
    read_strings,
    remove_stale_copies,
    replace_atomically,
    update_in_place,
    write_epoch_row,
)
from store.spec import SPEC_KEYS

RESULTS_FORMAT = "reaction-results"
RESULTS_VERSION = "1.1"
GROUP = "reaction"
SETTINGS = (*SPEC_KEYS, "backend")
_SETTING_DEFAULTS = {"weighting": "gradcam"}  # files of format 1.0 have no weighting attribute

_IMAGE_VARIABLES = {
    "image_reaction": ("f4", np.nan, "Reaction of the image: sum of its Grad-CAM map over "
                       "the positive positions / their number (thesis eq. 3.3)", "1"),
    "prediction": ("i2", -1, "predicted class index (-1: not computed)", None),
}
_CLASS_VARIABLES = {
    "class_reaction": ("f8", np.nan, "mean Reaction over the class's images", "1"),
    "accuracy": ("f8", np.nan, "accuracy over the class's images, eval mode", "1"),
    "loss": ("f8", np.nan, "mean cross-entropy over the class's images, eval mode", "nat"),
    "empty_maps": ("i4", -1, "number of the class's images whose map was empty "
                   "(Reaction 0; -1: not computed)", None),
}
_EPOCH_VARIABLES = {
    "model_reaction": ("f8", np.nan, "mean of the class Reactions (thesis fig. 5.9)", "1"),
    "seconds": ("f8", np.nan, "wall time to compute the checkpoint's results for the split",
                "s"),
    "checkpoint_file": ("S256", b"", "checkpoint file name", None),
    "checkpoint_sha256": ("S64", b"", "SHA-256 of the checkpoint file, hex", None),
    "computed": ("u1", 0, "1 once the epoch's results are whole (written last)", None),
}


@dataclass(frozen=True)
class SplitImages:
    """The identity of a split's images: ids and true labels."""

    ids: list[str]
    labels: np.ndarray


@dataclass(frozen=True)
class EpochResult:
    """One checkpoint's results for one split."""

    epoch: int
    image_reaction: np.ndarray
    prediction: np.ndarray
    class_reaction: np.ndarray
    accuracy: np.ndarray
    loss: np.ndarray
    empty_maps: np.ndarray
    model_reaction: float
    seconds: float
    checkpoint_file: str
    checkpoint_sha256: str


def create_results_file(path: Path, class_names: Sequence[str]) -> None:
    """Create a stand-alone results file (for checkpoints without a run file)."""
    with replace_atomically(Path(path)) as handle:
        handle.attrs.update({"format": RESULTS_FORMAT, "format_version": RESULTS_VERSION,
                             "classes": json.dumps(list(class_names))})


def check_results_target(path: Path, class_names: Sequence[str],
                         images: dict[str, SplitImages]) -> None:
    """Refuse to write results into a file that is not a run or results file, or that
    belongs to other data: other classes, or a run whose splits hold other images."""
    with open_for_reading(Path(path)) as handle:
        kind = handle.attrs.get("format")
        if kind not in (RESULTS_FORMAT, "reaction-run"):
            raise InputError(f"{path} is not a reaction run or results file: refusing to "
                             "write it")
        if json.loads(handle.attrs.get("classes", "null")) != list(class_names):
            raise InputError(f"{path} holds results for other classes: write these to "
                             "another file with --out")
        for split, identity in images.items():
            recorded = handle.get(f"splits/{split}/image")
            if recorded is not None and read_strings(recorded) != list(identity.ids):
                raise InputError(f"{path} is the run file of other data (its {split} images "
                                 "differ): write these to another file with --out")


def prepare_split(path: Path, split: str, *, epochs: Sequence[int], class_names: Sequence[str],
                  images: SplitImages, settings: dict[str, str], device: str) -> None:
    """Make ``/reaction/<split>`` ready to receive ``epochs``, keeping every earlier result.

    Creates the group, or grows its epoch axis to include ``epochs``. Refuses when the group
    holds results computed with other settings (layer, score, target, weighting, backend) or
    for other images: those are never overwritten.
    """
    path = Path(path)
    with open_for_reading(path) as handle:
        group = handle.get(f"{GROUP}/{split}")
        if group is not None:
            known = _existing_epochs(path, group, split, class_names, images, settings)
            if set(epochs) <= set(known) and device in json.loads(group.attrs["devices"]):
                return
    with replace_atomically(path) as handle:
        old = handle.get(f"{GROUP}/{split}")
        known = [] if old is None else old["epoch"][()].tolist()
        _rebuild_split(handle, split, sorted(set(known) | set(epochs)), class_names, images,
                       settings, device)


def _rebuild_split(handle: h5py.File, split: str, axis: list[int], class_names: Sequence[str],
                   images: SplitImages, settings: dict[str, str], device: str) -> None:
    """(Re)create ``/reaction/<split>`` over ``axis``, keeping the rows of its epochs."""
    old = handle.get(f"{GROUP}/{split}")
    known = [] if old is None else old["epoch"][()].tolist()
    saved = None if old is None else _read_group(old)
    devices = set() if old is None else set(json.loads(old.attrs["devices"]))
    if old is not None:
        del handle[f"{GROUP}/{split}"]
    group = handle.require_group(GROUP).create_group(split)
    _create_split_group(group, axis, class_names, images)
    group.attrs.update(settings)
    group.attrs["devices"] = json.dumps(sorted(devices | {device}))
    if saved is not None:
        _restore_rows(group, saved, known, axis)


def stored_settings(group: h5py.Group) -> dict[str, str]:
    """The settings attributes of a ``/reaction/<split>`` group (format 1.0 files included)."""
    return {name: str(group.attrs.get(name, _SETTING_DEFAULTS.get(name, "")))
            for name in SETTINGS}


def _existing_epochs(path: Path, group: h5py.Group, split: str, class_names: Sequence[str],
                    images: SplitImages, settings: dict[str, str]) -> list[int]:
    for name in SETTINGS:
        stored = str(group.attrs.get(name, _SETTING_DEFAULTS.get(name, "")))
        if stored != settings[name]:
            raise InputError(
                f"{path} already holds {split} results computed with {name}={stored!r}, not "
                f"{settings[name]!r}: write these to another file with --out")
    if read_strings(group["class"]) != list(class_names):
        raise InputError(f"{path} holds {split} results for other classes")
    if read_strings(group["image"]) != images.ids or \
            not np.array_equal(group["label"][()], images.labels):
        raise InputError(f"{path} holds {split} results for other images: "
                         "write these to another file with --out")
    return group["epoch"][()].tolist()


def _create_split_group(group: h5py.Group, epochs: list[int], class_names: Sequence[str],
                        images: SplitImages) -> None:
    add_coordinate(group, "epoch", np.asarray(epochs, dtype="i4"), "checkpoint epoch")
    add_coordinate(group, "class", list(class_names), "class name")
    add_coordinate(group, "image", images.ids, "image id: index or relative path in the source")
    label = group.create_dataset("label", data=np.asarray(images.labels, dtype="i8"))
    label.dims[0].attach_scale(group["image"])
    label.attrs["long_name"] = "true class index"
    for table, dims in ((_IMAGE_VARIABLES, ["epoch", "image"]),
                        (_CLASS_VARIABLES, ["epoch", "class"]),
                        (_EPOCH_VARIABLES, ["epoch"])):
        for name, (dtype, fill, long_name, units) in table.items():
            add_variable(group, name, dims, fill, dtype, long_name, units)


_ROW_VARIABLES = (*_IMAGE_VARIABLES, *_CLASS_VARIABLES, *_EPOCH_VARIABLES)


def _read_group(group: h5py.Group) -> dict[str, np.ndarray]:
    return {name: group[name][()] for name in _ROW_VARIABLES}


def _restore_rows(group: h5py.Group, saved: dict[str, np.ndarray], known: list[int],
                  axis: list[int]) -> None:
    kept = np.isin(known, axis)
    rows = np.searchsorted(axis, np.asarray(known)[kept])
    for name, values in saved.items():
        data = group[name][()]
        data[rows] = values[kept]
        group[name][...] = data


def computed_checkpoints(path: Path, split: str) -> dict[int, str]:
    """The epochs whose results for ``split`` are whole, with the SHA-256 of the checkpoint
    file each was computed from."""
    with open_for_reading(Path(path)) as handle:
        group = handle.get(f"{GROUP}/{split}")
        if group is None:
            return {}
        rows = zip(group["epoch"][()], group["computed"][()], group["checkpoint_sha256"][()],
                   strict=True)
        return {int(epoch): sha.decode() for epoch, done, sha in rows if done}


def write_epoch_result(path: Path, split: str, result: EpochResult) -> None:
    """Store one checkpoint's results in place; the ``computed`` flag goes last."""
    write_epoch_row(path, f"{GROUP}/{split}", result.epoch,
                    {name: getattr(result, name) for name in _ROW_VARIABLES
                     if name != "computed"})


def read_split_results(path: Path, split: str) -> dict[str, np.ndarray]:
    """Every array of ``/reaction/<split>`` for its computed epochs (and the coordinates)."""
    with open_for_reading(Path(path)) as handle:
        group = handle.get(f"{GROUP}/{split}")
        if group is None:
            raise InputError(f"{path} has no Reaction results for the {split} split")
        done = group["computed"][()].astype(bool)
        results = {name: group[name][()][done] for name in _ROW_VARIABLES}
        results["epoch"] = group["epoch"][()][done]
        results["class"] = np.array(read_strings(group["class"]))
        results["image"] = np.array(read_strings(group["image"]))
        results["label"] = group["label"][()]
        results["settings"] = stored_settings(group)
        return results


def result_splits(path: Path) -> list[str]:
    """The splits with a ``/reaction`` group in ``path``."""
    with open_for_reading(Path(path)) as handle:
        return list(handle.get(GROUP, {}))


@dataclass(frozen=True)
class CheckpointResults:
    """One checkpoint's results for every split it was computed on."""

    epoch: int
    splits: dict[str, EpochResult]


class ResultsSink:
    """The only writer of Reaction results: one whole checkpoint (all its splits) at a time.

    Opening it creates or checks the results groups (one atomic replacement at most); each
    :meth:`store` then rewrites pre-allocated rows in place, so a new checkpoint costs one row
    write per split whatever the length of the run. An epoch beyond the axis grows it
    geometrically (to the run's planned epochs, or by as many epochs again as it holds), so
    following a run of N checkpoints copies the file O(log N) times, not N times.

    Args:
        path: the run file or stand-alone results file.
        class_names: the classes, in index order.
        images: each split's image identity.
        settings: the :class:`~store.spec.ReactionSpec` attributes plus ``backend``.
        device: where the results are computed (recorded in ``devices``).
        epochs: the epoch axis to prepare now (every checkpoint's, or the run's planned epochs).
        planned: the run's planned epochs (a run file's axis), if known.
    """

    def __init__(self, path: Path, *, class_names: Sequence[str],
                 images: dict[str, SplitImages], settings: dict[str, str], device: str,
                 epochs: Sequence[int], planned: Sequence[int] = ()) -> None:
        self.path = Path(path)
        self.class_names = list(class_names)
        self.images = dict(images)
        self.settings = dict(settings)
        self.device = device
        self.planned = sorted(planned)
        if self.path.exists():
            remove_stale_copies(self.path)  # of a writer killed inside an atomic replacement
            check_results_target(self.path, self.class_names, self.images)
        else:
            try:
                create_results_file(self.path, self.class_names)
            except OSError as error:
                raise InputError(f"cannot write {self.path}: {error.strerror or error}") \
                    from None
        for split, identity in self.images.items():
            prepare_split(self.path, split, epochs=epochs, class_names=self.class_names,
                          images=identity, settings=self.settings, device=device)
        self._rows: dict[str, dict[int, int]] = {}
        self.done: dict[str, dict[int, str]] = {}
        self._read_axes()

    def _read_axes(self) -> None:
        with open_for_reading(self.path) as handle:
            for split in self.images:
                group = handle[f"{GROUP}/{split}"]
                epochs = group["epoch"][()].tolist()
                self._rows[split] = {epoch: row for row, epoch in enumerate(epochs)}
                rows = zip(epochs, group["computed"][()], group["checkpoint_sha256"][()],
                           strict=True)
                self.done[split] = {int(e): sha.decode() for e, flag, sha in rows if flag}

    @property
    def axis(self) -> list[int]:
        """The epochs that have a row (the same for every split)."""
        return sorted(next(iter(self._rows.values()), {}))

    def store(self, result: CheckpointResults) -> None:
        """Write one checkpoint's rows for each of its splits, then their ``computed`` flags.

        A reader sees the checkpoint's results whole or not at all; a writer killed midway
        leaves rows that are not flagged, which a rerun computes again.
        """
        unknown = set(result.splits) - set(self.images)
        if unknown:
            raise InputError(f"no results group for the split(s) {', '.join(sorted(unknown))}")
        if any(result.epoch not in self._rows[split] for split in result.splits):
            self._grow(result.epoch)
        with update_in_place(self.path) as handle:
            for split, epoch_result in result.splits.items():
                group, row = handle[f"{GROUP}/{split}"], self._rows[split][result.epoch]
                for name in _ROW_VARIABLES:
                    if name != "computed":
                        value = getattr(epoch_result, name)
                        group[name][row] = value.encode() if isinstance(value, str) else value
            handle.flush()
            for split in result.splits:
                handle[f"{GROUP}/{split}"]["computed"][self._rows[split][result.epoch]] = 1
        for split, epoch_result in result.splits.items():
            self.done[split][result.epoch] = epoch_result.checkpoint_sha256

    def _grow(self, epoch: int) -> None:
        axis = self.axis
        if epoch in self.planned:
            wanted = set(self.planned)
        else:
            step = _usual_step(axis)
            wanted = {epoch + step * k for k in range(max(len(axis), 16))}
        self._set_axis(sorted(set(axis) | wanted | {epoch}))

    def trim(self, keep: Sequence[int]) -> None:
        """Drop the rows grown ahead that no checkpoint filled: keep computed rows, ``keep``
        and the planned epochs. Nothing is copied when no row would go."""
        wanted = set(keep) | set(self.planned)
        for done in self.done.values():
            wanted |= set(done)
        axis = [epoch for epoch in self.axis if epoch in wanted]
        if axis != self.axis:
            self._set_axis(axis)

    def _set_axis(self, axis: list[int]) -> None:
        with replace_atomically(self.path) as handle:
            for split, identity in self.images.items():
                _rebuild_split(handle, split, axis, self.class_names, identity, self.settings,
                               self.device)
        self._read_axes()


def _usual_step(epochs: Sequence[int]) -> int:
    """The most common gap between consecutive epochs (1 for fewer than two)."""
    gaps = np.diff(np.asarray(sorted(epochs), dtype=np.int64))
    if gaps.size == 0:
        return 1
    values, counts = np.unique(gaps, return_counts=True)
    return max(1, int(values[np.argmax(counts)]))
