"""A persistent cache of exported graphs: bytes by key, one file per entry, across runs.

`--backend onnx` on PyTorch checkpoints and `analyzer export-onnx` export the network's
Reaction graph before the first checkpoint (seconds); the graph without weights is stored here
under a key that the caller derives from the computation (analyzer/onnx_export.py), so the
next run with the same network and settings reads it instead.

Where: ``$REACTION_CACHE_DIR``, else ``$XDG_CACHE_HOME/reaction``, else ``~/.cache/reaction``
(entries under ``graphs/``). ``REACTION_GRAPH_CACHE=0`` (or ``off``, ``no``, ``false``) turns
the cache off, as ``--no-graph-cache`` does. Each entry holds a format line and the SHA-256 of
its payload, written to a temporary name and renamed; an entry that is unreadable, damaged or
of another format is ignored (logged at debug) and rewritten; a folder that cannot be written
means no cache, never an error.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_FORMAT = b"reaction-graph-cache 1\n"
_DIGEST = 32  # bytes of the payload's SHA-256, after the format line
_OFF = {"0", "off", "no", "false"}


def default_cache_dir() -> Path | None:
    """The cache folder the environment names, or None where ``REACTION_GRAPH_CACHE`` is off."""
    if os.environ.get("REACTION_GRAPH_CACHE", "").strip().lower() in _OFF:
        return None
    if os.environ.get("REACTION_CACHE_DIR"):
        return Path(os.environ["REACTION_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "reaction"
    return Path.home() / ".cache" / "reaction"


class GraphCache:
    """Payloads by key (hex digits) in ``folder/graphs``; ``folder=None``: a cache that holds
    nothing."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = None if folder is None else Path(folder) / "graphs"

    def path(self, key: str) -> Path | None:
        """The entry's file (whether or not it exists); None without a folder."""
        if self.folder is None:
            return None
        if not key or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"a cache key is lower-case hex digits, got {key!r}")
        return self.folder / f"{key}.graph"

    def get(self, key: str) -> bytes | None:
        """The payload stored under ``key``; None when absent, unreadable or damaged."""
        path = self.path(key)
        if path is None:
            return None
        try:
            content = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:
            logger.debug(f"graph cache: cannot read {path}: {error}")
            return None
        head, digest = len(CACHE_FORMAT), len(CACHE_FORMAT) + _DIGEST
        payload = content[digest:]
        if content[:head] != CACHE_FORMAT or \
                hashlib.sha256(payload).digest() != content[head:digest]:
            logger.debug(f"graph cache: ignoring the damaged or foreign entry {path}")
            return None
        return payload

    def put(self, key: str, payload: bytes) -> None:
        """Store ``payload`` under ``key`` atomically; a failure to write is logged at debug."""
        path = self.path(key)
        if path is None:
            return
        temporary = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            with os.fdopen(handle, "wb") as stream:
                stream.write(CACHE_FORMAT + hashlib.sha256(payload).digest() + payload)
            os.replace(temporary, path)
            temporary = None
        except OSError as error:
            logger.debug(f"graph cache: cannot write {path}: {error}")
        finally:
            if temporary is not None:
                Path(temporary).unlink(missing_ok=True)
