"""The fault suite: ``kill -9`` at random moments of `trainer run` and `analyzer reaction`,
also inside an HDF5 write (the writer lock is held) and inside an atomic replacement (its
``.tmp`` copy exists), with a reader polling the run file all along; after each kill the same
command runs again, and the end result must equal an uninterrupted run value for value. Then a
list of bad inputs, each of which must be one line and leave the results as they were.

It prints one summary line. CI runs a short round (``pytest tests/test_faults.py``); a longer
one: ``python -m tests.test_faults --kills 60`` (docs/RELIABILITY.md has its figures).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as ``python -m tests.test_faults`` too

from tests.conftest import assert_only_computed_rows_differ, script  # noqa: E402

EPOCHS = 6
CURVES = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_class_loss",
          "val_class_accuracy", "checkpoint_sha256")
RESULTS = ("image_reaction", "prediction", "class_reaction", "accuracy", "loss",
           "empty_maps", "model_reaction", "checkpoint_sha256", "computed")
MOMENTS = ("random", "inside a write", "inside a replacement")
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@dataclass
class Tally:
    """What the suite did."""

    kills: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MOMENTS, 0))
    identical: int = 0
    compared: int = 0
    bad_inputs: int = 0
    reads: int = 0

    @property
    def resumes(self) -> int:
        """Reruns after a kill: one per kill."""
        return sum(self.kills.values())

    def line(self) -> str:
        """The summary line."""
        moments = ", ".join(f"{count} {moment}" for moment, count in self.kills.items())
        return (f"fault suite: {sum(self.kills.values())} kills injected ({moments}), "
                f"{self.resumes} resumes, results identical {self.identical}/{self.compared}, "
                f"{self.bad_inputs} bad inputs tried, {self.reads} reads of live files whole")


def command(*args: str) -> list[str]:
    return [*script(args[0]), *args[1:]]


def trainer_args(out: Path) -> list[str]:
    return command("trainer", "run", "--out", str(out), "--epochs", str(EPOCHS), "-q")


def analyzer_args(run: Path) -> list[str]:
    return command("analyzer", "reaction", "--ckpt-dir", str(run / "checkpoints"), "--splits",
                   "val,test", "-q")


def lock_busy(lock: Path) -> bool:
    """Whether a writer holds ``lock`` now (taken and released at once when free)."""
    try:
        with open(lock, "a+b") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    except OSError:
        return False
    return False


def kill_at(process: subprocess.Popen, moment: str, run_file: Path,
            rng: random.Random) -> bool:
    """Kill ``process`` with SIGKILL at ``moment``; False if it ended first."""
    deadline = time.monotonic() + rng.uniform(0.5, 4.0)
    while process.poll() is None:
        if moment == "random":
            hit = time.monotonic() >= deadline
        elif moment == "inside a write":
            hit = time.monotonic() >= deadline - 0.4 and lock_busy(run_file.with_name(
                run_file.name + ".lock"))
        else:
            hit = any(run_file.parent.glob(run_file.name + ".*.tmp"))
        if hit:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.0005 if moment != "random" else 0.01)
    return False


class Reader(threading.Thread):
    """Reads the run file over and over while it is written: every epoch it shows as
    complete or computed must be whole."""

    def __init__(self, run_file: Path) -> None:
        super().__init__(daemon=True)
        self.run_file = run_file
        self.stop = threading.Event()
        self.reads = 0
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(FileNotFoundError, BlockingIOError):
                self._read_once()
            time.sleep(0.002)

    def _read_once(self) -> None:
        if not self.run_file.exists():
            return
        try:
            handle = h5py.File(self.run_file, "r", locking=False)
        except FileNotFoundError:
            return
        with handle:
            training = handle["training"]
            done = int(training["completed_epochs"][()])
            if not np.isfinite(training["val_loss"][:done]).all():
                self.errors.append(f"a committed epoch without its val_loss ({done})")
            for split, group in handle.get("reaction", {}).items():
                flagged = group["computed"][()] == 1
                whole = np.isfinite(group["image_reaction"][()]).all(axis=1)
                if (flagged & ~whole).any():
                    self.errors.append(f"a computed {split} row that is not whole")
        self.reads += 1


def until_done(args: list[str], again: list[str], run_file: Path, kills: int, tally: Tally,
               rng: random.Random) -> None:
    """Run ``args``, killing it ``kills`` times at the moments in turn and running ``again``
    after each kill, until it ends by itself."""
    for index in range(kills):
        process = subprocess.Popen(args if index == 0 else again, env=ENV,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        moment = MOMENTS[index % len(MOMENTS)]
        if kill_at(process, moment, run_file, rng):
            tally.kills[moment] += 1
        else:
            assert process.returncode == 0, process.stderr.read()
            return
    finished = subprocess.run(again, env=ENV, capture_output=True, text=True, check=False)
    assert finished.returncode == 0, finished.stderr


def assert_equal(tally: Tally, got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    tally.compared += 1
    for name, values in want.items():
        np.testing.assert_array_equal(got[name], values, err_msg=name)
    tally.identical += 1


def training_rows(run_file: Path) -> dict[str, np.ndarray]:
    with h5py.File(run_file, "r", locking=False) as handle:
        return {name: handle["training"][name][()] for name in CURVES}


def result_rows(run_file: Path) -> dict[str, np.ndarray]:
    with h5py.File(run_file, "r", locking=False) as handle:
        return {f"{split}/{name}": group[name][()] for split, group in
                handle["reaction"].items() for name in (*RESULTS, "epoch")}


def bad_inputs(run: Path, work: Path, tally: Tally) -> None:
    """Each bad input: one line, exit 1, the results as they were (or plus whole rows)."""
    cases = {
        "truncated checkpoint": lambda copy: _truncate(copy / "checkpoints/epoch_0004"
                                                       ".safetensors", 500),
        "pickle payload": lambda copy: (copy / "checkpoints/epoch_0007.pt").write_bytes(
            b"\x80\x04cposix\nsystem\n(S'true'\ntR."),
        "header lies about sizes": lambda copy: _lie(copy / "checkpoints/epoch_0003"
                                                     ".safetensors"),
        "run file cut short": lambda copy: _truncate(copy / "run.h5", 30_000),
        "results dataset missing": lambda copy: _delete(copy / "run.h5",
                                                        "reaction/test/loss"),
        "wrong model": None,
        "no images": None,
    }
    for name, damage in cases.items():
        copy = work / name.replace(" ", "_")
        shutil.copytree(run, copy)
        before = copy.parent / f"{copy.name}.before.h5"
        split = "test" if name == "results dataset missing" else "train"
        args = [*command("analyzer", "reaction", "--ckpt-dir", str(copy / "checkpoints")),
                "--splits", split, "-q"]
        if damage is not None:
            damage(copy)
        shutil.copyfile(copy / "run.h5", before)
        if name == "wrong model":
            args += ["--model", "mnist", "--image-size", "28x28"]
        if name == "no images":
            (work / "empty").mkdir(exist_ok=True)
            args += ["--data", f"train={work / 'empty'}", "--out", str(work / "empty.h5")]
        failed = subprocess.run(args, env=ENV, capture_output=True, text=True, check=False)
        lines = failed.stderr.strip().splitlines()
        assert failed.returncode == 1 and len(lines) == 1 and lines[0].startswith("Error: "), \
            (name, failed.stderr)
        if (copy / "run.h5").read_bytes() != before.read_bytes():  # epochs before the bad one
            assert_only_computed_rows_differ(before, copy / "run.h5")
        tally.bad_inputs += 1


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(size)


def _lie(path: Path) -> None:
    payload = path.read_bytes()
    length = struct.unpack("<Q", payload[:8])[0]
    header = json.loads(payload[8:8 + length])
    name = next(key for key in header if key != "__metadata__")
    header[name]["data_offsets"][1] += 10**9
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + payload[8 + length:])


def _delete(path: Path, dataset: str) -> None:
    with h5py.File(path, "r+") as handle:
        del handle[dataset]


def fault_suite(work: Path, kills: int, seed: int = 0) -> Tally:
    """Train and analyse once uninterrupted, then again under ``kills`` kills each; compare."""
    rng, tally = random.Random(seed), Tally()
    reference = work / "reference"
    for args in (trainer_args(reference), analyzer_args(reference)):
        done = subprocess.run(args, env=ENV, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr

    killed = work / "killed"
    reader = Reader(killed / "run.h5")
    reader.start()
    try:
        until_done(trainer_args(killed), [*trainer_args(killed), "--resume"],
                   killed / "run.h5", kills, tally, rng)
        assert_equal(tally, training_rows(killed / "run.h5"), training_rows(reference / "run.h5"))
        until_done(analyzer_args(killed), analyzer_args(killed), killed / "run.h5", kills,
                   tally, rng)
        assert_equal(tally, result_rows(killed / "run.h5"), result_rows(reference / "run.h5"))
    finally:
        reader.stop.set()
        reader.join()
    assert not reader.errors, reader.errors[:3]
    assert reader.reads > 0
    tally.reads = reader.reads
    bad_inputs(reference, work / "bad", tally)
    return tally


@pytest.mark.slow
def test_the_fault_suite(tmp_path, capsys):
    tally = fault_suite(tmp_path, kills=4, seed=1)
    with capsys.disabled():
        print(f"\n{tally.line()}")
    assert tally.identical == tally.compared == 2
    assert sum(tally.kills.values()) >= 4  # of 8 tries: a few runs end before their kill
    assert tally.bad_inputs == 7


@pytest.mark.slow
def test_an_analyzer_started_twice_by_mistake_is_refused_and_the_first_one_finishes(
        tmp_path):
    run = tmp_path / "run"
    trained = subprocess.run(trainer_args(run), env=ENV, capture_output=True, check=False)
    assert trained.returncode == 0, trained.stderr
    reference = tmp_path / "reference.h5"
    alone = subprocess.run([*analyzer_args(run), "--out", str(reference)], env=ENV,
                           capture_output=True, text=True, check=False)
    assert alone.returncode == 0, alone.stderr
    first = subprocess.Popen(analyzer_args(run), env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    while not lock_busy(run / "run.h5.analyzer.lock"):  # the first one has its sink open
        assert first.poll() is None, first.stderr.read()
        time.sleep(0.01)
    first.send_signal(signal.SIGSTOP)  # held still: the second surely meets it
    second = subprocess.run(analyzer_args(run), env=ENV, capture_output=True, text=True,
                            check=False)
    first.send_signal(signal.SIGCONT)
    assert second.returncode == 1
    assert second.stderr.strip() == (f"Error: another analyzer is writing results into "
                                     f"{run / 'run.h5'}: wait for it to end (a second one "
                                     "would compute the same checkpoints again)")
    _, errors = first.communicate(timeout=300)
    assert first.returncode == 0, errors
    ours, theirs = result_rows(run / "run.h5"), result_rows(reference)
    for name, values in theirs.items():  # nothing computed twice, lost or torn
        np.testing.assert_array_equal(ours[name], values, err_msg=name)


def main() -> None:
    """``python -m tests.test_faults --kills N``: a longer round, one summary line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=30, help="kills per command")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="folder (default: a temp)")
    options = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as temporary:
        work = options.work or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        print(fault_suite(work, options.kills, options.seed).line())


if __name__ == "__main__":
    main()
