"""The whole `analyzer reaction` pass of two source trees, side by side on the same checkpoints.

For a change to the engine (planning, prefetching, writing) rather than to the backend's
arithmetic: each tree's ``cli.analyzer`` runs the pass over the same checkpoint folder into a
fresh ``--out`` file, the trees alternating, ``--repeats`` times each; the table gives the
median wall time and images/s of each and their ratio. A checkpoint folder is trained first
(``trainer run`` of this tree) unless ``--ckpt-dir`` names one.

    git worktree add /tmp/base <commit>
    python bench/pass_speed.py --other /tmp/base [--epochs 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py

HERE = Path(__file__).resolve().parents[1]


def analyse(tree: Path, ckpt_dir: Path, run_file: Path, out: Path) -> float:
    """Wall seconds of one pass of ``tree``'s analyzer into ``out`` (removed first)."""
    out.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(tree)}
    began = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import cli; cli.analyzer()", "reaction",
                    "--ckpt-dir", str(ckpt_dir), "--run", str(run_file), "--out", str(out),
                    "-q"], env=env, cwd=tree, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - began


def images_per_checkpoint(results: Path) -> int:
    """Images analysed per checkpoint, over every split of a results file."""
    with h5py.File(results, "r") as handle:
        return sum(group["image"].shape[0] for group in handle["reaction"].values())


def main() -> None:
    """Train if needed, time both trees alternately, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", type=Path, required=True, help="the other source tree")
    parser.add_argument("--ckpt-dir", type=Path, default=None)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="pass-speed-"))
    try:
        ckpt_dir = args.ckpt_dir
        if ckpt_dir is None:
            subprocess.run([sys.executable, "-c", "import cli; cli.trainer()", "run", "--out",
                            str(scratch / "run"), "--epochs", str(args.epochs), "-q"],
                           cwd=HERE, env={**os.environ, "PYTHONPATH": str(HERE)}, check=True,
                           stdout=subprocess.DEVNULL)
            ckpt_dir = scratch / "run" / "checkpoints"
        run_file = ckpt_dir.parent / "run.h5"
        checkpoints = len(list(ckpt_dir.glob("epoch_*")))
        trees = {"this tree": HERE, "other": args.other.resolve()}
        times: dict[str, list[float]] = {name: [] for name in trees}
        for _ in range(args.repeats):
            for name, tree in trees.items():
                times[name].append(analyse(tree, ckpt_dir, run_file, scratch / "out.h5"))
        images = images_per_checkpoint(scratch / "out.h5") * checkpoints
        print(f"{checkpoints} checkpoints, {images} images in all, {args.repeats} passes each")
        for name in trees:
            median = statistics.median(times[name])
            print(f"{name:10s} {trees[name]}: median {median:6.2f} s, {images / median:8.0f} "
                  f"images/s (all: {', '.join(f'{t:.2f}' for t in times[name])})")
        ratio = statistics.median(times["other"]) / statistics.median(times["this tree"])
        print(f"this tree is {ratio:.2f}x the other's speed")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
