"""Named per-epoch series of a run file, a results file or a CSV, and the ``/extract`` table.

Series names (``analyzer extract --series``; see ``docs/EXTRACT.md``):

* ``reaction:<split>``: model Reaction, ``/reaction/<split>/model_reaction``;
* ``loss:<split>``, ``accuracy:<split>``: ``/training/<split>_loss`` (``_accuracy``) when the
  trainer wrote it, else the mean over the split's images from ``/reaction/<split>``;
* a path to any per-epoch dataset, e.g. ``training/val_accuracy``,
  ``reaction/val/model_reaction``;
* in a CSV: any column; the epochs are the ``epoch`` column (or TensorBoard's ``Step``).

Only computed rows are returned (``completed_epochs`` of ``/training``, the ``computed`` flag of
``/reaction/<split>``); a missing value inside a series is NaN.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import h5py
import numpy as np

from store.errors import InputError
from store.h5io import (
    STRING_DTYPE,
    add_coordinate,
    open_for_reading,
    read_strings,
    replace_atomically,
)
from store.results import reaction_group

EXTRACT_GROUP = "extract"
WRITABLE_FORMATS = ("reaction-run", "reaction-results")
DEFAULT_SERIES = ("reaction:train", "loss:val")
HDF5_TEST_SERIES = "accuracy:test"
CSV_TEST_COLUMN = "test_accuracy"
_KINDS = ("reaction", "loss", "accuracy")
_CSV_EPOCH_COLUMNS = ("epoch", "step")
_CSV_IGNORED_COLUMNS = ("wall time", "wall_time")


@dataclass(frozen=True)
class Series:
    """One value per epoch; ``source`` says where it was read from."""

    name: str
    source: str
    epochs: np.ndarray
    values: np.ndarray


def is_csv(path: Path) -> bool:
    """True for a ``.csv`` file (everything else is read as HDF5)."""
    return Path(path).suffix.lower() == ".csv"


# --- reading -------------------------------------------------------------------------------


def read_series(path: Path, name: str) -> Series:
    """The series ``name`` of ``path`` (see the module docstring for the names)."""
    path = Path(path)
    if is_csv(path):
        return _csv_series(path, name)
    with open_for_reading(path) as handle:
        series = _hdf5_series(handle, name)
        if series is None:
            raise InputError(f"{path} has no series {name!r}; it has: "
                             f"{', '.join(_hdf5_names(handle)) or 'none'}")
        return series


def series_names(path: Path) -> list[str]:
    """Every series name that :func:`read_series` accepts for ``path``."""
    path = Path(path)
    if is_csv(path):
        return list(_read_csv(path)[1])
    with open_for_reading(path) as handle:
        return _hdf5_names(handle)


def default_series(path: Path, test_column: str | None = None) -> list[str]:
    """What ``analyzer extract`` analyses without ``--series``.

    A run or results file: those of ``reaction:train`` and ``loss:val`` that it holds. A CSV:
    every column but the epochs, the test accuracy and TensorBoard's wall time.
    """
    names = series_names(path)
    if is_csv(path):
        test = test_column or CSV_TEST_COLUMN
        return [n for n in names if n != test and n.lower() not in _CSV_IGNORED_COLUMNS]
    return [n for n in DEFAULT_SERIES if n in names]


def read_test_accuracy(path: Path, name: str | None = None) -> Series | None:
    """The test accuracy per epoch (a fraction), or None when ``path`` has none.

    By default ``accuracy:test`` (the share of test images predicted right, from the Reaction
    pass over the test split) of a run or results file, or the ``test_accuracy`` column of a
    CSV. A named series must exist. A CSV column with any value above 1 is read as percent.
    """
    path = Path(path)
    default = CSV_TEST_COLUMN if is_csv(path) else HDF5_TEST_SERIES
    if name is None and default not in series_names(path):
        return None
    series = read_series(path, name or default)
    if is_csv(path) and np.nanmax(series.values, initial=0.0) > 1:
        series = Series(series.name, series.source + " (percent)", series.epochs,
                        series.values / 100)
    return series


def _hdf5_series(handle: h5py.File, name: str) -> Series | None:
    kind, _, split = name.partition(":")
    if split and kind in _KINDS:
        if kind != "reaction":
            trained = _training_series(handle, f"{split}_{kind}")
            if trained is not None:
                return Series(name, trained.source, trained.epochs, trained.values)
        return _reaction_series(handle, kind, split, name)
    return _dataset_series(handle, name.strip("/"), name)


def _training_series(handle: h5py.File, curve: str) -> Series | None:
    group = handle.get("training")
    if group is None or curve not in group or "completed_epochs" not in group:
        return None
    completed = int(group["completed_epochs"][()])
    if completed == 0:
        return None
    return Series(f"training/{curve}", f"/training/{curve}", group["epoch"][:completed],
                  group[curve][:completed].astype(np.float64))


def _reaction_series(handle: h5py.File, kind: str, split: str, name: str) -> Series | None:
    group = reaction_group(handle, split)
    if group is None:
        return None
    done = group["computed"][()].astype(bool)
    epochs = group["epoch"][()][done]
    source = f"/reaction/{split}"
    if kind == "reaction":
        values = group["model_reaction"][()][done]
        source += "/model_reaction"
    elif kind == "accuracy":
        values = (group["prediction"][()][done] == group["label"][()]).mean(axis=1)
        source += " (prediction == label, mean over images)"
    else:
        values = _image_mean(group["loss"][()][done], group["label"][()], group["class"].size)
        source += "/loss (mean over images)"
    return Series(name, source, epochs, np.asarray(values, dtype=np.float64))


def _image_mean(class_values: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Mean over images of a per-class mean: class means weighted by class sizes."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    present = counts > 0
    return class_values[:, present] @ counts[present] / counts.sum()


def _dataset_series(handle: h5py.File, path: str, name: str) -> Series | None:
    dataset = handle.get(path)
    if not _is_epoch_series(dataset):
        return None
    group = dataset.parent
    rows = np.ones(dataset.shape[0], dtype=bool)
    if "completed_epochs" in group:
        rows[int(group["completed_epochs"][()]):] = False
    if "computed" in group:
        rows &= group["computed"][()].astype(bool)
    return Series(name, dataset.name, group["epoch"][()][rows],
                  dataset[()][rows].astype(np.float64))


def _is_epoch_series(dataset: object) -> bool:
    """A 1-D numeric dataset beside an ``epoch`` coordinate of its length (not a flag)."""
    if not isinstance(dataset, h5py.Dataset) or dataset.ndim != 1:
        return False
    epoch = dataset.parent.get("epoch")
    return (dataset.dtype.kind in "fiu" and dataset.name.rsplit("/", 1)[-1]
            not in ("epoch", "computed") and isinstance(epoch, h5py.Dataset)
            and epoch.shape == dataset.shape)


def _hdf5_names(handle: h5py.File) -> list[str]:
    names = []
    splits = list(handle.get("reaction", {}))
    for split in splits:
        names.append(f"reaction:{split}")
    for kind in ("loss", "accuracy"):
        for split in dict.fromkeys(["train", "val", "test", *splits]):
            if split in splits or _training_series(handle, f"{split}_{kind}") is not None:
                names.append(f"{kind}:{split}")
    for group_name in ["training", *(f"reaction/{s}" for s in splits)]:
        group = handle.get(group_name)
        if isinstance(group, h5py.Group):
            names += [f"{group_name}/{key}" for key, item in group.items()
                      if _is_epoch_series(item)]
    return names


def _read_csv(path: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The epochs and every other column of a CSV (empty cells and "nan" are NaN)."""
    if not path.is_file():
        raise InputError(f"file not found: {path}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except UnicodeDecodeError as error:
        raise InputError(f"{path} is not UTF-8 text (byte {error.start}): save the CSV as "
                         "UTF-8") from None
    except csv.Error as error:
        raise InputError(f"{path} is not a readable CSV: {error}") from None
    if not rows:
        raise InputError(f"{path} is empty")
    header = [cell.strip() for cell in rows[0]]
    lower = [cell.lower() for cell in header]
    epoch_column = next((lower.index(c) for c in _CSV_EPOCH_COLUMNS if c in lower), None)
    if epoch_column is None:
        raise InputError(f"{path} has no 'epoch' column (columns: {', '.join(header)})")
    table = np.full((len(rows) - 1, len(header)), np.nan)
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise InputError(f"{path}:{line}: {len(row)} cells, the header has {len(header)}")
        for column, cell in enumerate(row):
            table[line - 2, column] = _csv_number(path, line, cell)
    epochs = table[:, epoch_column]
    if np.isnan(epochs).any() or np.any(epochs != np.round(epochs)):
        raise InputError(f"{path}: every row needs a whole epoch number")
    unique, counts = np.unique(epochs, return_counts=True)
    if (counts > 1).any():
        raise InputError(f"{path}: epoch {int(unique[counts > 1][0])} appears "
                         f"{int(counts.max())} times; one row per epoch")
    columns = {name: table[:, k] for k, name in enumerate(header) if k != epoch_column}
    return epochs.astype(np.int64), columns


def _csv_number(path: Path, line: int, cell: str) -> float:
    cell = cell.strip()
    if not cell:
        return math.nan
    try:
        return float(cell)
    except ValueError:
        raise InputError(f"{path}:{line}: {cell!r} is not a number") from None


def _csv_series(path: Path, name: str) -> Series:
    epochs, columns = _read_csv(path)
    if name not in columns:
        raise InputError(f"{path} has no column {name!r}; it has: {', '.join(columns)}")
    return Series(name, f"{path.name}:{name}", epochs, columns[name])


# --- /extract ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredExtraction:
    """One row of ``/extract``: a chosen epoch and what it was chosen from.

    ``threshold`` is None except for the threshold criterion; ``window`` is the window used
    (0 for the minimum criterion, which has none, and when ``--window auto`` could not choose
    one); ``window_rule`` is ``"fixed"`` (a number given or the default 100), ``"auto"``
    (chosen by ``--window auto``) or ``""`` (minimum); ``epoch`` None: no epoch satisfies the
    criterion, and ``reason`` says why (empty when there is an epoch); accuracies are
    fractions, None when unknown.
    """

    series: str
    source: str
    criterion: str
    threshold: float | None
    window: int
    epoch: int | None
    test_accuracy: float | None
    best_test_epoch: int | None
    best_test_accuracy: float | None
    test_source: str
    analysed_epochs: int
    window_rule: str = "fixed"
    reason: str = ""

    @property
    def key(self) -> tuple[str, str, float, int | str]:
        """Rows with the same key replace each other (``--window auto`` rows: one per series)."""
        threshold = math.nan if self.threshold is None else round(self.threshold, 6)
        window = "auto" if self.window_rule == "auto" else self.window
        return self.series, self.criterion, threshold, window


_EXTRACT_COLUMNS = {  # name: (dtype, missing value, long_name, units)
    "series": ("str", None, "series the epoch was chosen from", None),
    "source": ("str", None, "where the series was read from", None),
    "criterion": ("str", None, "criterion: threshold, auto or minimum", None),
    "threshold": ("f8", math.nan, "threshold T of the threshold criterion (NaN: other "
                  "criteria)", "1"),
    "window": ("i4", None, "window of the standard deviation or of the trend test, in "
               "analysed epochs (0: minimum criterion)", None),
    "epoch": ("i4", -1, "chosen epoch (-1: no epoch satisfies the criterion)", None),
    "test_accuracy": ("f8", math.nan, "test accuracy at the chosen epoch (NaN: unknown)", "1"),
    "best_test_epoch": ("i4", -1, "epoch of the best test accuracy (-1: unknown)", None),
    "best_test_accuracy": ("f8", math.nan, "best test accuracy of any epoch (NaN: unknown)",
                           "1"),
    "test_source": ("str", None, "where the test accuracy was read from (empty: none)", None),
    "analysed_epochs": ("i4", None, "number of epochs with a value in the series", None),
    "window_rule": ("str", None, "how the window was set: fixed (a number), auto (--window "
                    "auto), empty (minimum criterion)", None),
    "reason": ("str", None, "why no epoch satisfies the criterion (empty: there is one)", None),
}
_LATER_COLUMNS = ("window_rule", "reason")
"""Columns added after the first /extract layout; rows of older files get their defaults."""


def write_extract(path: Path, rows: list[StoredExtraction]) -> None:
    """Merge ``rows`` into ``/extract`` of a run or results file (atomic replacement).

    A row replaces the stored row with the same series, criterion, threshold and window;
    the others stay.
    """
    path = Path(path)
    with open_for_reading(path) as handle:
        if handle.attrs.get("format") not in WRITABLE_FORMATS:
            raise InputError(f"{path} is not a reaction run or results file: "
                             "refusing to write /extract")
    with replace_atomically(path) as handle:
        merged = {row.key: row for row in _read_extract_group(handle)}
        merged.update({row.key: row for row in rows})
        ordered = sorted(merged.values(), key=_row_order)
        if EXTRACT_GROUP in handle:
            del handle[EXTRACT_GROUP]
        _write_extract_group(handle.create_group(EXTRACT_GROUP), ordered)


def read_extract(path: Path) -> list[StoredExtraction]:
    """The rows of ``/extract`` (empty when the file has none)."""
    with open_for_reading(Path(path)) as handle:
        return _read_extract_group(handle)


def _row_order(row: StoredExtraction) -> tuple:
    criterion = ("threshold", "auto", "minimum").index(row.criterion) \
        if row.criterion in ("threshold", "auto", "minimum") else 3
    return row.series, criterion, row.threshold or 0.0, row.window_rule == "auto", row.window


def _write_extract_group(group: h5py.Group, rows: list[StoredExtraction]) -> None:
    group.attrs["long_name"] = "epochs chosen by `analyzer extract` (docs/EXTRACT.md)"
    group.attrs["updated"] = datetime.now().astimezone().isoformat(timespec="seconds")
    add_coordinate(group, "row", np.arange(len(rows), dtype="i4"), "row of the table")
    for name, (dtype, missing, long_name, units) in _EXTRACT_COLUMNS.items():
        values = [getattr(row, name) for row in rows]
        if dtype == "str":
            dataset = group.create_dataset(name, data=[str(v) for v in values],
                                           dtype=STRING_DTYPE, shape=(len(rows),))
        else:
            data = np.array([missing if v is None else v for v in values], dtype=dtype)
            dataset = group.create_dataset(name, data=data, shape=(len(rows),), dtype=dtype)
        dataset.dims[0].attach_scale(group["row"])
        dataset.attrs["long_name"] = long_name
        if units is not None:
            dataset.attrs["units"] = units


def _read_extract_group(handle: h5py.File) -> list[StoredExtraction]:
    group = handle.get(EXTRACT_GROUP)
    if group is None:
        return []
    columns = {}
    for name, (dtype, _, _, _) in _EXTRACT_COLUMNS.items():
        if name in _LATER_COLUMNS and name not in group:
            continue
        columns[name] = read_strings(group[name]) if dtype == "str" else group[name][()].tolist()
    if "window_rule" not in columns:
        columns["window_rule"] = ["" if c == "minimum" else "fixed" for c in columns["criterion"]]
    return [StoredExtraction(**_restore_missing({n: columns[n][k] for n in columns}))
            for k in range(group["row"].shape[0])]


def _restore_missing(row: dict) -> dict:
    for name in ("threshold", "test_accuracy", "best_test_accuracy"):
        if math.isnan(row[name]):
            row[name] = None
    for name in ("epoch", "best_test_epoch"):
        if row[name] < 0:
            row[name] = None
    return row
