"""Writing files safely: atomic replacement, and one owner per folder.

Atomic replacement writes beside the target, then renames over it: a reader never sees a
half-written file, and a process killed mid-write leaves at most a ``<name>.<random>.tmp`` file
that the next writer removes. The new file gets the permissions any newly created file would
get (``0o666`` less the umask), so collaborators who share a group folder can read the
results: :func:`tempfile.mkstemp` alone would leave ``0o600``.

:func:`folder_owned` keeps a second long-running writer (a second trainer) out of a folder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from store.errors import InputError

_ATTEMPTS = 100


def temporary_beside(path: Path) -> Path:
    """Create an empty, new ``<name>.<random>.tmp`` file in ``path``'s folder and return it."""
    path = Path(path)
    for _ in range(_ATTEMPTS):
        candidate = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            descriptor = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(descriptor)
        return candidate
    raise FileExistsError(f"no free temporary name beside {path}")


def write_atomically(path: Path, *parts: bytes | memoryview) -> None:
    """Write ``parts``, one after the other, to ``path`` via a temporary file in the same
    folder and a rename (parts spare the caller joining large buffers into one)."""
    path = Path(path)
    with no_room_is_one_line(path, sum(len(part) for part in parts)):
        temporary = temporary_beside(path)
        try:
            with open(temporary, "wb") as handle:
                for part in parts:
                    handle.write(part)
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)


_NO_ROOM = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


@contextlib.contextmanager
def no_room_is_one_line(path: Path, needed: int) -> Iterator[None]:
    """Turn a full disk, a quota or a file-size limit met while writing ``path`` into an
    :class:`InputError` naming the file, the room it needs and the room there is."""
    try:
        yield
    except OSError as error:
        if error.errno not in _NO_ROOM:
            raise
        raise InputError(no_room_message(Path(path), needed, error)) from None


def no_room_message(path: Path, needed: int, error: OSError) -> str:
    """One line: which file could not be written, how much it needs, how much is free."""
    try:
        free = f"{_size(shutil.disk_usage(path.parent).free)} free"
    except OSError:
        free = "free space unknown"
    if error.errno == errno.EFBIG:
        return (f"cannot write {path}: it needs about {_size(needed)}, above this process's "
                "file-size limit (ulimit -f); raise the limit and rerun: earlier epochs are "
                "kept and the rerun continues")
    return (f"no room to write {path}: it needs about {_size(needed)}, {free} "
            f"({os.strerror(error.errno)}); free some space and rerun: earlier epochs are "
            "kept and the rerun continues")


def reserve_room(path: Path, size: int) -> None:
    """Allocate ``size`` bytes for ``path`` now, so that a full disk fails here (OSError)
    and not in the middle of an HDF5 write, where it can crash the process. HDF5 trims the
    file to its real end when it closes it."""
    if not hasattr(os, "posix_fallocate"):
        return
    descriptor = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(descriptor, 0, size)
    except OSError as error:
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # no fallocate here
            raise
    finally:
        os.close(descriptor)


def _size(count: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000:
            return f"{count:.0f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


@contextlib.contextmanager
def folder_owned(folder: Path, lock_name: str, busy: str) -> Iterator[None]:
    """Hold an exclusive lock on ``folder/lock_name`` for the whole block, or fail at once.

    Creates ``folder`` if needed. For a process that owns a folder for a long time (a
    training run): a second one gets :class:`InputError` with the message ``busy``.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / lock_name, "a+b")  # noqa: SIM115 (closed by the with below)
    except OSError as error:
        raise InputError(f"cannot create {folder}: {error.strerror}") from None
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(busy) from None
        yield
