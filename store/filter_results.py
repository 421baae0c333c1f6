"""``/filters/<layer>``: filter dissimilarity over the epochs, written by `analyzer filters`.

Layout (docs/FORMAT.md)::

    /filters/<layer>    attributes: long_name, layer, against, against_file, updated
        epoch [epoch], filter [filter]
        dissimilarity, nearest                    [epoch, filter]  epoch's filters as reference
        dissimilarity_against, nearest_against    [epoch, filter]  the against epoch's as reference
        checkpoint_file, checkpoint_sha256        [epoch]

One group per conv layer; a new call for the same layer replaces its group (atomically).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import h5py
import numpy as np

from store.h5io import ROOM, add_coordinate, array_bytes, open_for_reading
from store.result_target import replaced_group

FILTERS_GROUP = "filters"


@dataclass(frozen=True)
class FilterEvolution:
    """S_i of every epoch's filters against one epoch's, both ways (seed 004 eq. 1).

    Attributes:
        layer: the conv layer.
        against: the epoch whose filters are compared with every epoch's.
        against_file: its checkpoint file name.
        epochs: ``[epoch]`` the checkpoints' epochs, ascending.
        dissimilarity: ``[epoch, filter]`` S_i, epoch e's filter i as reference against the
            against epoch's filters.
        nearest: ``[epoch, filter]`` the against epoch's filter j of that minimum.
        dissimilarity_against: ``[epoch, filter]`` S_j, the against epoch's filter j as
            reference against epoch e's filters.
        nearest_against: ``[epoch, filter]`` epoch e's filter i of that minimum.
        checkpoint_files, checkpoint_sha256: ``[epoch]`` where each row came from.
    """

    layer: str
    against: int
    against_file: str
    epochs: np.ndarray
    dissimilarity: np.ndarray
    nearest: np.ndarray
    dissimilarity_against: np.ndarray
    nearest_against: np.ndarray
    checkpoint_files: list[str]
    checkpoint_sha256: list[str]


_VARIABLES = {  # name: (dtype, long_name)
    "dissimilarity": ("f8", "S_i = min_j ||F_i - G_j||_2: this epoch's filter i against the "
                            "against epoch's filters (seed 004 eq. 1)"),
    "nearest": ("i4", "the against epoch's filter j of that minimum"),
    "dissimilarity_against": ("f8", "S_j = min_i ||G_j - F_i||_2: the against epoch's filter j "
                                    "against this epoch's filters"),
    "nearest_against": ("i4", "this epoch's filter i of that minimum"),
}


def write_filter_evolution(path: Path, result: FilterEvolution) -> None:
    """Store ``result`` as ``/filters/<layer>`` of a run or results file (atomic replacement)."""
    with replaced_group(path, FILTERS_GROUP, result.layer,
                        room=ROOM + 2 * array_bytes(result)) as group:
        group.attrs.update({
            "long_name": "filter dissimilarity over the epochs (docs/METHOD.md §5)",
            "layer": result.layer, "against": int(result.against),
            "against_file": result.against_file,
            "updated": datetime.now().astimezone().isoformat(timespec="seconds")})
        add_coordinate(group, "epoch", np.asarray(result.epochs, dtype="i4"), "checkpoint epoch")
        add_coordinate(group, "filter", np.arange(result.dissimilarity.shape[1], dtype="i4"),
                       "filter index in the layer (output channel)")
        for name, (dtype, long_name) in _VARIABLES.items():
            dataset = group.create_dataset(name, data=np.asarray(getattr(result, name), dtype))
            dataset.dims[0].attach_scale(group["epoch"])
            dataset.dims[1].attach_scale(group["filter"])
            dataset.attrs["long_name"] = long_name
        for name, values, dtype, long_name in (
                ("checkpoint_file", result.checkpoint_files, "S256",
                 "checkpoint file of the epoch"),
                ("checkpoint_sha256", result.checkpoint_sha256, "S64", "SHA-256 of that file")):
            dataset = group.create_dataset(name, data=np.asarray(values, dtype=dtype))
            dataset.dims[0].attach_scale(group["epoch"])
            dataset.attrs["long_name"] = long_name


def read_filter_evolutions(path: Path) -> list[FilterEvolution]:
    """Every ``/filters/<layer>`` group of a file (empty when it has none)."""
    with open_for_reading(Path(path)) as handle:
        parent = handle.get(FILTERS_GROUP)
        return [] if parent is None else [_read(group) for group in parent.values()]


def _read(group: h5py.Group) -> FilterEvolution:
    return FilterEvolution(
        layer=str(group.attrs["layer"]), against=int(group.attrs["against"]),
        against_file=str(group.attrs["against_file"]), epochs=group["epoch"][()],
        **{name: group[name][()] for name in _VARIABLES},
        checkpoint_files=[v.decode() for v in group["checkpoint_file"][()]],
        checkpoint_sha256=[v.decode() for v in group["checkpoint_sha256"][()]])



def describe_filters(handle: h5py.File) -> dict[str, dict]:
    """What `analyzer info` says of each ``/filters/<layer>``: epochs, filters, against."""
    return {layer: {"epochs": int(group["epoch"].shape[0]),
                    "first_epoch": int(group["epoch"][0]), "last_epoch": int(group["epoch"][-1]),
                    "filters": int(group["filter"].shape[0]),
                    "against": int(group.attrs["against"])}
            for layer, group in handle.get(FILTERS_GROUP, {}).items()}
