"""Ctrl-C and SIGTERM during a pass: stop at once, but never inside a write.

While :class:`StopSignals` is active, SIGINT and SIGTERM set :attr:`StopSignals.requested`
and raise :class:`StopRequested` in the main thread, which abandons the checkpoint being
computed (it is stored whole or not at all). Inside :meth:`StopSignals.writing` the exception
is held back until the write is over.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType


class StopRequested(Exception):
    """Raised in the main thread when SIGINT or SIGTERM arrives outside a write."""


class StopSignals:
    """Install the handlers for the duration of a ``with`` block (main thread only)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = threading.Event()
        self._writing = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame: FrameType | None) -> None:
        self.requested.set()
        if not self._writing:
            raise StopRequested(signal.Signals(number).name)

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """A block that a signal does not interrupt; a stop asked meanwhile comes after it."""
        self._writing += 1
        try:
            yield
        finally:
            self._writing -= 1
        if self.requested.is_set() and not self._writing:
            raise StopRequested("stop requested during a write")
