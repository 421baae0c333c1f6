"""The demo trained with a follower beside it, against training first and analysing after.

Runs, one after the other in this process's machine, with the real console scripts:

1. ``trainer run`` then ``analyzer reaction`` (train-then-analyse), each with every core;
2. ``trainer run`` and ``analyzer reaction --follow`` started together, each with
   ``--threads-each`` threads (default: half the cores), so the two share the machine.

It prints both wall times and their ratio, and checks that the follower's results equal a
post-hoc pass over the same checkpoints. (The two runs' weights differ: float reductions
depend on the thread count.)

    python bench/follow_demo.py [--epochs 1000] [--threads-each 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

BIN = Path(sys.executable).parent


def command(name: str, *args: str) -> list[str]:
    """Console script ``name`` of this installation."""
    return [str(BIN / name), *args]


def environment(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads)}


def sequential(folder: Path, epochs: int, threads: int) -> float:
    """Wall seconds of training, then analysing."""
    began = time.perf_counter()
    subprocess.run(command("trainer", "run", "--out", str(folder), "--epochs", str(epochs),
                           "-q"), env=environment(threads), check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(command("analyzer", "reaction", "--ckpt-dir", str(folder / "checkpoints"),
                           "-q"), env=environment(threads), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - began


def together(folder: Path, epochs: int, threads: int) -> tuple[float, float]:
    """Wall seconds until both have ended, and of the training alone."""
    began = time.perf_counter()
    follower = subprocess.Popen(
        command("analyzer", "reaction", "--ckpt-dir", str(folder / "checkpoints"),
                "--follow", "-q"), env=environment(threads), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    subprocess.run(command("trainer", "run", "--out", str(folder), "--epochs", str(epochs),
                           "-q"), env=environment(threads), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trained = time.perf_counter() - began
    if follower.wait() != 0:
        raise SystemExit("the follower failed")
    return time.perf_counter() - began, trained


def same_as_post_hoc(folder: Path, threads: int) -> bool:
    """Whether the follower's train Reaction equals a post-hoc pass over the same
    checkpoints, with as many threads, value for value."""
    out = folder / "post-hoc.h5"
    subprocess.run(command("analyzer", "reaction", "--ckpt-dir", str(folder / "checkpoints"),
                           "--splits", "train", "--out", str(out), "-q"),
                   env=environment(threads), check=True, stdout=subprocess.DEVNULL)
    with h5py.File(folder / "run.h5", "r") as live, h5py.File(out, "r") as after:
        return bool(np.array_equal(live["reaction/train/image_reaction"][()],
                                   after["reaction/train/image_reaction"][()]))


def main() -> None:
    """Time both ways and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1000)
    cores = len(os.sched_getaffinity(0))
    parser.add_argument("--threads-each", type=int, default=max(1, cores // 2))
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="follow-demo-"))
    try:
        print(f"{args.epochs} epochs of the demo (small model, digits), {cores} cores")
        after = sequential(scratch / "after", args.epochs, cores)
        print(f"train, then analyse ({cores} threads each):  {after:7.1f} s")
        both, trained = together(scratch / "live", args.epochs, args.threads_each)
        print(f"train with a follower ({args.threads_each} threads each): {both:7.1f} s "
              f"(training ended at {trained:.1f} s; the follower {both - trained:.1f} s later)")
        print(f"ratio: {after / both:.2f}x as fast with the follower")
        print("follower's results equal a post-hoc pass over its checkpoints: "
              f"{same_as_post_hoc(scratch / 'live', args.threads_each)}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
