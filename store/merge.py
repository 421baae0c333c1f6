"""Joining results files: the shards of one pass (``analyzer reaction --shard K/N``) into a
run file or a results file (``analyzer merge``).

Everything is checked before anything is written: the classes, every split's images and
settings (layer, score, target, weighting, backend), and, for an epoch that several files hold
(the target included), the SHA-256 of the checkpoint it was computed from. A conflict is one
line naming the file, the setting, the value stored and the value given.

The rows are then written through :class:`~store.results.ResultsSink`, one whole checkpoint at
a time, so a merge killed midway leaves whole checkpoints and a rerun finishes it. Rows that
the target already holds (with the same SHA-256, checked) are skipped: merging twice changes
nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from store.errors import InputError
from store.h5io import open_for_reading, read_strings
from store.results import (
    GROUP,
    RESULTS_FORMAT,
    SETTINGS,
    CheckpointResults,
    EpochResult,
    ResultsSink,
    SplitImages,
    stored_settings,
)
from store.runfile import read_run_info

_RUN_FORMAT = "reaction-run"
_ROW_FIELDS = tuple(f.name for f in dataclasses.fields(EpochResult) if f.name != "epoch")


@dataclass
class _Split:
    """What one file holds for one split."""

    settings: dict[str, str]
    images: SplitImages
    axis: list[int]
    rows: dict[int, int]  # computed epoch → its row
    sha256: dict[int, str]  # computed epoch → the checkpoint's SHA-256
    devices: list[str]


@dataclass
class _File:
    """What one run or results file holds."""

    path: Path
    classes: list[str]
    splits: dict[str, _Split] = field(default_factory=dict)
    run_images: dict[str, list[str]] = field(default_factory=dict)  # a run file's /splits
    planned: list[int] = field(default_factory=list)  # a run file's training epochs


@dataclass
class MergeSummary:
    """What a merge did: checkpoints stored, and those the target already held."""

    target: Path
    merged: int = 0
    already: int = 0


def _read_file(path: Path) -> _File:
    with open_for_reading(path) as handle:
        kind = handle.attrs.get("format")
        if kind not in (RESULTS_FORMAT, _RUN_FORMAT):
            raise InputError(f"{path} is not a reaction run or results file")
        info = _File(path, json.loads(handle.attrs.get("classes", "null")) or [])
        for name, group in handle.get(GROUP, {}).items():
            epochs = group["epoch"][()].tolist()
            done = group["computed"][()]
            hashes = group["checkpoint_sha256"][()]
            info.splits[name] = _Split(
                stored_settings(group), SplitImages(read_strings(group["image"]),
                                                    group["label"][()]),
                epochs, {e: row for row, e in enumerate(epochs) if done[row]},
                {e: hashes[row].decode() for row, e in enumerate(epochs) if done[row]},
                json.loads(group.attrs.get("devices", "[]")))
        if kind == _RUN_FORMAT:
            info.run_images = {name: read_strings(group["image"])
                               for name, group in handle.get("splits", {}).items()}
    if kind == _RUN_FORMAT:
        info.planned = list(range(1, read_run_info(path).epochs + 1))
    return info


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _conflict(given: Path, what: str, value: object, stored_in: Path, stored: object) -> None:
    raise InputError(f"{given}: {what} is {_short(value)}, but {stored_in} holds "
                     f"{_short(stored)}: nothing merged")


def _check_images(given: _File, split: str, ids: list[str], labels: np.ndarray | None,
                  reference: Path, reference_ids: list[str],
                  reference_labels: np.ndarray | None) -> None:
    if len(ids) != len(reference_ids):
        _conflict(given.path, f"the number of {split} images", len(ids), reference,
                  len(reference_ids))
    for index, (mine, theirs) in enumerate(zip(ids, reference_ids, strict=True)):
        if mine != theirs:
            _conflict(given.path, f"{split} image #{index}", mine, reference, theirs)
    if labels is not None and reference_labels is not None:
        differ = np.flatnonzero(np.asarray(labels) != np.asarray(reference_labels))
        if differ.size:
            index = int(differ[0])
            _conflict(given.path, f"the label of {split} image {ids[index]!r}",
                      int(labels[index]), reference, int(reference_labels[index]))


def _check(target: _File | None, shards: list[_File]) -> dict[str, str]:
    """Refuse any disagreement between the files; return the merged settings."""
    files = ([target] if target is not None else []) + shards
    classes_from = target if target is not None else shards[0]
    merged = {split for shard in shards for split in shard.splits}
    settings: tuple[Path, dict[str, str]] | None = None
    if target is not None:
        for split in sorted(merged & set(target.splits)):
            settings = settings or (target.path, target.splits[split].settings)
    images: dict[str, tuple[Path, SplitImages]] = {}
    hashes: dict[int, tuple[Path, str]] = {}
    for file in files:
        if file.classes != classes_from.classes:
            _conflict(file.path, "classes", file.classes, classes_from.path,
                      classes_from.classes)
        for split, held in sorted(file.splits.items()):
            if split not in merged:
                continue
            settings = settings or (file.path, held.settings)
            for name in SETTINGS:
                if held.settings[name] != settings[1][name]:
                    _conflict(file.path, f"{split} {name}", held.settings[name], settings[0],
                              settings[1][name])
            source, reference = images.setdefault(split, (file.path, held.images))
            _check_images(file, split, held.images.ids, held.images.labels, source,
                          reference.ids, reference.labels)
            if target is not None and split in target.run_images:
                _check_images(file, split, held.images.ids, None, target.path,
                              target.run_images[split], None)
            for epoch, sha in held.sha256.items():
                source, stored = hashes.setdefault(epoch, (file.path, sha))
                if sha != stored:
                    _conflict(file.path, f"the SHA-256 of the checkpoint of epoch {epoch} "
                              f"({split})", sha, source, stored)
    if settings is None:
        raise InputError(f"{shards[0].path} holds no Reaction results: nothing to merge")
    return settings[1]


def merge_results(target: Path, shards: Sequence[Path]) -> MergeSummary:
    """Merge the Reaction results of ``shards`` into ``target`` (a run file, a results file,
    or a new results file), after checking that they all agree (see the module docstring)."""
    target = Path(target)
    paths = list(dict.fromkeys(Path(shard) for shard in shards))
    for path in paths:
        if path.exists() and target.exists() and path.samefile(target):
            raise InputError(f"{path} is the target itself: give the shards after TARGET")
    files = [_read_file(path) for path in paths]
    existing = _read_file(target) if target.exists() else None
    settings = _check(existing, files)
    splits = sorted({split for shard in files for split in shard.splits})
    first = {split: next(shard.splits[split] for shard in files if split in shard.splits)
             for split in splits}
    axis = {epoch for shard in files for held in shard.splits.values() for epoch in held.axis}
    planned = existing.planned if existing is not None else []
    devices = {device for shard in files for held in shard.splits.values()
               for device in held.devices}
    sink = ResultsSink(target, devices=sorted(devices), class_names=files[0].classes,
                       images={split: first[split].images for split in splits},
                       settings=settings, epochs=sorted(axis | set(planned)), planned=planned)
    summary = MergeSummary(target)
    with contextlib.ExitStack() as stack:
        stack.enter_context(sink)
        handles = [stack.enter_context(open_for_reading(shard.path)) for shard in files]
        for epoch in sorted({e for shard in files for held in shard.splits.values()
                             for e in held.rows}):
            rows = {}
            for shard, handle in zip(files, handles, strict=True):
                for split, held in shard.splits.items():
                    if epoch in held.rows and split not in rows \
                            and epoch not in sink.done[split]:
                        rows[split] = _read_row(handle[f"{GROUP}/{split}"], epoch,
                                                held.rows[epoch])
            if rows:
                sink.store(CheckpointResults(epoch, rows))
                summary.merged += 1
            else:
                summary.already += 1
    return summary


def _read_row(group: h5py.Group, epoch: int, row: int) -> EpochResult:
    values = {}
    for name in _ROW_FIELDS:
        value = group[name][row]
        if isinstance(value, bytes | np.bytes_):
            value = value.decode()
        elif np.ndim(value) == 0:
            value = float(value)
        values[name] = value
    return EpochResult(epoch=epoch, **values)
