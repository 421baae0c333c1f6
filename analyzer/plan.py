"""The engine's plan: which checkpoints, and which of their splits, still lack results.

:func:`plan_pending` works on what is on disk now. :class:`CheckpointWatcher` extends it in
time for ``--follow``: it yields each new checkpoint once it is complete, without re-reading
the ones it has seen.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from store.checkpoint_files import CheckpointFile, checkpoint_epoch, sha256_file
from store.errors import InputError
from store.runfile import read_run_progress


@dataclass(frozen=True)
class PendingCheckpoint:
    """A checkpoint and the splits whose results it still lacks."""

    checkpoint: CheckpointFile
    splits: tuple[str, ...]


class EpochSelection:
    """``--epochs``: ``"1:1000:10"`` (start:stop:step, stop included), ``"5"``, ``"1,10,100"``;
    None selects every epoch."""

    def __init__(self, text: str | None) -> None:
        self.text = text
        self.singles: set[int] = set()
        self.ranges: list[tuple[int, int, int]] = []
        for part in (text or "").split(",") if text else []:
            numbers = part.strip().split(":")
            try:
                values = [int(n) for n in numbers]
            except ValueError:
                raise InputError(f"--epochs: {part!r} is not N, START:STOP or START:STOP:STEP") \
                    from None
            if len(values) == 1:
                self.singles.add(values[0])
            elif len(values) in (2, 3) and (len(values) == 2 or values[2] > 0):
                self.ranges.append((values[0], values[1], values[2] if len(values) == 3 else 1))
            else:
                raise InputError(f"--epochs: {part!r} is not N, START:STOP or START:STOP:STEP")

    def __contains__(self, epoch: int) -> bool:
        if self.text is None:
            return True
        return epoch in self.singles or any(
            start <= epoch <= stop and (epoch - start) % step == 0
            for start, stop, step in self.ranges)

    def choose(self, available: Sequence[int]) -> list[int]:
        """The selected epochs among ``available``; a single epoch without a checkpoint, or a
        selection that keeps none, is an error."""
        have = set(available)
        absent = sorted(self.singles - have)
        if absent:
            raise InputError(f"no checkpoint for epoch {absent[0]}")
        chosen = sorted(epoch for epoch in have if epoch in self)
        if not chosen:
            raise InputError(f"--epochs {self.text} selects none of the {len(have)} checkpoints "
                             f"(epochs {min(have, default=0)}–{max(have, default=0)})")
        return chosen


def parse_epochs(text: str, available: list[int]) -> list[int]:
    """The epochs of ``available`` that ``--epochs TEXT`` selects (see :class:`EpochSelection`)."""
    return EpochSelection(text).choose(available)


def plan_pending(checkpoints: Sequence[CheckpointFile], splits: Sequence[str],
                 done: dict[str, dict[int, str]], results_path: Path) -> list[PendingCheckpoint]:
    """Each checkpoint with the splits whose results it still lacks.

    A checkpoint whose results are stored is hashed again: if the file changed since (another
    training run written over the folder), its stored results are stale and the pass stops.

    Args:
        checkpoints: the checkpoints to analyse.
        splits: the splits to analyse.
        done: split → {epoch: SHA-256 of the checkpoint its results came from}.
        results_path: the results file (for the error message).
    """
    pending = []
    for checkpoint in checkpoints:
        stored = {done[split][checkpoint.epoch] for split in splits
                  if checkpoint.epoch in done[split]}
        if stored and stored != {sha256_file(checkpoint.path)}:
            raise InputError(f"{checkpoint.path} changed since its results were stored in "
                             f"{results_path} (another SHA-256): write the results of the new "
                             "checkpoints to another file with --out")
        todo = tuple(split for split in splits if checkpoint.epoch not in done[split])
        if todo:
            pending.append(PendingCheckpoint(checkpoint, todo))
    return pending


@dataclass
class FollowState:
    """What a follower knows of the run it follows (for its progress bar and its end)."""

    trained: int = 0  # the newest complete checkpoint's epoch
    planned: int | None = None  # the run's epochs, when a run file says
    finished: bool = False  # the run file says training has finished
    last_new: float = 0.0  # time.monotonic() of the newest checkpoint seen


class CheckpointWatcher:
    """Yields the checkpoints of a folder that is still being filled, each once complete.

    A checkpoint is complete when its file is in the folder (checkpoints are written to a
    temporary name and renamed) and, with a run file, its epoch is committed there. Each poll
    lists the folder only if its modification time changed, and reads two values of the run
    file; nothing already seen is read again.

    Args:
        folder: the checkpoint folder.
        suffixes: the checkpoint files to take (one kind).
        selection: ``--epochs``.
        seen: epochs already planned or analysed (never yielded).
        run_file: the run file, or None for a foreign trainer.
        idle: stop after this many seconds without a new checkpoint (None: never).
        stop: set to stop waiting.
        poll: seconds between polls.
    """

    def __init__(self, folder: Path, suffixes: tuple[str, ...], selection: EpochSelection,
                 seen: set[int], run_file: Path | None, idle: float | None,
                 stop: threading.Event, poll: float = 0.5) -> None:
        self.folder = Path(folder)
        self.suffixes = suffixes
        self.selection = selection
        self.seen = set(seen)
        self.run_file = run_file
        self.idle = idle
        self.stop = stop
        self.poll = poll
        self.state = FollowState(last_new=time.monotonic())
        self._listed_mtime: int | None = None
        self._waiting: dict[int, Path] = {}  # in the folder, not committed yet
        self._passed_over: set[str] = set()  # names seen and not to be taken
        self.on_poll: Callable[[FollowState], None] | None = None

    def __iter__(self) -> Iterator[CheckpointFile]:
        while not self.stop.is_set():
            fresh = self.poll_once()
            if fresh:
                self.state.last_new = time.monotonic()
                yield from fresh
                continue
            if self.on_poll is not None:
                self.on_poll(self.state)
            if self.state.finished and not self._waiting:
                return
            if self.idle is not None and time.monotonic() - self.state.last_new > self.idle:
                return
            self.stop.wait(self.poll)

    def poll_once(self) -> list[CheckpointFile]:
        """The checkpoints that became complete since the last poll (none is yielded twice)."""
        committed = None
        if self.run_file is not None:
            progress = read_run_progress(self.run_file)
            committed = progress.completed_epochs
            self.state.planned, self.state.finished = progress.epochs, progress.finished
        self._list_folder()
        ready = sorted(epoch for epoch in self._waiting
                       if committed is None or epoch <= committed)
        self.state.trained = max([self.state.trained, *ready, *(
            [committed] if committed is not None else [])])
        fresh = [CheckpointFile(epoch, self._waiting.pop(epoch)) for epoch in ready]
        self.seen.update(ready)
        return fresh

    def _list_folder(self) -> None:
        try:
            mtime = os.stat(self.folder).st_mtime_ns
        except FileNotFoundError:
            return
        if mtime == self._listed_mtime:
            return
        # A change within the file system's timestamp granularity may keep the same mtime:
        # trust an unchanged mtime only once it is a second old.
        self._listed_mtime = mtime if time.time_ns() - mtime > 1_000_000_000 else None
        with os.scandir(self.folder) as entries:
            for entry in entries:
                if entry.name in self._passed_over:
                    continue
                suffix = os.path.splitext(entry.name)[1].lower()
                epoch = checkpoint_epoch(entry.name)
                if entry.name.startswith(".") or suffix not in self.suffixes or epoch is None \
                        or epoch in self.seen or epoch not in self.selection:
                    if not entry.name.startswith("."):  # temporaries come and go
                        self._passed_over.add(entry.name)
                    continue
                self._waiting[epoch] = Path(entry.path)
