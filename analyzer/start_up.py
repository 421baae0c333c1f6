"""The cyclic garbage collector paused while a command starts.

Importing torch makes some 160,000 objects that the collector tracks, nearly all of which
live as long as the process. With Python's default thresholds the collector runs some 400
times while they are made, each full collection walking the grown heap again: 0.2-0.3 s of
the 2 s that ``analyzer reaction`` takes on issue 14's workload, before any checkpoint is
computed (docs/BENCHMARKS.md, "The garbage collector at start-up"). ``analyzer reaction``
sets up in :func:`start_up`: the collector waits until the pass's imports, set-up and
preflight are done, what those made is then frozen (kept out of every later collection) for
the rest of the pass, and collection goes on as usual. Results are unchanged: only when
cyclic garbage is found changes. (``trainer run`` imports torch before it reads its options,
and its start-up is a second of a run of many epochs: left as it is.)
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


class StartUp:
    """The handle :func:`start_up` gives its block: call :meth:`done` once set up."""

    def __init__(self) -> None:
        self._paused = gc.isenabled()
        self._frozen = False
        if self._paused:
            gc.disable()

    def done(self) -> None:
        """The start-up is over: freeze what it made, unless the process had frozen objects
        of its own, and collect as usual from here on. Later calls do nothing."""
        if self._paused:
            if gc.get_freeze_count() == 0:
                gc.freeze()
                self._frozen = True
            gc.enable()
            self._paused = False

    def close(self) -> None:
        """Undo everything: collect again, and put back what :meth:`done` froze."""
        if self._paused:
            gc.enable()
            self._paused = False
        if self._frozen:
            gc.unfreeze()
            self._frozen = False


@contextlib.contextmanager
def start_up() -> Iterator[StartUp]:
    """Pause the cyclic garbage collector until the block calls ``done()`` on what it is
    given (after a command's imports and set-up), and leave the collector as it was found
    when the block ends, however it ends. A collector the caller had disabled is left alone."""
    handle = StartUp()
    try:
        yield handle
    finally:
        handle.close()
