"""Atomic file replacement: write beside the target, then rename over it.

A reader never sees a half-written file, and a process killed mid-write leaves at most a
``<name>.<random>.tmp`` file that the next writer removes. The new file gets the permissions
any newly created file would get (``0o666`` less the umask), so collaborators who share a
group folder can read the results: :func:`tempfile.mkstemp` alone would leave ``0o600``.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

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


def write_atomically(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` via a temporary file in the same folder and a rename."""
    path = Path(path)
    temporary = temporary_beside(path)
    try:
        temporary.write_bytes(payload)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
