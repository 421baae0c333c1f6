"""The Reaction results store at scale: pre-allocation, per-epoch writes, file size, reads.

Synthetic rows (no model): ``--images`` images × ``--epochs`` epochs for each of ``--splits``
splits, written through :class:`store.results.ResultsSink` as ``analyzer reaction`` does,
one checkpoint at a time, side by side with a baseline that writes the same bytes in the same
layout (one contiguous [epoch, ...] region per variable) to a raw file with ``os.pwrite``, kept
open, fsync at the end. Then the file size against the arrays' raw bytes, and the reads a
user makes: one class's curve over all epochs, one epoch's row, one image's curve over all
epochs (a strided read), each warm (page cache) and after ``posix_fadvise(DONTNEED)``.

    python bench/results_store.py [--images 100000] [--epochs 1000] [--splits 1]
                                  [--classes 13] [--dir /tmp] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np

from store.h5io import open_for_reading, update_in_place
from store.results import (
    CheckpointResults,
    EpochResult,
    ResultsSink,
    SplitImages,
    read_split_results,
)
from store.spec import ReactionSpec

SPLIT_NAMES = ("train", "test", "val")
# the row variables in the order the sink writes them, dtype and per-epoch shape kind
ROW_LAYOUT = (("image_reaction", "f4", "image"), ("prediction", "i2", "image"),
              ("class_reaction", "f8", "class"), ("accuracy", "f8", "class"),
              ("loss", "f8", "class"), ("empty_maps", "i4", "class"),
              ("model_reaction", "f8", None), ("seconds", "f8", None),
              ("checkpoint_file", "S256", None), ("checkpoint_sha256", "S64", None),
              ("computed", "u1", None))
FILLS = {"f4": np.nan, "f8": np.nan, "i2": -1, "i4": -1, "S256": b"", "S64": b"", "u1": 0}


def split_names(count: int) -> list[str]:
    return [SPLIT_NAMES[k] if k < len(SPLIT_NAMES) else f"split{k}" for k in range(count)]


def row_bytes(images: int, classes: int) -> int:
    """Bytes of one epoch's row of one split, all variables."""
    total = 0
    for _, dtype, kind in ROW_LAYOUT:
        count = images if kind == "image" else classes if kind == "class" else 1
        total += np.dtype(dtype).itemsize * count
    return total


class Rows:
    """Synthetic, epoch-dependent rows; built outside the timed parts."""

    def __init__(self, images: int, classes: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.reaction = rng.random(images, dtype=np.float32)
        self.prediction = rng.integers(0, classes, images).astype(np.int16)
        self.classes = classes

    def result(self, epoch: int) -> EpochResult:
        scale = np.float32(1 + epoch * 1e-3)
        class_values = np.linspace(0, 1, self.classes) * scale
        return EpochResult(epoch, self.reaction * scale, np.roll(self.prediction, epoch),
                           class_values, class_values, class_values,
                           np.full(self.classes, epoch % 7, np.int32), float(scale), 0.5,
                           f"epoch_{epoch:04d}.safetensors", f"{epoch:064x}")


class RawStore:
    """The baseline: the sink's variables as contiguous [epoch, ...] regions of one raw file."""

    def __init__(self, path: Path, splits: list[str], epochs: int, images: int,
                 classes: int) -> None:
        self.path, self.epochs = path, epochs
        self.regions: dict[tuple[str, str], tuple[int, np.dtype, tuple[int, ...]]] = {}
        offset = 0
        for split in splits:
            for name, dtype, kind in ROW_LAYOUT:
                shape = (images,) if kind == "image" else (classes,) if kind == "class" else ()
                self.regions[split, name] = (offset, np.dtype(dtype), shape)
                offset += epochs * np.dtype(dtype).itemsize * int(np.prod(shape))
        self.size = offset
        self.fd = -1

    def create(self) -> None:
        """Write every region's fill value (what HDF5's pre-allocation does), fsync."""
        with open(self.path, "wb") as handle:
            for offset, dtype, shape in self.regions.values():
                handle.seek(offset)
                fill = FILLS[dtype.str.lstrip("<|>")] if dtype.kind != "S" else b""
                handle.write(np.full((self.epochs, *shape), fill, dtype=dtype).data)
            handle.flush()
            os.fsync(handle.fileno())
        self.fd = os.open(self.path, os.O_RDWR)

    def store(self, row: int, results: dict[str, EpochResult]) -> None:
        for split, result in results.items():
            for name, _, _ in ROW_LAYOUT:
                if name != "computed":
                    self._write(split, name, row, getattr(result, name))
        for split in results:
            self._write(split, "computed", row, 1)

    def _write(self, split: str, name: str, row: int, value) -> None:
        offset, dtype, _ = self.regions[split, name]
        if isinstance(value, str):
            value = value.encode()
        data = np.asarray(value, dtype=dtype).tobytes()
        os.pwrite(self.fd, data, offset + row * len(data))

    def sync_and_close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)

    def read(self, split: str, name: str, row: int | None = None) -> np.ndarray:
        """One row (``os.pread``), or the whole [epoch, ...] region."""
        offset, dtype, shape = self.regions[split, name]
        size = dtype.itemsize * int(np.prod(shape))
        with open(self.path, "rb") as handle:
            if row is None:
                data = os.pread(handle.fileno(), size * self.epochs, offset)
                return np.frombuffer(data, dtype).reshape(self.epochs, *shape)
            return np.frombuffer(os.pread(handle.fileno(), size, offset + row * size), dtype)

    def array(self, split: str, name: str) -> np.memmap:
        offset, dtype, shape = self.regions[split, name]
        return np.memmap(self.path, dtype=dtype, mode="r", offset=offset,
                         shape=(self.epochs, *shape))


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def drop_cache(path: Path) -> None:
    """Ask the kernel to forget the file's (clean, fsynced) pages."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def seconds(action: Callable[[], object]) -> float:
    began = time.perf_counter()
    action()
    return time.perf_counter() - began


def warm_and_cold(action: Callable[[int], object], path: Path, repeats: int = 5
                  ) -> tuple[float, float]:
    """Median time of ``action(0)`` read again ``repeats`` times after a first read (warm: the
    page cache holds it), and median time of ``action(k)``, k = 1, 2, 3, each right after the
    kernel was asked to drop the file's pages (cold, as far as DONTNEED goes)."""
    action(0)
    warm = statistics.median(seconds(lambda: action(0)) for _ in range(repeats))
    cold = []
    for k in range(1, 4):
        drop_cache(path)
        cold.append(seconds(lambda k=k: action(k)))
    return warm, statistics.median(cold)


def window_median(times: list[float], at: int, half: int = 5) -> float:
    """Median of the times of writes at-half … at+half (1-based, clipped to the run)."""
    low, high = max(1, at - half), min(len(times), at + half)
    return statistics.median(times[low - 1:high])


def ms(value: float) -> str:
    return f"{value * 1e3:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--epochs", type=int, default=1000)
    parser.add_argument("--splits", type=int, default=1)
    parser.add_argument("--classes", type=int, default=13)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where to make the scratch folder (removed at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args()
    images, epochs, classes = args.images, args.epochs, args.classes
    names = split_names(args.splits)
    per_epoch = row_bytes(images, classes) * len(names)
    data_bytes = per_epoch * epochs
    expected = 2 * data_bytes  # the HDF5 file and the raw file
    args.dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.dir).free
    if free < 2 * expected:
        sys.exit(f"refusing: {args.dir} has {free / 1e9:.2f} GB free, this run writes about "
                 f"{expected / 1e9:.2f} GB and needs twice that (use --dir, fewer --images or "
                 "--epochs)")
    folder = Path(tempfile.mkdtemp(prefix="reaction-bench-", dir=args.dir))
    print(f"{len(names)} split(s) × {images:,} images × {epochs:,} epochs, {classes} classes; "
          f"row data {per_epoch / 1e6:.3f} MB per epoch, {data_bytes / 1e9:.3f} GB in all; "
          f"scratch {folder} ({free / 1e9:.0f} GB free); h5py {h5py.__version__}, "
          f"HDF5 {h5py.version.hdf5_version}")
    try:
        run(folder, names, images, epochs, classes, per_epoch, data_bytes)
    finally:
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


def run(folder: Path, names: list[str], images: int, epochs: int, classes: int,
        per_epoch: int, data_bytes: int) -> None:
    path, raw_path = folder / "results.h5", folder / "raw.bin"
    identities = {split: SplitImages([f"class{i % classes:02d}/{i:06d}.png"
                                      for i in range(images)],
                                     np.arange(images) % classes) for split in names}
    settings = {**ReactionSpec("features.5").attributes(), "backend": "torch"}
    rows = Rows(images, classes)
    print("creating the files (pre-allocation) ...", flush=True)

    def create_sink() -> ResultsSink:
        return ResultsSink(path, class_names=[f"class{c:02d}" for c in range(classes)],
                           images=identities, settings=settings, devices=["cpu"],
                           epochs=range(1, epochs + 1))

    first = CheckpointResults(1, {split: rows.result(1) for split in names})
    began = time.perf_counter()
    sink = create_sink()
    sink.store(first)  # a sink writes nothing before its first result: then it pre-allocates
    fsync_file(path)
    create_h5 = time.perf_counter() - began
    raw = RawStore(raw_path, names, epochs, images, classes)
    create_raw = seconds(raw.create)
    raw.store(0, first.splits)
    print(f"  HDF5 {create_h5:.2f} s, raw {create_raw:.2f} s", flush=True)

    open_close = statistics.median(seconds(_open_close(path)) for _ in range(21))

    print(f"writing {epochs} epochs through ResultsSink.store and raw pwrite ...", flush=True)
    sink_times, raw_times = [], []
    for epoch in range(2, epochs + 1):
        result = CheckpointResults(epoch, {split: rows.result(epoch) for split in names})
        sink_times.append(seconds(lambda r=result: sink.store(r)))
        raw_times.append(seconds(lambda r=result, e=epoch: raw.store(e - 1, r.splits)))
        if epoch % max(1, epochs // 10) == 0:
            print(f"  epoch {epoch}: {sum(sink_times):.1f} s HDF5, {sum(raw_times):.1f} s raw",
                  flush=True)
    sync_h5 = seconds(lambda: fsync_file(path))
    sync_raw = seconds(raw.sync_and_close)
    write_h5, write_raw = sum(sink_times) + sync_h5, sum(raw_times) + sync_raw

    stat, raw_stat = path.stat(), raw_path.stat()
    coordinates = sum(len(i.encode()) + 8 for i in identities[names[0]].ids) * len(names)
    raw_arrays = data_bytes + coordinates + 4 * epochs * len(names)

    print("reading ...", flush=True)
    split = names[0]
    hdf5_reads = {
        "one class's curve, class_reaction[:, c]": lambda k: _h5(
            path, split, "class_reaction", (slice(None), k % classes)),
        "one class's curve via read_split_results": lambda k: read_split_results(
            path, split)["class_reaction"][:, k % classes],
        "one epoch's row, image_reaction[e]": lambda k: _h5(
            path, split, "image_reaction", (epochs - 1 - 97 * k) % epochs),
        "one image's curve, image_reaction[:, i]": lambda k: _h5(
            path, split, "image_reaction", (slice(None), (7919 * k) % images)),
    }
    raw_reads = {
        "one class's curve, class_reaction[:, c]": lambda k: raw.read(
            split, "class_reaction")[:, k % classes].copy(),
        "one class's curve via read_split_results": None,
        "one epoch's row, image_reaction[e]": lambda k: raw.read(
            split, "image_reaction", (epochs - 1 - 97 * k) % epochs),
        "one image's curve, image_reaction[:, i]": lambda k: np.array(
            raw.array(split, "image_reaction")[:, (7919 * k) % images]),
    }
    timings = {}
    for what, action in hdf5_reads.items():
        timings[what] = (warm_and_cold(action, path),
                         None if raw_reads[what] is None
                         else warm_and_cold(raw_reads[what], raw_path))
    same = np.array_equal(_h5(path, split, "image_reaction", (slice(None), 12345 % images)),
                          raw.array(split, "image_reaction")[:, 12345 % images],
                          equal_nan=True) and \
        np.array_equal(_h5(path, split, "class_reaction", ()),
                       raw.array(split, "class_reaction"))
    sink.close()
    reopen = seconds(lambda: create_sink().close())  # a rerun: checks, nothing to write

    print()
    print(f"{'':<44} {'HDF5 (sink)':>12} {'raw':>10} {'HDF5 / raw':>11}")
    line("create, pre-allocated, fsync (s)", f"{create_h5:.2f}", f"{create_raw:.2f}",
         f"{create_h5 / create_raw:.2f}")
    line("write every epoch + fsync at the end (s)", f"{write_h5:.2f}", f"{write_raw:.2f}",
         f"{write_h5 / write_raw:.2f}")
    line("  epochs/s", f"{epochs / write_h5:.1f}", f"{epochs / write_raw:.1f}",
         f"{write_raw / write_h5:.3f}")
    line("  MB/s of row data", f"{data_bytes / write_h5 / 1e6:.1f}",
         f"{data_bytes / write_raw / 1e6:.1f}", f"{write_raw / write_h5:.3f}")
    line("  of which the final fsync (s)", f"{sync_h5:.2f}", f"{sync_raw:.2f}", "")
    for at in (10, 100, 1000, 10_000):
        if at <= epochs:
            line(f"  write #{at} (ms)", ms(sink_times[at - 1]), ms(raw_times[at - 1]),
                 f"{sink_times[at - 1] / raw_times[at - 1]:.1f}")
            line(f"  median of writes #{at}±5 (ms)", ms(window_median(sink_times, at)),
                 ms(window_median(raw_times, at)),
                 f"{window_median(sink_times, at) / window_median(raw_times, at):.1f}")
    for label, q in (("median", 0.5), ("p99", 0.99), ("max", 1.0)):
        line(f"  all writes, {label} (ms)", ms(float(np.quantile(sink_times, q))),
             ms(float(np.quantile(raw_times, q))), "")
    line("  a store's open + lock + close alone (ms)", ms(open_close), "", "")
    line("file size (MB)", f"{stat.st_size / 1e6:.1f}", f"{raw_stat.st_size / 1e6:.1f}",
         f"{stat.st_size / raw_stat.st_size:.4f}")
    line("  allocated on disk, st_blocks (MB)", f"{stat.st_blocks * 512 / 1e6:.1f}",
         f"{raw_stat.st_blocks * 512 / 1e6:.1f}", "")
    line(f"  / the arrays' bytes ({raw_arrays / 1e6:.1f} MB)", f"{stat.st_size / raw_arrays:.4f}",
         "", "")
    line("reopen: ResultsSink on the full file (s)", f"{reopen:.3f}", "", "")
    print()
    print(f"{'read, open included (ms)':<44} {'HDF5 warm':>10} {'cold':>9} {'raw warm':>10} "
          f"{'cold':>9} {'HDF5/raw warm':>14} {'cold':>6}")
    for what, (h5_times, raw_of) in timings.items():
        raw_cells = ["n/a", "n/a", "", ""] if raw_of is None else [
            ms(raw_of[0]), ms(raw_of[1]), f"{h5_times[0] / raw_of[0]:.1f}",
            f"{h5_times[1] / raw_of[1]:.1f}"]
        print(f"{what:<44} {ms(h5_times[0]):>10} {ms(h5_times[1]):>9} {raw_cells[0]:>10} "
              f"{raw_cells[1]:>9} {raw_cells[2]:>14} {raw_cells[3]:>6}")
    print(f"\nHDF5 and raw hold the same values: {'yes' if same else 'NO'}")


def line(label: str, hdf5: str, raw: str, ratio: str) -> None:
    print(f"{label:<44} {hdf5:>12} {raw:>10} {ratio:>11}")


def _open_close(path: Path) -> Callable[[], None]:
    def action() -> None:
        with update_in_place(path):
            pass
    return action


def _h5(path: Path, split: str, name: str, index) -> np.ndarray:
    with open_for_reading(path) as handle:
        return handle[f"reaction/{split}/{name}"][index]


if __name__ == "__main__":
    main()
