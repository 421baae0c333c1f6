"""Many ranks against one process, and how many checkpoints per second rank 0 can store.

1. The same checkpoints analysed by ``torchrun --nproc-per-node RANKS`` with one thread per
   rank, and by one process with RANKS threads (wall time of the whole command, alternating,
   ``--repeats`` times; the median and the ratio).
2. The sink's capacity: synthetic rows of one split at each ``--images`` size stored through
   :class:`store.results.ResultsSink` one checkpoint at a time, as rank 0 does with what the
   ranks send (``--rows`` checkpoints into a file of as many epochs); then the same rows sent
   by a second process over gloo (:func:`analyzer.distributed.send_results`) and received and
   stored by rank 0 (:func:`analyzer.distributed.receive_results`, then the sink): what one
   writer can take from the ranks that feed it.

    python bench/distributed.py [--epochs 100] [--ranks 2] [--repeats 3]
                                [--images 16291,1000000] [--rows 50] [--dir /tmp] [--sink-only]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from store.results import CheckpointResults, EpochResult, ResultsSink, SplitImages  # noqa: E402

BIN = Path(sys.executable).parent
CLASSES = 13


def timed(command: list[str], threads: int) -> float:
    """Wall seconds of a command that must succeed, with ``threads`` OpenMP threads."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    began = time.perf_counter()
    subprocess.run(command, check=True, env=env, capture_output=True)
    return time.perf_counter() - began


def compare_ranks(folder: Path, epochs: int, ranks: int, repeats: int) -> None:
    """Part 1: ``ranks`` one-thread ranks against one process of ``ranks`` threads."""
    run = folder / "run"
    timed([str(BIN / "trainer"), "run", "--out", str(run), "--epochs", str(epochs), "-q"], 1)
    checkpoints = str(run / "checkpoints")
    times: dict[str, list[float]] = {"torchrun": [], "single": []}
    for repeat in range(repeats):
        times["torchrun"].append(timed(
            [str(BIN / "torchrun"), "--nproc-per-node", str(ranks), "--standalone", "--",
             str(BIN / "analyzer"), "reaction", "--ckpt-dir", checkpoints, "--out",
             str(folder / f"ranks{repeat}.h5"), "-q"], 1))
        times["single"].append(timed(
            [str(BIN / "analyzer"), "reaction", "--ckpt-dir", checkpoints, "--out",
             str(folder / f"single{repeat}.h5"), "-q"], ranks))
    images = 1797 * epochs
    for name, label in (("torchrun", f"{ranks} ranks x 1 thread  "),
                        ("single", f"1 process x {ranks} threads")):
        median = statistics.median(times[name])
        print(f"{label}: median {median:6.2f} s, {images / median:8.0f} images/s "
              f"(all: {', '.join(f'{t:.2f}' for t in times[name])})")
    ratio = statistics.median(times["single"]) / statistics.median(times["torchrun"])
    print(f"{ranks} ranks are {ratio:.2f}x the speed of one process "
          f"({epochs} checkpoints x 1,797 images, whole commands)")


def synthetic(epoch: int, images: int, rng: np.random.Generator) -> EpochResult:
    """A checkpoint's row of one split, with random values of the right types."""
    return EpochResult(
        epoch=epoch, image_reaction=rng.random(images, dtype=np.float32),
        prediction=rng.integers(0, CLASSES, images).astype(np.int16),
        class_reaction=rng.random(CLASSES), accuracy=rng.random(CLASSES),
        loss=rng.random(CLASSES), empty_maps=rng.integers(0, 9, CLASSES).astype(np.int32),
        model_reaction=0.5, seconds=1.0, checkpoint_file=f"epoch_{epoch:04d}.safetensors",
        checkpoint_sha256="0" * 64)


def synthetic_sink(path: Path, images: int, rows: int) -> ResultsSink:
    """A results file of one split of ``images`` images and ``rows`` epochs."""
    identity = SplitImages([str(i) for i in range(images)],
                           np.random.default_rng(1).integers(0, CLASSES, images))
    return ResultsSink(path, devices=["cpu"], class_names=[str(c) for c in range(CLASSES)],
                       images={"train": identity},
                       settings={"layer": "features", "score": "logit", "target": "label",
                                 "weighting": "gradcam", "backend": "torch"},
                       epochs=list(range(1, rows + 1)))


def sink_capacity(folder: Path, images: int, rows: int) -> None:
    """Part 2: checkpoints per second through the sink, then sent by a rank and stored."""
    rng = np.random.default_rng(0)
    path = folder / f"sink{images}.h5"
    results = [CheckpointResults(epoch, {"train": synthetic(epoch, images, rng)})
               for epoch in range(1, rows + 2)]
    began = time.perf_counter()
    sink = synthetic_sink(path, images, rows + 1)
    sink.store(results[0])  # the file and its rows are made with the first result
    created = time.perf_counter() - began
    began = time.perf_counter()
    for result in results[1:]:
        sink.store(result)
    stored = (time.perf_counter() - began) / rows
    sink.close()
    row_mb = images * 6 / 1e6
    print(f"{images:>9,} images: {1 / stored:7.1f} checkpoints/s through the sink "
          f"({stored * 1e3:7.2f} ms per checkpoint, {row_mb:.2f} MB of rows; file of {rows} "
          f"epochs created in {created:.2f} s, {path.stat().st_size / 1e6:.0f} MB)")
    path.unlink()
    import torch.multiprocessing

    port = 29500 + os.getpid() % 1000
    seconds = torch.multiprocessing.get_context("spawn").SimpleQueue()
    torch.multiprocessing.spawn(_transfer, args=(path, images, rows, port, seconds), nprocs=2)
    per_checkpoint = seconds.get()
    print(f"{images:>9,} images: {1 / per_checkpoint:7.1f} checkpoints/s sent by rank 1, "
          f"received and stored by rank 0 ({per_checkpoint * 1e3:7.2f} ms per checkpoint, "
          f"a message of {images * 16 / 1e6:.1f} MB)")
    path.unlink()


def _transfer(rank: int, path: Path, images: int, rows: int, port: int, out: object) -> None:
    """One of two processes: rank 1 sends ``rows`` synthetic checkpoints, rank 0 receives and
    stores them; rank 0 puts the seconds per checkpoint on ``out``."""
    from analyzer.distributed import Ranks, process_group, receive_results, send_results
    from analyzer.plan import PendingCheckpoint
    from store.checkpoint_files import CheckpointFile

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ranks = Ranks(rank, 2, rank)
    with process_group(ranks):
        if rank == 1:
            rng = np.random.default_rng(0)
            ready = [CheckpointResults(epoch, {"train": synthetic(epoch, images, rng)})
                     for epoch in range(1, rows + 1)]  # made while rank 0 creates its file
            for result in ready:
                send_results(result, ranks)
            return
        with synthetic_sink(path, images, rows) as sink:
            began = time.perf_counter()
            for epoch in range(1, rows + 1):
                pending = PendingCheckpoint(CheckpointFile(epoch, Path(f"epoch_{epoch:04d}.pt")),
                                            ("train",))
                sink.store(receive_results(pending, 1, {"train": images}, CLASSES, ranks))
            out.put((time.perf_counter() - began) / rows)  # type: ignore[attr-defined]


def main() -> None:
    """Run both parts and print their lines."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", default="16291,1000000")
    parser.add_argument("--rows", type=int, default=50)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--sink-only", action="store_true", help="Part 2 only.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        if not args.sink_only:
            compare_ranks(Path(folder), args.epochs, args.ranks, args.repeats)
        for images in (int(n) for n in args.images.split(",")):
            sink_capacity(Path(folder), images, args.rows)


if __name__ == "__main__":
    main()
