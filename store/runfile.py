"""The run file ``<out>/run.h5``: configuration, splits and per-epoch training curves.

Layout (every dataset, dimension and attribute is documented in ``docs/FORMAT.md``)::

    /                      format, format_version, config (JSON), model (JSON), classes
    /provenance            attributes: command, host, versions, started, finished, resumes
    /splits/<split>/       image [image], label [image]
    /training/             epoch [epoch], class [class], per-epoch curves, checkpoint manifest,
                           completed_epochs (scalar, written last)

Reading needs only h5py and numpy.
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
    ROOM,
    add_coordinate,
    add_variable,
    open_for_reading,
    read_strings,
    replace_atomically,
    require_datasets,
    update_in_place,
)

FORMAT_NAME = "reaction-run"
FORMAT_VERSION = "1.1"
RUN_FILE = "run.h5"
TRAINER_LOCK = ".trainer.lock"  # held by the trainer that owns the run folder
CHECKPOINT_DIR = "checkpoints"

_SCALAR_CURVES = {
    "train_loss": ("mean cross-entropy over the epoch's training batches (dropout on)", "nat"),
    "train_accuracy": ("accuracy over the epoch's training batches (dropout on)", "1"),
    "val_loss": ("mean cross-entropy on the validation split, eval mode", "nat"),
    "val_accuracy": ("accuracy on the validation split, eval mode", "1"),
    "epoch_seconds": ("wall time of the epoch: training, validation and saving", "s"),
    "checkpoint_seconds": ("wall time spent writing the epoch's checkpoint", "s"),
    "end_time": ("time the epoch was committed, seconds since 1970-01-01 UTC", "s"),
}
_CLASS_CURVES = {
    "val_class_loss": ("mean cross-entropy per class on the validation split", "nat"),
    "val_class_accuracy": ("accuracy per class on the validation split", "1"),
}
_FILE_NAME_DTYPE = "S64"
_SHA_DTYPE = "S64"


@dataclass(frozen=True)
class EpochRecord:
    """Everything the trainer stores for one epoch."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    val_class_loss: np.ndarray
    val_class_accuracy: np.ndarray
    epoch_seconds: float
    checkpoint_seconds: float
    end_time: float
    checkpoint_file: str
    checkpoint_sha256: str

    def to_json(self) -> str:
        """Serialise (for the resume file, which must be able to finish a commit)."""
        fields = {**self.__dict__,
                  "val_class_loss": np.asarray(self.val_class_loss).tolist(),
                  "val_class_accuracy": np.asarray(self.val_class_accuracy).tolist()}
        return json.dumps(fields)

    @classmethod
    def from_json(cls, text: str) -> EpochRecord:
        """Inverse of :meth:`to_json`."""
        fields = json.loads(text)
        fields["val_class_loss"] = np.asarray(fields["val_class_loss"])
        fields["val_class_accuracy"] = np.asarray(fields["val_class_accuracy"])
        return cls(**fields)


@dataclass(frozen=True)
class RunInfo:
    """What a run file says about its run (everything but the curves)."""

    path: Path
    config: dict
    model: str
    class_names: list[str]
    split_ids: dict[str, list[str]]
    split_labels: dict[str, np.ndarray]
    epochs: int
    completed_epochs: int


def create_run_file(path: Path, *, config: dict, model_json: str, class_names: Sequence[str],
                    split_ids: dict[str, list[str]], split_labels: dict[str, np.ndarray],
                    data_description: str, provenance: dict[str, str]) -> None:
    """Create (or replace, atomically) a run file with empty curves for ``config['epochs']``."""
    epochs = int(config["epochs"])
    ids = sum(len(image_id.encode()) + 24 for split in split_ids.values() for image_id in split)
    with replace_atomically(Path(path), room=ROOM + 2 * ids + _training_bytes(
            epochs, len(class_names))) as handle:
        for name in list(handle):
            del handle[name]
        handle.attrs.update({"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                             "config": json.dumps(config, sort_keys=True), "model": model_json,
                             "classes": json.dumps(list(class_names))})
        handle.create_group("provenance").attrs.update(provenance)
        for split, ids in split_ids.items():
            group = handle.create_group(f"splits/{split}")
            group.attrs["source"] = data_description
            add_coordinate(group, "image", ids, "image id: index or relative path in the source")
            labels = group.create_dataset("label", data=np.asarray(split_labels[split], "i8"))
            labels.dims[0].attach_scale(group["image"])
            labels.attrs["long_name"] = "true class index"
        _create_training_group(handle, epochs, class_names)


def _training_bytes(epochs: int, classes: int) -> int:
    """An upper estimate of the bytes of ``/training`` for ``epochs`` epochs."""
    return ROOM + epochs * (8 * len(_SCALAR_CURVES) + 8 * classes * len(_CLASS_CURVES) + 136)


def _create_training_group(handle: h5py.File, epochs: int, class_names: Sequence[str]) -> None:
    group = handle.create_group("training")
    add_coordinate(group, "epoch", np.arange(1, epochs + 1, dtype="i4"), "training epoch")
    add_coordinate(group, "class", list(class_names), "class name")
    for name, (long_name, units) in _SCALAR_CURVES.items():
        add_variable(group, name, ["epoch"], np.nan, "f8", long_name, units)
    for name, (long_name, units) in _CLASS_CURVES.items():
        add_variable(group, name, ["epoch", "class"], np.nan, "f8", long_name, units)
    add_variable(group, "checkpoint_file", ["epoch"], b"", _FILE_NAME_DTYPE,
                 "checkpoint file name, relative to checkpoints/")
    add_variable(group, "checkpoint_sha256", ["epoch"], b"", _SHA_DTYPE,
                 "SHA-256 of the checkpoint file, hex")
    completed = group.create_dataset("completed_epochs", data=np.int64(0), track_times=False)
    completed.attrs["long_name"] = "number of epochs whose rows are complete (written last)"


def lengthen_run(path: Path, epochs: int, *, config: dict) -> None:
    """Grow the run's epoch axis to ``epochs`` (``trainer run --resume --epochs M``).

    Every committed row is kept, the new rows are "not yet", ``config`` (with the new
    ``epochs``) replaces the stored one and the run is marked unfinished again; all in one
    atomic replacement, so a kill leaves the run as it was.
    """
    with open_for_reading(Path(path)) as handle:
        classes = len(handle["training/class"])
    with replace_atomically(Path(path), room=_training_bytes(epochs, classes)) as handle:
        old = handle["training"]
        known = int(old["epoch"].shape[0])
        if epochs <= known:
            return
        class_names = read_strings(old["class"])
        rows = {name: old[name][()] for name in
                (*_SCALAR_CURVES, *_CLASS_CURVES, "checkpoint_file", "checkpoint_sha256")}
        completed = int(old["completed_epochs"][()])
        del handle["training"]
        _create_training_group(handle, epochs, class_names)
        group = handle["training"]
        for name, values in rows.items():
            group[name][:known] = values
        group["completed_epochs"][()] = completed
        handle.attrs["config"] = json.dumps(config, sort_keys=True)
        handle["provenance"].attrs["finished"] = ""


def write_epoch(path: Path, record: EpochRecord) -> None:
    """Store one epoch's rows in place, then advance ``completed_epochs`` to it."""
    row = record.epoch - 1
    with update_in_place(Path(path)) as handle:
        group = handle["training"]
        for name in _SCALAR_CURVES:
            group[name][row] = getattr(record, name)
        for name in _CLASS_CURVES:
            group[name][row, :] = getattr(record, name)
        group["checkpoint_file"][row] = record.checkpoint_file.encode()
        group["checkpoint_sha256"][row] = record.checkpoint_sha256.encode()
        handle.flush()
        group["completed_epochs"][()] = record.epoch


def update_provenance(path: Path, **attributes: str) -> None:
    """Set provenance attributes (a structural change, so done on an atomic copy)."""
    room = 4096 + sum(len(str(value).encode()) for value in attributes.values())
    with replace_atomically(Path(path), room=room) as handle:
        handle["provenance"].attrs.update(attributes)


def read_run_info(path: Path) -> RunInfo:
    """Read a run file's configuration, classes and splits (not the curves)."""
    with open_for_reading(Path(path)) as handle:
        if handle.attrs.get("format") != FORMAT_NAME:
            raise InputError(f"{path} is not a reaction run file (no format={FORMAT_NAME})")
        try:
            config = json.loads(handle.attrs["config"])
            split_ids = {name: read_strings(group["image"])
                         for name, group in handle["splits"].items()}
            split_labels = {name: group["label"][()] for name, group in handle["splits"].items()}
            return RunInfo(path=Path(path), config=config, model=str(handle.attrs["model"]),
                           class_names=json.loads(handle.attrs["classes"]),
                           split_ids=split_ids, split_labels=split_labels,
                           epochs=int(handle["training/epoch"].shape[0]),
                           completed_epochs=int(handle["training/completed_epochs"][()]))
        except (KeyError, ValueError) as error:
            raise InputError(f"run file {path} is incomplete or damaged: {error}") from None


@dataclass(frozen=True)
class RunProgress:
    """How far a run is: planned and committed epochs, and whether training has finished."""

    epochs: int
    completed_epochs: int
    finished: bool


def read_run_progress(path: Path) -> RunProgress:
    """Read only what a follower polls: three values, whatever the length of the run."""
    with open_for_reading(Path(path)) as handle:
        try:
            return RunProgress(int(handle["training/epoch"].shape[0]),
                               int(handle["training/completed_epochs"][()]),
                               bool(handle["provenance"].attrs.get("finished", "")))
        except KeyError as error:
            raise InputError(f"run file {path} is incomplete or damaged: {error}") from None


def read_training_curves(path: Path) -> dict[str, np.ndarray]:
    """The completed part of every ``/training`` curve, keyed by dataset name."""
    with open_for_reading(Path(path)) as handle:
        names = ["epoch", *_SCALAR_CURVES, *_CLASS_CURVES]
        if not isinstance(handle.get("training"), h5py.Group):
            raise InputError(f"{path} has no /training group: not a run file, or damaged")
        group = require_datasets(Path(path), handle["training"],
                                 [*names, "completed_epochs", "checkpoint_file",
                                  "checkpoint_sha256"])
        completed = int(group["completed_epochs"][()])
        curves = {name: group[name][:completed] for name in names}
        for name in ("checkpoint_file", "checkpoint_sha256"):
            curves[name] = np.array([v.decode() for v in group[name][:completed]])
        return curves


def read_provenance(path: Path) -> dict[str, str]:
    """The attributes of ``/provenance`` as strings."""
    with open_for_reading(Path(path)) as handle:
        return {name: str(value) for name, value in handle["provenance"].attrs.items()}
