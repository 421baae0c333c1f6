"""Following a run: the report page or the figures, re-rendered while a run is trained and
analysed (``analyzer report --follow``, ``analyzer plot --follow``).

The loop renders once at the start, then polls the run files cheaply: first their size,
modification time and inode, and when those change (or ``every`` seconds have passed) a few
small datasets (``/training/completed_epochs``, the provenance attribute ``finished``, the
``computed`` flags of every ``/reaction/<split>``). It re-renders after a change, at most
every ``every`` seconds, and ends with a final render when every run is finished and analysed
(training finished, every Reaction split present computed for every completed epoch; a
results-only file: every row computed) or after ``idle`` seconds without a change; when
``stop`` is set (a signal) it ends without one. Each render replaces its files atomically, so
a reader never sees a half-written page or figure.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from analyzer.figures import PlotOptions, load_runs, write_figures
from analyzer.report import REPORT_FILE, Freshness, ReportOptions, write_report
from store.errors import InputError
from store.h5io import open_for_reading
from store.results import GROUP

logger = logging.getLogger(__name__)

DEFAULT_EVERY = 30.0
_LONGEST_POLL = 1.0  # seconds between two looks at the files, at most


@dataclass(frozen=True)
class RunState:
    """How far one run or results file is, as far as a follower cares.

    Attributes:
        planned: the run's planned epochs; None for a results-only file (no training).
        completed: ``/training/completed_epochs`` (0 for a results-only file).
        finished: the provenance attribute ``finished`` is set (True for a results-only file).
        analysed: per Reaction split, sorted by name: (split, computed rows, last computed
            epoch, 0 when none).
        analysed_all: every split holds results for every completed epoch (a results-only
            file: every row of every split is computed).
    """

    planned: int | None
    completed: int
    finished: bool
    analysed: tuple[tuple[str, int, int], ...]
    analysed_all: bool

    @property
    def done(self) -> bool:
        """Training has finished and every Reaction split present is complete."""
        return self.finished and self.analysed_all

    def describe(self) -> str:
        """E.g. ``trained to epoch 57 of 1000, Reaction to epoch 54 (train, test)``."""
        parts = [] if self.planned is None else \
            [f"trained to epoch {self.completed} of {self.planned}"]
        by_epoch: dict[int, list[str]] = {}
        for split, _, last in self.analysed:
            by_epoch.setdefault(last, []).append(split)
        if not self.analysed:
            parts.append("no Reaction results yet")
        for last, splits in sorted(by_epoch.items(), reverse=True):
            reached = f"to epoch {last}" if last else "no epoch yet"
            parts.append(f"Reaction {reached} ({', '.join(splits)})")
        return ", ".join(parts)


def read_state(path: Path) -> RunState:
    """Read a run (or results) file's :class:`RunState`: a few small datasets, whatever the
    length of the run."""
    with open_for_reading(Path(path)) as handle:
        try:
            training = handle.get("training")
            planned = None if training is None else int(training["epoch"].shape[0])
            completed = 0 if training is None else int(training["completed_epochs"][()])
            finished = training is None or \
                bool(handle["provenance"].attrs.get("finished", ""))
            wanted = np.arange(1, completed + 1)
            analysed, analysed_all = [], True
            for split, group in sorted(handle.get(GROUP, {}).items()):
                done = group["computed"][()].astype(bool)
                epochs = group["epoch"][()][done]
                analysed.append((split, int(done.sum()), int(epochs.max()) if done.any() else 0))
                complete = done.all() if training is None else bool(np.isin(wanted, epochs).all())
                analysed_all = analysed_all and bool(complete)
        except KeyError as error:
            raise InputError(f"{path} is incomplete or damaged: {error}") from None
    return RunState(planned, completed, finished, tuple(analysed), analysed_all)


def freshness(labels: Sequence[str], states: Sequence[RunState], every: float,
              final: str | None = None) -> Freshness:
    """The banner of a followed page: how current it is, and whether it reloads itself.

    ``final`` is None while live, else why following ended (``""`` when the runs are done).
    """
    runs = [state.describe() for state in states]
    if len(runs) > 1:
        runs = [f"{label}: {text}" for label, text in zip(labels, runs, strict=True)]
    rendered = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    if final is None:
        seconds = max(1, round(every))
        return Freshness(f"live: {'; '.join(runs)}, rendered {rendered}; reloads every "
                         f"{seconds} s", seconds)
    heading = f"final ({final})" if final else "final"
    return Freshness(f"{heading}: {'; '.join(runs)}, rendered {rendered}", None)


@dataclass(frozen=True)
class FollowSummary:
    """How a follow ended: ``renders`` done, and ``ended`` one of ``"finished"`` (every run
    finished and analysed), ``"idle"`` (no change for ``idle`` seconds) or ``"stopped"``."""

    renders: int
    ended: str


def follow(paths: Sequence[Path], labels: Sequence[str],
           render: Callable[[Freshness], object], *, every: float = DEFAULT_EVERY,
           idle: float | None = None, stop: threading.Event | None = None) -> FollowSummary:
    """Render now, then again after each change of the files ``paths``, until they are done.

    Args:
        paths: the run or results files to watch.
        labels: their names in the banner, in the same order.
        render: draws everything from the files as they are now, with the given banner.
        every: seconds between two renders, at least (> 0).
        idle: end after this many seconds without a change (None: only when done or stopped).
        stop: when set (e.g. by a signal handler), end after the render in progress, leaving
            the last page as it is.

    An error in the first render propagates; a later one (a file being replaced) is logged
    and the render is tried again after the next change.
    """
    if every <= 0:
        raise InputError(f"--every must be more than 0 seconds, not {every:g}")
    if idle is not None and idle <= 0:
        raise InputError(f"--idle must be more than 0 seconds, not {idle:g}")
    stop = stop or threading.Event()
    poll = min(every, _LONGEST_POLL)
    fingerprint = _fingerprint(paths)
    states = [read_state(path) for path in paths]
    done = all(state.done for state in states)
    render(freshness(labels, states, every, "" if done else None))
    if done:
        return FollowSummary(1, "finished")
    renders, rendered = 1, states
    last_render = last_change = last_read = time.monotonic()
    while True:
        if stop.wait(poll):
            return FollowSummary(renders, "stopped")
        now = time.monotonic()
        seen = _fingerprint(paths)
        # Also read every `every` seconds: a file system with coarse modification times can
        # hide a write made in the same tick as the one read last.
        if seen != fingerprint or now - last_read >= every:
            fingerprint, last_read = seen, now
            with contextlib.suppress(InputError):  # caught mid-replacement: look again later
                latest = [read_state(path) for path in paths]
                if latest != states:
                    states, last_change = latest, now
        done = all(state.done for state in states)
        stale = idle is not None and now - last_change >= idle
        if now - last_render < every or not (done or stale or states != rendered):
            continue  # the rate limit holds a render (the final one too) for a later poll
        if done or stale:  # errors of the final render propagate: the page stays live
            render(freshness(labels, states, every, "" if done else f"no change for {idle:g} s"))
            return FollowSummary(renders + 1, "finished" if done else "idle")
        try:
            render(freshness(labels, states, every))
        except InputError as error:
            logger.warning(f"render failed, trying again after the next change: {error}")
        else:
            renders += 1
        rendered, last_render = states, time.monotonic()


def _fingerprint(paths: Sequence[Path]) -> tuple[tuple[int, int, int] | None, ...]:
    """Size, modification time and inode of each file (None when it cannot be seen)."""
    marks = []
    for path in paths:
        try:
            status = os.stat(path)
        except OSError:
            marks.append(None)
            continue
        marks.append((status.st_size, status.st_mtime_ns, status.st_ino))
    return tuple(marks)


def follow_report(options: ReportOptions, *, every: float = DEFAULT_EVERY,
                  idle: float | None = None, stop: threading.Event | None = None) -> Path:
    """``analyzer report --follow``: keep ``<out>/index.html`` current (see :func:`follow`);
    return its path. While live the page reloads itself every ``every`` seconds."""
    labels = [run.label for run in load_runs(options.runs)]
    path = Path(options.out) / REPORT_FILE

    def render(status: Freshness) -> None:
        nonlocal path
        path = write_report(options, status)
        logger.info(f"rendered {path}: {status.text}")

    with _notes_once("analyzer.report", "analyzer.figures"):
        summary = follow(options.runs, labels, render, every=every, idle=idle, stop=stop)
    logger.info(f"follow ended ({summary.ended}) after {summary.renders} renders")
    return path


def follow_plot(options: PlotOptions, *, every: float = DEFAULT_EVERY,
                idle: float | None = None, stop: threading.Event | None = None) -> list[Path]:
    """``analyzer plot --follow``: keep the figures in ``options.out`` current (see
    :func:`follow`); return the files of the last render.

    A figure the latest render no longer draws (the scatter plot of an earlier epoch) is
    removed, when this follow wrote it.
    """
    labels = [run.label for run in load_runs(options.runs)]
    written: list[Path] = []
    ours: set[Path] = set()

    def render(status: Freshness) -> None:
        nonlocal written
        written = write_figures(options, required=False)
        for old in ours - set(written):
            old.unlink(missing_ok=True)
        ours.update(written)
        logger.info(f"rendered {len(written)} figures in {options.out}: {status.text}")

    with _notes_once("analyzer.figures"):
        summary = follow(options.runs, labels, render, every=every, idle=idle, stop=stop)
    logger.info(f"follow ended ({summary.ended}) after {summary.renders} renders")
    return written


class _Once(logging.Filter):
    """Lets each distinct warning through once (a note repeated by every render is noise)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


@contextlib.contextmanager
def _notes_once(*names: str) -> Iterator[None]:
    once = _Once()
    loggers = [logging.getLogger(name) for name in names]
    for each in loggers:
        each.addFilter(once)
    try:
        yield
    finally:
        for each in loggers:
            each.removeFilter(once)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """Yield an event that SIGINT (Ctrl-C) or SIGTERM sets, for :func:`follow`'s ``stop``.

    The first signal lets the render in progress finish; a second one interrupts it
    (:class:`KeyboardInterrupt`; the page being written is abandoned, the last one stays).
    The previous handlers come back afterwards. Call from the main thread.
    """
    stop = threading.Event()

    def handle(number: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = {number: signal.signal(number, handle)
                for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
