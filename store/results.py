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

import contextlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from store.errors import InputError, first_line
from store.files import folder_owned
from store.h5io import (
    ROOM,
    add_coordinate,
    add_variable,
    open_for_reading,
    read_strings,
    remove_stale_copies,
    replace_atomically,
    require_datasets,
    update_in_place,
    write_epoch_row,
)
from store.spec import SPEC_KEYS

logger = logging.getLogger(__name__)

RESULTS_FORMAT = "reaction-results"
RESULTS_VERSION = "1.1"
GROUP = "reaction"
WRITER_SUFFIX = ".analyzer.lock"  # held by the one ResultsSink writing the file
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


def read_results_classes(path: Path) -> list[str] | None:
    """The class names of a stand-alone results file; None for any other file."""
    with open_for_reading(Path(path)) as handle:
        if handle.attrs.get("format") != RESULTS_FORMAT or "classes" not in handle.attrs:
            return None
        return [str(name) for name in json.loads(handle.attrs["classes"])]


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
        group = reaction_group(handle, split)
        if group is not None:
            known = _existing_epochs(path, group, split, class_names, images, settings)
            if set(epochs) <= set(known) and device in json.loads(group.attrs["devices"]):
                return
    with replace_atomically(path) as handle:
        old = handle.get(f"{GROUP}/{split}")
        known = [] if old is None else old["epoch"][()].tolist()
        _rebuild_split(handle, split, sorted(set(known) | set(epochs)), class_names, images,
                       settings, [device])


def _rebuild_split(handle: h5py.File, split: str, axis: list[int], class_names: Sequence[str],
                   images: SplitImages, settings: dict[str, str],
                   devices: Sequence[str]) -> None:
    """(Re)create ``/reaction/<split>`` over ``axis``, keeping the rows of its epochs."""
    old = handle.get(f"{GROUP}/{split}")
    known = [] if old is None else old["epoch"][()].tolist()
    saved = None if old is None else _read_group(old)
    recorded = set() if old is None else set(json.loads(old.attrs["devices"]))
    if old is not None:
        del handle[f"{GROUP}/{split}"]
    group = handle.require_group(GROUP).create_group(split)
    _create_split_group(group, axis, class_names, images)
    group.attrs.update(settings)
    group.attrs["devices"] = json.dumps(sorted(recorded | set(devices)))
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
DATASETS = ("epoch", "class", "image", "label", *_ROW_VARIABLES)  # of every split's group


def reaction_group(handle: h5py.File, split: str) -> h5py.Group | None:
    """``/reaction/<split>`` of an open file, checked whole; None when there is none."""
    group = handle.get(f"{GROUP}/{split}")
    return None if group is None else require_datasets(Path(handle.filename), group, DATASETS)


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
        group = reaction_group(handle, split)
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
        group = reaction_group(handle, split)
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

    Opening it only reads: it checks the file (classes, images, settings) and learns which
    checkpoints are done, so a pass that fails or is killed before its first result leaves the
    file byte for byte as it was. The first :meth:`store` creates or grows the results groups
    and writes its checkpoint in the same atomic replacement; later ones rewrite pre-allocated
    rows in place, one row write per split whatever the length of the run. An epoch beyond
    the axis grows it geometrically (to the run's planned epochs, or by as many epochs again
    as it holds), so following a run of N checkpoints copies the file O(log N) times.
    After a failure, :meth:`discard_unfilled` takes back the rows that no result filled.

    One sink per file at a time: a second one (an analyzer started twice by mistake) is
    refused while the first lives, so no row is ever computed twice or lost between two axes.

    Args:
        path: the run file or stand-alone results file.
        class_names: the classes, in index order.
        images: each split's image identity.
        settings: the :class:`~store.spec.ReactionSpec` attributes plus ``backend``.
        devices: where the results are computed (recorded in ``devices``).
        epochs: the epoch axis wanted (every checkpoint's, or the run's planned epochs).
        planned: the run's planned epochs (a run file's axis), if known.
    """

    def __init__(self, path: Path, *, class_names: Sequence[str],
                 images: dict[str, SplitImages], settings: dict[str, str],
                 devices: Sequence[str], epochs: Sequence[int],
                 planned: Sequence[int] = ()) -> None:
        self.path = Path(path)
        self.class_names = list(class_names)
        self.images = dict(images)
        self.settings = dict(settings)
        self.devices = sorted(set(devices))
        self.planned = sorted(planned)
        self._owner = contextlib.ExitStack()
        self._owner.enter_context(folder_owned(
            self.path.parent, self.path.name + WRITER_SUFFIX,
            f"another analyzer is writing results into {self.path}: wait for it to end "
            "(a second one would compute the same checkpoints again)"))
        self._rows: dict[str, dict[int, int]] = {split: {} for split in self.images}
        self.done: dict[str, dict[int, str]] = {split: {} for split in self.images}
        self._initial: dict[str, list[int]] = {}  # each existing group's axis at the opening
        self._devices_recorded = False  # every group lists every one of self.devices
        if self.path.exists():
            remove_stale_copies(self.path)  # of a writer killed inside an atomic replacement
            check_results_target(self.path, self.class_names, self.images)
            self._initial = self._check_groups()
            self._read_axes()
        self._wanted = sorted(set(epochs) | {e for axis in self._initial.values() for e in axis})

    def close(self) -> None:
        """Let another writer in (the process's end does it too)."""
        self._owner.close()

    def __enter__(self) -> ResultsSink:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        """Close; leaving on an error first discards the rows no result filled."""
        try:
            if kind is not None:
                self._discard_quietly()
        finally:
            self.close()

    def _discard_quietly(self) -> None:
        try:
            self.discard_unfilled()
        except (OSError, InputError) as error:  # e.g. no room for the copy: the file stays whole
            logger.warning(f"{self.path} keeps rows that no result filled (they read as not "
                           f"computed): {first_line(error)}")

    def _check_groups(self) -> dict[str, list[int]]:
        """The axis of each split's existing group, after refusing one of other settings,
        classes or images."""
        axes, recorded = {}, []
        with open_for_reading(self.path) as handle:
            for split, identity in self.images.items():
                group = reaction_group(handle, split)
                if group is not None:
                    axes[split] = _existing_epochs(self.path, group, split, self.class_names,
                                                   identity, self.settings)
                    recorded.append(set(json.loads(group.attrs["devices"])))
        self._devices_recorded = len(axes) == len(self.images) and all(
            set(self.devices) <= devices for devices in recorded)
        return axes

    def _read_axes(self) -> None:
        with open_for_reading(self.path) as handle:
            for split in self.images:
                group = handle.get(f"{GROUP}/{split}")
                if group is None:
                    continue
                epochs = group["epoch"][()].tolist()
                self._rows[split] = {epoch: row for row, epoch in enumerate(epochs)}
                rows = zip(epochs, group["computed"][()], group["checkpoint_sha256"][()],
                           strict=True)
                self.done[split] = {int(e): sha.decode() for e, flag, sha in rows if flag}

    @property
    def axis(self) -> list[int]:
        """The epochs that have a row in every split (none before the first store)."""
        rows = [set(rows) for rows in self._rows.values()]
        return sorted(set.intersection(*rows)) if rows else []

    def store(self, result: CheckpointResults) -> None:
        """Write one checkpoint's rows for each of its splits, then their ``computed`` flags.

        A reader sees the checkpoint's results whole or not at all; a writer killed midway
        leaves rows that are not flagged, which a rerun computes again.
        """
        unknown = set(result.splits) - set(self.images)
        if unknown:
            raise InputError(f"no results group for the split(s) {', '.join(sorted(unknown))}")
        if self._needs_rebuild(result.epoch):
            self._set_axis(self._grown_axis(result.epoch), result)
        else:
            with update_in_place(self.path) as handle:
                self._write_rows(handle, result)
        for split, epoch_result in result.splits.items():
            self.done[split][result.epoch] = epoch_result.checkpoint_sha256

    def _needs_rebuild(self, epoch: int) -> bool:
        """Whether storing ``epoch`` needs a structural change: a split without its group
        or row, or a device not yet recorded."""
        return not self._devices_recorded or any(
            epoch not in rows for rows in self._rows.values())

    def _write_rows(self, handle: h5py.File, result: CheckpointResults) -> None:
        for split, epoch_result in result.splits.items():
            group, row = handle[f"{GROUP}/{split}"], self._rows[split][result.epoch]
            for name in _ROW_VARIABLES:
                if name != "computed":
                    value = getattr(epoch_result, name)
                    group[name][row] = value.encode() if isinstance(value, str) else value
        handle.flush()
        for split in result.splits:
            handle[f"{GROUP}/{split}"]["computed"][self._rows[split][result.epoch]] = 1

    def _grown_axis(self, epoch: int) -> list[int]:
        axis = set(self._wanted) | set(self.axis)
        if epoch in axis:
            return sorted(axis)
        if epoch in self.planned:
            wanted = set(self.planned)
        else:
            step = _usual_step(sorted(axis))
            wanted = {epoch + step * k for k in range(max(len(axis), 16))}
        return sorted(axis | wanted | {epoch})

    def trim(self, keep: Sequence[int]) -> None:
        """Drop the rows grown ahead that no checkpoint filled: keep computed rows, ``keep``
        and the planned epochs. Nothing is copied when no row would go."""
        self._shrink(set(keep) | set(self.planned))

    def discard_unfilled(self) -> None:
        """After a failed pass: take back every row this sink added that no result filled, so
        the file differs from the one it opened only by whole, computed results."""
        self._shrink({epoch for axis in self._initial.values() for epoch in axis})

    def _shrink(self, keep: set[int]) -> None:
        for done in self.done.values():
            keep |= set(done)
        axis = [epoch for epoch in self.axis if epoch in keep]
        if axis != self.axis:
            self._set_axis(axis)

    def _set_axis(self, axis: list[int], result: CheckpointResults | None = None) -> None:
        """Rebuild every split over ``axis`` (creating the file if need be) and write
        ``result`` into the new copy, all in one atomic replacement."""
        with replace_atomically(self.path, room=self._bytes_over(axis)) as handle:
            if "format" not in handle.attrs:
                handle.attrs.update({"format": RESULTS_FORMAT, "format_version": RESULTS_VERSION,
                                     "classes": json.dumps(self.class_names)})
            for split, identity in self.images.items():
                _rebuild_split(handle, split, axis, self.class_names, identity, self.settings,
                               self.devices)
            self._read_rows(handle)
            if result is not None:
                self._write_rows(handle, result)
        self._devices_recorded = True

    def _bytes_over(self, axis: list[int]) -> int:
        """An upper estimate of the bytes of every split's group over ``axis`` (what a
        rebuild adds to the file: the old groups' space is not reused)."""
        classes = len(self.class_names)
        total = ROOM
        for identity in self.images.values():
            ids = sum(len(image_id.encode()) + 16 for image_id in identity.ids)
            per_epoch = len(identity.ids) * 6 + classes * 28 + 350  # f4 + i2; 3 f8 + i4; rest
            total += 2 * ids + 8 * len(identity.ids) + len(axis) * per_epoch
        return total

    def _read_rows(self, handle: h5py.File) -> None:
        for split in self.images:
            epochs = handle[f"{GROUP}/{split}/epoch"][()].tolist()
            self._rows[split] = {epoch: row for row, epoch in enumerate(epochs)}


def _usual_step(epochs: Sequence[int]) -> int:
    """The most common gap between consecutive epochs (1 for fewer than two)."""
    gaps = np.diff(np.asarray(sorted(epochs), dtype=np.int64))
    if gaps.size == 0:
        return 1
    values, counts = np.unique(gaps, return_counts=True)
    return max(1, int(values[np.argmax(counts)]))
