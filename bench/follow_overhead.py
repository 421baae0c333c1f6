"""What ``analyzer reaction --follow`` costs per checkpoint beyond the Reaction compute.

A trainer is played in the same process: each epoch it writes a real (tiny) checkpoint file
``checkpoints/epoch_NNNN.safetensors`` with :func:`store.checkpoints.save_checkpoint` and,
with a run file, commits the epoch with :func:`store.runfile.write_epoch`. The follower's
overhead for that checkpoint is then timed: one :meth:`CheckpointWatcher.poll_once` that
finds it, plus one :meth:`ResultsSink.store` of a synthetic :class:`CheckpointResults` of
realistic size (``--train-images`` + ``--test-images`` images, ``--classes`` classes).
Two cases, side by side in one run:

(a) a run file (``create_run_file``, ``--checkpoints`` planned epochs): the results go into
    the run file, whose epoch axis is the run's planned epochs, pre-allocated;
(b) a foreign trainer (no run file) and an ``--out`` results file opened with epochs=[1]:
    its axis grows geometrically, each growth a copy of the file.

Printed per case: the median over checkpoints n-5 … n+5 around n = 10, 100, 1000 (expected
flat) and the ratio 1000th/10th; for (b) also the amortised (mean) store, the worst single
store and every copy.

    python bench/follow_overhead.py [--checkpoints 1000] [--train-images 1300]
                                    [--test-images 360] [--classes 10] [--dir /tmp] [--keep]
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from analyzer.plan import CheckpointWatcher, EpochSelection
from store.checkpoints import checkpoint_name, save_checkpoint
from store.results import CheckpointResults, EpochResult, ResultsSink, SplitImages
from store.runfile import EpochRecord, create_run_file, read_run_progress, write_epoch
from store.spec import ReactionSpec

MARKS = (10, 100, 1000)
SETTINGS = {**ReactionSpec("features.5").attributes(), "backend": "torch"}


class GcClock:
    """Seconds spent in Python's cyclic garbage collector since the start (all generations).

    With torch imported a full (generation 2) collection takes up to ~0.2 s here, and it lands
    on whatever runs then; the worst single store is reported with its share of it."""

    def __init__(self) -> None:
        self.total = 0.0
        self._began = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.total += time.perf_counter() - self._began


GC = GcClock()


def split_images(sizes: dict[str, int], classes: int) -> dict[str, SplitImages]:
    return {split: SplitImages([f"class{i % classes:02d}/{split}_{i:05d}.png"
                                for i in range(count)], np.arange(count) % classes)
            for split, count in sizes.items()}


def results(epoch: int, images: dict[str, SplitImages], classes: int) -> CheckpointResults:
    """A synthetic checkpoint's results (built outside the timed part)."""
    rng = np.random.default_rng(epoch)
    splits = {}
    for split, identity in images.items():
        count = len(identity.ids)
        per_class = rng.random(classes)
        splits[split] = EpochResult(
            epoch, rng.random(count, dtype=np.float32),
            rng.integers(0, classes, count).astype(np.int16), per_class, per_class,
            per_class, np.zeros(classes, np.int32), float(per_class.mean()), 0.01,
            checkpoint_name(epoch), f"{epoch:064x}")
    return CheckpointResults(epoch, splits)


def epoch_record(epoch: int, classes: int) -> EpochRecord:
    return EpochRecord(epoch, 1.0 / epoch, 0.5, 2.0 / epoch, 0.25, np.full(classes, 0.1),
                       np.full(classes, 0.9), 1.5, 0.01, 1e9 + epoch, checkpoint_name(epoch),
                       f"{epoch:064x}")


class Follow:
    """One case: a checkpoint folder, maybe a run file, a watcher and a sink."""

    def __init__(self, folder: Path, images: dict[str, SplitImages], classes: int,
                 checkpoints: int, with_run_file: bool) -> None:
        self.folder, self.images, self.classes = folder, images, classes
        self.checkpoints = folder / "checkpoints"
        self.checkpoints.mkdir(parents=True)
        self.state = {"weight": torch.zeros(64), "bias": torch.zeros(classes)}
        class_names = [f"class{c:02d}" for c in range(classes)]
        if with_run_file:
            self.run_file: Path | None = folder / "run.h5"
            create_run_file(self.run_file, config={"epochs": checkpoints, "seed": 0},
                            model_json='{"name": "small"}', class_names=class_names,
                            split_ids={s: i.ids for s, i in images.items()},
                            split_labels={s: i.labels for s, i in images.items()},
                            data_description="synthetic", provenance={"command": "bench"})
            self.path = self.run_file
            planned = range(1, checkpoints + 1)  # as analyzer/reaction.py's _open_sink
            epochs: list[int] | range = planned
        else:
            self.run_file, self.path, planned, epochs = None, folder / "results.h5", (), [1]
        began = time.perf_counter()
        self.sink = ResultsSink(self.path, class_names=class_names, images=images,
                                settings=SETTINGS, devices=["cpu"], epochs=epochs,
                                planned=planned)
        self.open_seconds = time.perf_counter() - began
        self.watcher = CheckpointWatcher(self.checkpoints, (".safetensors",),
                                         EpochSelection(None), set(), self.run_file,
                                         idle=None, stop=threading.Event())
        self.poll: list[float] = []
        self.store: list[float] = []
        self.store_gc: list[float] = []  # of which Python's garbage collector
        self.progress: list[float] = []  # read_run_progress alone, after the poll
        self.commit: list[float] = []  # the trainer's write_epoch (not the follower's)
        self.copies: list[tuple[int, float, int]] = []  # (epoch, store seconds, new axis)
        self.missed = 0

    def restore(self, early: int, late: int, repeats: int = 21) -> tuple[float, float]:
        """Median times of storing epoch ``early``'s and ``late``'s results again (the same
        values), interleaved, so that both see the same machine state."""
        pair = results(early, self.images, self.classes), results(late, self.images,
                                                                  self.classes)
        times: tuple[list[float], list[float]] = ([], [])
        for _ in range(repeats):
            for result, spent in zip(pair, times, strict=True):
                began = time.perf_counter()
                self.sink.store(result)
                spent.append(time.perf_counter() - began)
        return statistics.median(times[0]), statistics.median(times[1])

    def recommit(self, early: int, late: int, repeats: int = 21) -> tuple[float, float]:
        """The same for the trainer's ``write_epoch`` (``late`` last: the run stays whole)."""
        assert self.run_file is not None
        times: tuple[list[float], list[float]] = ([], [])
        for _ in range(repeats):
            for epoch, spent in zip((early, late), times, strict=True):
                record = epoch_record(epoch, self.classes)
                began = time.perf_counter()
                write_epoch(self.run_file, record)
                spent.append(time.perf_counter() - began)
        return statistics.median(times[0]), statistics.median(times[1])

    def step(self, epoch: int) -> None:
        """The trainer writes epoch ``epoch``; the follower finds and stores it."""
        save_checkpoint(self.checkpoints / checkpoint_name(epoch), self.state,
                        {"epoch": str(epoch)})
        if self.run_file is not None:
            began = time.perf_counter()
            write_epoch(self.run_file, epoch_record(epoch, self.classes))
            self.commit.append(time.perf_counter() - began)
        result = results(epoch, self.images, self.classes)
        inode = self.path.stat().st_ino if self.path.exists() else None  # no file before
        axis = len(self.sink.axis)  # the first result
        began = time.perf_counter()
        fresh = self.watcher.poll_once()
        found, collected = time.perf_counter(), GC.total
        self.sink.store(result)
        stored = time.perf_counter()
        self.store_gc.append(GC.total - collected)
        self.poll.append(found - began)
        self.store.append(stored - found)
        self.missed += [c.epoch for c in fresh] != [epoch]
        if self.run_file is not None:
            began = time.perf_counter()
            read_run_progress(self.run_file)
            self.progress.append(time.perf_counter() - began)
        if self.path.stat().st_ino != inode:
            self.copies.append((epoch, stored - found, len(self.sink.axis)))
        elif len(self.sink.axis) != axis:
            self.copies.append((epoch, stored - found, -len(self.sink.axis)))


def storage(path: Path) -> tuple[int, int]:
    """The file's size and the bytes its datasets hold (the rest: metadata and free space)."""
    held = []
    with h5py.File(path, "r", locking=False) as handle:
        handle.visititems(lambda _, item: held.append(item.id.get_storage_size())
                          if isinstance(item, h5py.Dataset) else None)
    return path.stat().st_size, sum(held)


def window(times: list[float], at: int, half: int = 5) -> float:
    """Median of the times of checkpoints at-half … at+half (1-based, clipped to the run)."""
    low, high = max(1, at - half), min(len(times), at + half)
    return statistics.median(times[low - 1:high])


def ms(value: float) -> str:
    return f"{value * 1e3:.3f}"


def table(title: str, columns: dict[str, list[float]]) -> None:
    count = len(next(iter(columns.values())))
    marks = [m for m in MARKS if m <= count]
    print(f"\n{title}: median of checkpoints n-5 … n+5, ms")
    print(f"{'n':>6} " + " ".join(f"{name:>18}" for name in columns))
    for mark in marks:
        print(f"{mark:>6} " + " ".join(f"{ms(window(times, mark)):>18}"
                                      for times in columns.values()))
    if len(marks) > 1:
        print(f"{f'{marks[-1]}/{marks[0]}':>6} " + " ".join(
            f"{window(times, marks[-1]) / window(times, marks[0]):>18.2f}"
            for times in columns.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=1000,
                        help="checkpoints of the run (the run file's planned epochs)")
    parser.add_argument("--train-images", type=int, default=1300)
    parser.add_argument("--test-images", type=int, default=360)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where to make the scratch folder (removed at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="reaction-follow-", dir=args.dir))
    images = split_images({"train": args.train_images, "test": args.test_images}, args.classes)
    print(f"{args.checkpoints} checkpoints; {args.train_images} train + {args.test_images} "
          f"test images, {args.classes} classes; scratch {folder}")
    try:
        run_file = Follow(folder / "a", images, args.classes, args.checkpoints, True)
        out_file = Follow(folder / "b", images, args.classes, args.checkpoints, False)
        print(f"sink opened: (a) run file, {len(run_file.sink.axis)} epochs pre-allocated, "
              f"{run_file.open_seconds:.3f} s; (b) --out file, axis [1], "
              f"{out_file.open_seconds:.3f} s", flush=True)
        for epoch in range(1, args.checkpoints + 1):
            run_file.step(epoch)  # interleaved: both cases see the same machine state
            out_file.step(epoch)
            if epoch % max(1, args.checkpoints // 10) == 0:
                print(f"  checkpoint {epoch}: (a) {sum(run_file.poll) + sum(run_file.store):.1f}"
                      f" s, (b) {sum(out_file.poll) + sum(out_file.store):.1f} s", flush=True)
        marks = [m for m in MARKS if m <= args.checkpoints]
        rewrites = {name: case.restore(marks[0], marks[-1])
                    for name, case in (("(a)", run_file), ("(b)", out_file))}
        recommits = run_file.recommit(marks[0], marks[-1])
        trim = time.perf_counter()
        axis_before = len(out_file.sink.axis)
        out_file.sink.trim(list(range(1, args.checkpoints + 1)))
        marks = [m for m in MARKS if m <= args.checkpoints]
        rewrites = {name: case.restore(marks[0], marks[-1])
                    for name, case in (("(a)", run_file), ("(b)", out_file))}
        recommits = run_file.recommit(marks[0], marks[-1])
        trim = time.perf_counter() - trim
        report(run_file, out_file, trim, axis_before)
        if len(marks) < 2:
            return
        for name, (early, late) in rewrites.items():
            print(f"{name} the same store again, interleaved, after the run: checkpoint "
                  f"{marks[0]}'s rows {ms(early)} ms, checkpoint {marks[-1]}'s {ms(late)} ms "
                  f"(ratio {late / early:.2f})")
        print(f"(a) the trainer's write_epoch again, interleaved: epoch {marks[0]} "
              f"{ms(recommits[0])} ms, epoch {marks[-1]} {ms(recommits[1])} ms "
              f"(ratio {recommits[1] / recommits[0]:.2f})")
    finally:
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


def report(run_file: Follow, out_file: Follow, trim: float, axis_before: int) -> None:
    total_a = [p + s for p, s in zip(run_file.poll, run_file.store, strict=True)]
    total_b = [p + s for p, s in zip(out_file.poll, out_file.store, strict=True)]
    table("(a) run file", {"poll_once": run_file.poll, "read_run_progress*": run_file.progress,
                           "sink.store": run_file.store, "follower total": total_a,
                           "trainer write_epoch": run_file.commit})
    print("  * the poll's read of the run file, timed on its own right after the poll")
    table("(b) --out file, growing axis", {"poll_once": out_file.poll,
                                           "sink.store": out_file.store,
                                           "follower total": total_b})
    count = len(total_b)
    worst = int(np.argmax(out_file.store))
    copies = out_file.copies
    mean, median = statistics.fmean(out_file.store), statistics.median(out_file.store)
    print(f"\n(b) sink.store over all {count} checkpoints: amortised (mean) "
          f"{ms(mean)} ms, median {ms(median)} ms; worst single store "
          f"{ms(out_file.store[worst])} ms (checkpoint {worst + 1}, of which "
          f"{ms(out_file.store_gc[worst])} ms Python's garbage collector)")
    net = [s - g for s, g in zip(out_file.store, out_file.store_gc, strict=True)]
    print(f"(b) worst single store without the garbage collector: {ms(max(net))} ms "
          f"(checkpoint {int(np.argmax(net)) + 1})")
    print(f"(b) {len(copies)} copies of the file, "
          f"{ms(sum(c[1] for c in copies))} ms in all:")
    for epoch, seconds, axis in copies:
        print(f"      checkpoint {epoch:>5}: {ms(seconds):>9} ms, axis now {abs(axis)} epochs"
              + ("" if axis > 0 else " (grown without a new inode?)"))
    print(f"(b) trim at the end (axis {axis_before} → {len(out_file.sink.axis)} epochs): "
          f"{ms(trim)} ms")
    worst_a = int(np.argmax(run_file.store))
    print(f"(a) sink.store: mean {ms(statistics.fmean(run_file.store))} ms, max "
          f"{ms(run_file.store[worst_a])} ms (of which {ms(run_file.store_gc[worst_a])} ms "
          f"the garbage collector); copies of the file: {len(run_file.copies)}")
    for name, case in (("(a)", run_file), ("(b)", out_file)):
        print(f"{name} follower total over the run: {sum(case.poll) + sum(case.store):.2f} s "
              f"(polls {sum(case.poll):.2f} s, stores {sum(case.store):.2f} s); polls that did "
              f"not find exactly the new checkpoint: {case.missed}")
    print(f"Python's garbage collector, whole process: {GC.total:.2f} s")
    for name, case in (("(a)", run_file), ("(b)", out_file)):
        size, held = storage(case.path)
        print(f"{name} {case.path.name}: {size / 1e6:.2f} MB on disk, its datasets hold "
              f"{held / 1e6:.2f} MB (file / datasets {size / held:.2f})")


if __name__ == "__main__":
    main()
