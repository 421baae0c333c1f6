"""A new ONNX Runtime session per checkpoint, as `analyzer reaction` makes them: with the
process's shared CPU arena against each session's own, side by side, on issue 14's workload
(bench/foreign_workload.py; its ONNX files exported first by `analyzer export-onnx`).

    OMP_NUM_THREADS=2 .venv/bin/python bench/onnx_sessions.py --work /tmp/fc/wl --rounds 3

Each round runs, in a fresh process per arena (shared, own; the order alternating), for
every exported checkpoint in turn: build its session, then one pass over the workload's 384
images in batches of ``--batch`` (the CLI's default 256), as the pass does; it prints the
seconds (session + pass) and the minor page faults per checkpoint, medians over the rounds,
the ratio, and each process's peak resident memory. The glibc settings of the analyzer
(trainer/allocator.py) apply in both.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foreign_workload import (
    IMAGE_SIZE,
    analyzer_argv,
    environment,
    export_command,
    make_workload,
)

IMAGES = 384


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/reaction-issue14-workload"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--one", choices=("shared", "own"), help=argparse.SUPPRESS)
    options = parser.parse_args()
    folder = options.work / "onnx-sessions"
    if options.one:
        rows = _checkpoints(sorted(folder.glob("*.onnx")), options.one, options.batch)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        print(json.dumps({"checkpoints": rows, "peak MiB": peak}))
        return
    make_workload(options.work)
    if not folder.exists():
        subprocess.run(analyzer_argv(export_command(options.work, folder)),
                       env=environment(options.work, None, 2), cwd=options.work, check=True,
                       stdout=subprocess.DEVNULL)
    runs: dict[str, list[dict]] = {"shared": [], "own": []}
    for round_number in range(options.rounds):
        for arena in (("shared", "own") if round_number % 2 == 0 else ("own", "shared")):
            output = subprocess.run([sys.executable, __file__, "--work", str(options.work),
                                     "--batch", str(options.batch), "--one", arena],
                                    capture_output=True, text=True, check=True).stdout
            runs[arena].append(json.loads(output.strip().splitlines()[-1]))
    _report(runs, options)


def _checkpoints(paths: list[Path], arena: str, batch: int) -> list[dict]:
    """Session + one pass per checkpoint, in this process, with ``arena``."""
    from analyzer.onnx_backend import _ort, session_options
    from trainer.allocator import keep_freed_memory

    keep_freed_memory()
    rng = np.random.default_rng(0)
    images = rng.random((IMAGES, 1, *IMAGE_SIZE), dtype=np.float32)
    targets = rng.integers(0, 13, IMAGES).astype(np.int64)
    rows = []
    for path in paths:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        began = time.perf_counter()
        session = _ort().InferenceSession(str(path),
                                          session_options(shared_arena=arena == "shared"),
                                          providers=["CPUExecutionProvider"])
        built = time.perf_counter()
        for start in range(0, IMAGES, batch):
            session.run(["reaction"], {"images": images[start:start + batch],
                                       "targets": targets[start:start + batch]})
        rows.append({"session": built - began, "pass": time.perf_counter() - built,
                     "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults})
        del session
    return rows


def _report(runs: dict[str, list[dict]], options: argparse.Namespace) -> None:
    print(f"medians of {options.rounds} rounds, {IMAGES} images a checkpoint, batches of "
          f"{options.batch}, {os.environ.get('OMP_NUM_THREADS', 'all')} threads\n")
    print("| checkpoint | own arena: session + pass s (faults) | shared: session + pass s "
          "(faults) | shared / own |")
    print("|---|---:|---:|---:|")
    totals = {"shared": 0.0, "own": 0.0}
    for index in range(len(runs["own"][0]["checkpoints"])):
        cells = {}
        for arena in ("own", "shared"):
            rows = [run["checkpoints"][index] for run in runs[arena]]
            seconds = statistics.median(row["session"] + row["pass"] for row in rows)
            faults = statistics.median(row["faults"] for row in rows)
            totals[arena] += seconds
            cells[arena] = (seconds, faults)
        print(f"| {index + 1} | {cells['own'][0]:.3f} ({cells['own'][1] / 1e3:.0f}k) | "
              f"{cells['shared'][0]:.3f} ({cells['shared'][1] / 1e3:.0f}k) | "
              f"{cells['shared'][0] / cells['own'][0]:.2f} |")
    print(f"| all | {totals['own']:.2f} | {totals['shared']:.2f} | "
          f"{totals['shared'] / totals['own']:.2f} |")
    peaks = {arena: statistics.median(run["peak MiB"] for run in runs[arena])
             for arena in runs}
    print(f"\npeak resident memory of the process: own arenas {peaks['own']:.0f} MiB, "
          f"shared arena {peaks['shared']:.0f} MiB")


if __name__ == "__main__":
    main()
