"""Where an analysis of checkpoints stores its results: the run file, or ``--results FILE``,
in a group of its own that each call replaces."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py

from store.errors import InputError
from store.h5io import ROOM, open_for_reading, replace_atomically
from store.results import create_results_file
from store.series import WRITABLE_FORMATS


def results_target(run_file: Path | None, results: Path | None,
                   class_names: Sequence[str] = ()) -> Path | None:
    """``results`` when given (created as a results file when it does not exist, else it
    must be a run or results file), else the run file; None when there is neither."""
    if results is None:
        return run_file
    results = Path(results)
    if not results.exists():
        results.parent.mkdir(parents=True, exist_ok=True)
        create_results_file(results, list(class_names))
        return results
    with open_for_reading(results) as handle:
        if handle.attrs.get("format") not in WRITABLE_FORMATS:
            raise InputError(f"{results} is not a reaction run or results file: refusing to "
                             "write it")
    return results


@contextlib.contextmanager
def replaced_group(path: Path, parent: str, name: str, room: int = ROOM) -> Iterator[h5py.Group]:
    """A new, empty group ``/<parent>/<name>`` of a run or results file, replacing any group
    of that name; the whole change is one atomic replacement under the writer lock, with
    ``room`` bytes (an upper estimate of the new group) reserved first."""
    path = Path(path)
    with open_for_reading(path) as handle:
        if handle.attrs.get("format") not in WRITABLE_FORMATS:
            raise InputError(f"{path} is not a reaction run or results file: refusing to "
                             f"write /{parent}")
    with replace_atomically(path, room=room) as handle:
        group = handle.require_group(parent)
        if name in group:
            del group[name]
        yield group.create_group(name)
