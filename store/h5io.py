"""Safe HDF5 access shared by every writer and reader of a run file.

HDF5 has no journal: a process killed while it changes a file's *structure* (new groups,
new datasets, resized datasets) can leave the file unreadable. So we follow two rules:

* Structural changes are made on a copy that then atomically replaces the file
  (:func:`replace_atomically`). A reader or a killed writer only ever sees the old or the
  new file, never a half-written one.
* Per-epoch results go into datasets that were pre-allocated (filled with a "not computed"
  value) when they were created, so writing them rewrites raw bytes in place and touches no
  metadata (:func:`update_in_place`). A completion marker is written last.

Writers serialise on an advisory lock on a side file ``<run file>.lock``, so a trainer and
an analyzer can share one run file; each holds the lock only while it writes.
HDF5's own file locking is turned off: readers never block writers, and the rules above
keep what a reader sees consistent.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np

from store.errors import InputError, first_line
from store.files import no_room_is_one_line, reserve_room, temporary_beside

STRING_DTYPE = h5py.string_dtype("utf-8")


def lock_path(path: Path) -> Path:
    """The side file whose advisory lock serialises the writers of ``path``."""
    return path.with_name(path.name + ".lock")


logger = logging.getLogger(__name__)
ANNOUNCE_AFTER = 2.0  # seconds: shorter waits (a trainer and a follower taking turns) are normal


def _announce_wait(path: Path) -> None:
    logger.warning(f"waiting for {path}: another process is writing it")


@contextlib.contextmanager
def writer_lock(
    path: Path, timeout: float | None = None, on_wait: Callable[[Path], None] = _announce_wait
) -> Iterator[None]:
    """Hold the exclusive writer lock of ``path``, waiting for another writer to finish.

    Args:
        path: the run file.
        timeout: seconds to wait before giving up with :class:`InputError`; None waits forever.
        on_wait: called once if the lock is still busy after ``ANNOUNCE_AFTER`` seconds (by
            default a note through :mod:`logging`), or at once when given.
    """
    path = Path(path)
    try:
        handle = open(lock_path(path), "a+b")  # noqa: SIM115 (closed by the with below)
    except OSError as error:
        raise InputError(f"cannot write in {path.parent} (its writer lock "
                         f"{lock_path(path).name}: {error.strerror})") from None
    with handle:
        began = time.monotonic()
        deadline = None if timeout is None else began + timeout
        announce_at = began + (ANNOUNCE_AFTER if on_wait is _announce_wait else 0.0)
        announced = False
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() > deadline:
                    raise InputError(f"{path} is locked by another writer") from None
                if not announced and time.monotonic() >= announce_at:
                    on_wait(path)
                    announced = True
                time.sleep(0.05)
            except OSError as error:  # ENOLCK, EOPNOTSUPP: a file system without flock
                raise InputError(f"cannot lock {lock_path(path)} ({error.strerror}): this "
                                 "file system gives no flock (NFS without its lock manager?); "
                                 "write on a local disk") from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# HDF5 will not open a file for writing while this process has it open for reading: a
# follower polls the run file in its loading thread while the main thread writes results into
# it, so within a process the opens take turns.
_OPENS_IN_THIS_PROCESS = threading.RLock()


@contextlib.contextmanager
def open_for_reading(path: Path) -> Iterator[h5py.File]:
    """An HDF5 file open read-only for the ``with`` block (any failure one clear line);
    this process's other threads open files for writing once it is closed."""
    with _OPENS_IN_THIS_PROCESS, _opened_read_only(path) as handle:
        yield handle


def _opened_read_only(path: Path) -> h5py.File:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"file not found: {path}")
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as error:
        cut = re.search(r"truncated file: eof = (\d+).*stored_eof = (\d+)", str(error))
        if cut:
            raise InputError(f"{path} is cut short: {int(cut[1]):,} of its {int(cut[2]):,} "
                             "bytes (an interrupted copy?); HDF5 reads nothing of a cut "
                             "file: copy it again from its source") from None
        raise InputError(f"{path} is not a readable HDF5 file (truncated or corrupt?): "
                         f"{first_line(error)}") from None


@contextlib.contextmanager
def update_in_place(path: Path) -> Iterator[h5py.File]:
    """Open ``path`` for in-place writes of pre-allocated datasets, under the writer lock.

    Only raw values of existing datasets may be written through the yielded file; anything
    that changes the structure must go through :func:`replace_atomically`.
    """
    path = Path(path)
    with writer_lock(path), _OPENS_IN_THIS_PROCESS:
        try:
            handle = h5py.File(path, "r+", locking=False)
        except OSError as error:
            raise InputError(f"cannot open {path} for writing: {first_line(error)}") from None
        with handle:
            yield handle
            handle.flush()


ROOM = 1 << 16  # bytes reserved beyond the copy for a structural change of unknown size


@contextlib.contextmanager
def replace_atomically(path: Path, locked: bool = True, room: int = ROOM) -> Iterator[h5py.File]:
    """Change a file's structure on a copy that replaces the original only on success.

    Yields a writable :class:`h5py.File` holding a copy of ``path`` (empty if ``path`` does
    not exist yet). If the body raises, or the process dies, ``path`` is untouched. The copy
    gets ``room`` bytes reserved beyond the original's size before HDF5 writes to it, so a
    full disk or a file-size limit is one clear line (:class:`InputError`) and never an HDF5
    write failure.

    Args:
        path: the file to create or change.
        locked: take the writer lock (pass False if the caller already holds it).
        room: an upper estimate of the bytes the body adds.
    """
    path = Path(path)
    lock = writer_lock(path) if locked else contextlib.nullcontext()
    with lock:
        size = path.stat().st_size if path.exists() else 0
        with no_room_is_one_line(path, size + room):
            temporary_path = temporary_beside(path)
        try:
            with no_room_is_one_line(path, size + room):
                if path.exists():
                    shutil.copyfile(path, temporary_path)
                reserve_room(temporary_path, size + room)
            with h5py.File(temporary_path, "r+" if path.exists() else "w",
                           locking=False) as handle:
                yield handle
            _fsync(temporary_path)
            os.replace(temporary_path, path)
        finally:
            temporary_path.unlink(missing_ok=True)


def array_bytes(record: object) -> int:
    """The bytes of the NumPy arrays among ``record``'s attributes (a dataclass of results):
    the ``room`` to reserve when they go into a file."""
    return sum(value.nbytes for value in vars(record).values() if isinstance(value, np.ndarray))


def remove_stale_copies(path: Path) -> None:
    """Delete copies that a writer killed inside :func:`replace_atomically` left behind."""
    path = Path(path)
    with writer_lock(path):  # no live writer can be in the middle of a replacement now
        for stale in path.parent.glob(path.name + ".*.tmp"):
            stale.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def add_coordinate(group: h5py.Group, name: str, values: Sequence | np.ndarray,
                   long_name: str, units: str | None = None) -> h5py.Dataset:
    """Create a 1-D coordinate variable ``name`` and make it a dimension scale of that name.

    A NumPy array keeps its dtype; a list or tuple of strings (an empty one included: a split
    without images) becomes UTF-8 text.
    """
    array = np.asarray(values)
    textual = array.dtype.kind in "OU" or (
        not isinstance(values, np.ndarray) and all(isinstance(v, str) for v in values))
    if textual:
        dataset = group.create_dataset(name, data=[str(v) for v in values], dtype=STRING_DTYPE)
    else:
        dataset = group.create_dataset(name, data=array)
    dataset.make_scale(name)
    _describe(dataset, long_name, units)
    return dataset


def add_variable(group: h5py.Group, name: str, dims: Sequence[str], fill: float | bytes,
                 dtype: np.dtype | str, long_name: str, units: str | None = None) -> h5py.Dataset:
    """Create a pre-allocated variable over existing coordinates, filled with ``fill``.

    The data are written in full at creation, so later writes of single rows only rewrite
    raw bytes in place (no chunk allocation, no metadata change).
    """
    shape = tuple(group[dim].shape[0] for dim in dims)
    dataset = group.create_dataset(name, data=np.full(shape, fill, dtype=dtype),
                                   track_times=False)
    for axis, dim in enumerate(dims):
        dataset.dims[axis].attach_scale(group[dim])
    _describe(dataset, long_name, units)
    return dataset


def _describe(dataset: h5py.Dataset, long_name: str, units: str | None) -> None:
    dataset.attrs["long_name"] = long_name
    if units is not None:
        dataset.attrs["units"] = units


def require_datasets(path: Path, group: h5py.Group, names: Sequence[str]) -> h5py.Group:
    """``group``, after checking that it holds every dataset of ``names``.

    Raises:
        InputError: naming the file, the group and the missing datasets (a damaged or
            partly copied file), instead of a KeyError deep inside a command.
    """
    missing = [name for name in names if not isinstance(group.get(name), h5py.Dataset)]
    if missing:
        raise InputError(f"{path}:{group.name} is damaged: no {', '.join(missing)} "
                         "(a partial copy or an edit?); 'analyzer info' shows what can "
                         "still be read")
    return group


def read_strings(dataset: h5py.Dataset) -> list[str]:
    """Read a 1-D string dataset as a list of Python strings."""
    return [v.decode() if isinstance(v, bytes) else str(v) for v in dataset[()]]


def write_epoch_row(path: Path, group_name: str, epoch: int,
                    values: Mapping[str, object]) -> None:
    """Write one epoch's row of a group's pre-allocated variables in place, under the writer
    lock, then (flushed after them) its ``computed`` flag: a reader sees the row whole or not
    at all. Text values are stored as bytes."""
    with update_in_place(Path(path)) as handle:
        group = handle[group_name]
        rows = np.flatnonzero(group["epoch"][()] == epoch)
        if len(rows) != 1:
            raise InputError(f"epoch {epoch} has no row in {path}:/{group_name}")
        row = int(rows[0])
        for name, value in values.items():
            group[name][row] = value.encode() if isinstance(value, str) else value
        handle.flush()
        group["computed"][row] = 1
