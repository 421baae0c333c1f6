"""``/features/<layer>``: feature evolution during training, written by `analyzer features`.

Layout (docs/FORMAT.md)::

    /features/<layer>   attributes: long_name, layer, split, method, updated
        epoch [epoch], channel [channel], colour [colour], row [row], col [col]
        image, image_id, label, activation, position_row, position_col,
        patch_row_start, patch_row_stop, patch_col_start, patch_col_stop   [epoch, channel]
        projection, input                       [epoch, channel, colour, row, col] (gzip)
        checkpoint_file, checkpoint_sha256      [epoch]

One group per layer; a new call for the same layer replaces its group (atomically).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path

import h5py
import numpy as np

from store.h5io import (
    ROOM,
    STRING_DTYPE,
    add_coordinate,
    array_bytes,
    open_for_reading,
    read_strings,
)
from store.result_target import replaced_group

FEATURES_GROUP = "features"


@dataclass(frozen=True)
class FeatureEvolution:
    """Per epoch and channel, the strongest activation over a split and its projection.

    Attributes:
        layer: the layer (qualified module name); split: the images searched.
        method: how the activation was projected into pixel space (``deconvnet``).
        epochs: ``[epoch]``; channels: ``[channel]`` the layer's channels followed.
        image: ``[epoch, channel]`` row of the strongest image in the split.
        image_id, label: ``[epoch, channel]`` its id (as in ``/splits``) and true class.
        activation: ``[epoch, channel]`` the activation's value.
        position_row, position_col: ``[epoch, channel]`` where in the feature map.
        patch: ``[epoch, channel, 4]`` the receptive field in the input: row start, row stop,
            column start, column stop (half-open).
        projection: ``[epoch, channel, colour, row, col]`` the projection into pixel space.
        input: ``[epoch, channel, colour, row, col]`` the image itself, as the model saw it.
        checkpoint_files, checkpoint_sha256: ``[epoch]``.
    """

    layer: str
    split: str
    method: str
    epochs: np.ndarray
    channels: np.ndarray
    image: np.ndarray
    image_id: list[list[str]]
    label: np.ndarray
    activation: np.ndarray
    position_row: np.ndarray
    position_col: np.ndarray
    patch: np.ndarray
    projection: np.ndarray
    input: np.ndarray
    checkpoint_files: list[str]
    checkpoint_sha256: list[str]


_PER_CELL = {  # name: (dtype, long_name, units)
    "image": ("i8", "row of the strongest image in /splits/<split> (or the --data folder)",
              None),
    "label": ("i8", "true class index of that image", None),
    "activation": ("f4", "the strongest activation of the channel over the split", None),
    "position_row": ("i4", "its row in the feature map", None),
    "position_col": ("i4", "its column in the feature map", None),
}
_PATCH = ("patch_row_start", "patch_row_stop", "patch_col_start", "patch_col_stop")
_PIXELS = {
    "projection": "the activation projected into pixel space (deconvnet, seed 003)",
    "input": "the strongest image, as the model saw it, in [0, 1]",
}


def write_feature_evolution(path: Path, result: FeatureEvolution) -> None:
    """Store ``result`` as ``/features/<layer>`` of a run or results file (atomic)."""
    with replaced_group(path, FEATURES_GROUP, result.layer,
                        room=ROOM + 2 * array_bytes(result)) as group:
        _write(group, result)


def _write(group: h5py.Group, result: FeatureEvolution) -> None:
    group.attrs.update({
        "long_name": "feature evolution during training (docs/METHOD.md §5)",
        "layer": result.layer, "split": result.split, "method": result.method,
        "updated": datetime.now().astimezone().isoformat(timespec="seconds")})
    colours, height, width = result.projection.shape[2:]
    add_coordinate(group, "epoch", np.asarray(result.epochs, dtype="i4"), "checkpoint epoch")
    add_coordinate(group, "channel", np.asarray(result.channels, dtype="i4"),
                   "channel of the layer")
    add_coordinate(group, "colour", np.arange(colours, dtype="i4"), "input channel")
    add_coordinate(group, "row", np.arange(height, dtype="i4"), "input pixel row")
    add_coordinate(group, "col", np.arange(width, dtype="i4"), "input pixel column")
    cell = ("epoch", "channel")
    for name, (dtype, long_name, units) in _PER_CELL.items():
        _variable(group, name, np.asarray(getattr(result, name), dtype), cell, long_name, units)
    _variable(group, "image_id", np.asarray(result.image_id, dtype=object), cell,
              "id of that image, as in /splits/<split>/image", dtype=STRING_DTYPE)
    for k, name in enumerate(_PATCH):
        _variable(group, name, np.asarray(result.patch[..., k], "i4"), cell,
                  f"receptive field of the position in the input: {name[6:].replace('_', ' ')}"
                  " (half-open pixel range)")
    for name, long_name in _PIXELS.items():
        data = np.asarray(getattr(result, name), "f4")
        _variable(group, name, data, (*cell, "colour", "row", "col"), long_name,
                  chunks=(1, 1, *data.shape[2:]), compression="gzip")
    for name, values in (("checkpoint_file", result.checkpoint_files),
                         ("checkpoint_sha256", result.checkpoint_sha256)):
        _variable(group, name, np.asarray(values, dtype="S64" if "sha" in name else "S256"),
                  ("epoch",),
                  "checkpoint file of the epoch" if name == "checkpoint_file"
                  else "SHA-256 of that file")


def _variable(group: h5py.Group, name: str, data: np.ndarray, dims: tuple[str, ...],
              long_name: str, units: str | None = None, **options) -> None:
    dataset = group.create_dataset(name, data=data, **options)
    for axis, dim in enumerate(dims):
        dataset.dims[axis].attach_scale(group[dim])
    dataset.attrs["long_name"] = long_name
    if units is not None:
        dataset.attrs["units"] = units


def read_feature_evolutions(path: Path) -> list[FeatureEvolution]:
    """Every ``/features/<layer>`` group of a file (empty when it has none)."""
    with open_for_reading(Path(path)) as handle:
        parent = handle.get(FEATURES_GROUP)
        return [] if parent is None else [_read(group) for group in parent.values()]


def _read(group: h5py.Group) -> FeatureEvolution:
    ids = group["image_id"][()]
    values = {
        "layer": str(group.attrs["layer"]), "split": str(group.attrs["split"]),
        "method": str(group.attrs["method"]), "epochs": group["epoch"][()],
        "channels": group["channel"][()],
        "image_id": [[v.decode() if isinstance(v, bytes) else str(v) for v in row]
                     for row in ids],
        "patch": np.stack([group[name][()] for name in _PATCH], axis=-1),
        "checkpoint_files": read_strings(group["checkpoint_file"]),
        "checkpoint_sha256": read_strings(group["checkpoint_sha256"]),
        **{name: group[name][()] for name in (*_PER_CELL, *_PIXELS)}}
    return FeatureEvolution(**{f.name: values[f.name] for f in fields(FeatureEvolution)})


def describe_features(handle: h5py.File) -> dict[str, dict]:
    """What `analyzer info` says of each ``/features/<layer>``: epochs, channels, split,
    method (attributes and coordinates only)."""
    return {layer: {"epochs": group["epoch"][()].tolist(),
                    "channels": group["channel"][()].tolist(),
                    "split": str(group.attrs["split"]), "method": str(group.attrs["method"])}
            for layer, group in handle.get(FEATURES_GROUP, {}).items()}
