"""`analyzer reaction --follow` beside a live `trainer run`, through the real console scripts.

Each case compares the follower's results with a post-hoc `analyzer reaction` over the finished
checkpoints, value for value (one thread per process on the CPU: bitwise reproducible).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import ROOT, run_cli, script

VALUES = ("image_reaction", "prediction", "class_reaction", "accuracy", "loss", "empty_maps",
          "model_reaction", "checkpoint_file", "checkpoint_sha256")
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def start(name: str, *args: str) -> subprocess.Popen:
    """Start console script ``name`` (its stderr kept for the assertion messages)."""
    return subprocess.Popen([*script(name), *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
    """Wait for a process that must succeed; return its stderr."""
    _, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr
    return stderr


def follower(ckpt_dir: Path, *extra: str) -> subprocess.Popen:
    return start("analyzer", "reaction", "--ckpt-dir", str(ckpt_dir), "--follow",
                 "--splits", "train,test", *extra)


def computed_rows(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every split's computed rows, keyed by split and dataset (the timing column left out)."""
    rows = {}
    with h5py.File(path, "r", locking=False) as handle:
        for split, group in handle["reaction"].items():
            done = group["computed"][()] == 1
            rows[split] = {"epoch": group["epoch"][()][done],
                           **{name: group[name][()][done] for name in VALUES}}
    return rows


def assert_same_results(followed: Path, post_hoc: Path) -> None:
    ours, reference = computed_rows(followed), computed_rows(post_hoc)
    assert set(ours) == set(reference)
    for split in reference:
        for name, values in reference[split].items():
            np.testing.assert_array_equal(ours[split][name], values, err_msg=f"{split} {name}")


def post_hoc(run: Path, tmp_path: Path, *extra: str) -> Path:
    """A post-hoc `analyzer reaction` over a copy of the finished run's checkpoints."""
    copy = tmp_path / "post-hoc"
    shutil.copytree(run / "checkpoints", copy / "checkpoints")
    result = run_cli("analyzer", "reaction", "--ckpt-dir", str(copy / "checkpoints"), "--run",
                     str(run / "run.h5"), "--out", str(copy / "results.h5"), "--splits",
                     "train,test", "-q", *extra)
    assert result.returncode == 0, result.stderr
    return copy / "results.h5"


class WholeEpochReader(threading.Thread):
    """Reads a run file over and over while it is written, as a collaborator's script would,
    and records any epoch it sees half-written."""

    def __init__(self, run_file: Path) -> None:
        super().__init__(daemon=True)
        self.run_file, self.stop = run_file, threading.Event()
        self.reads, self.problems, self.saw_partial_run = 0, [], False

    def run(self) -> None:
        while not self.stop.is_set():
            if self.run_file.exists():
                try:
                    self._check()
                except Exception as error:  # any failure to read is a finding
                    self.problems.append(repr(error))
            time.sleep(0.02)

    def _check(self) -> None:
        with h5py.File(self.run_file, "r", locking=False) as handle:
            completed = int(handle["training/completed_epochs"][()])
            epochs = handle["training/epoch"].shape[0]
            self.saw_partial_run |= 0 < completed < epochs
            if not np.isfinite(handle["training/val_loss"][:completed]).all():
                self.problems.append(f"a committed epoch <= {completed} without its val_loss")
            group = handle.get("reaction/train")
            if group is not None:
                done = group["computed"][()] == 1
                rows = group["image_reaction"][()][done]
                if not np.isfinite(rows).all() or (group["prediction"][()][done] < 0).any():
                    self.problems.append("a computed Reaction row not whole")
        if self.reads % 10 == 0:  # as a collaborator with xarray reads it
            import xarray

            try:
                train = xarray.open_dataset(self.run_file, engine="h5netcdf",
                                            group="reaction/train")
            except OSError:
                pass  # the group is not there yet
            else:
                with train:
                    whole = train["image_reaction"].where(train["computed"] == 1, drop=True)
                    if whole.isnull().any():
                        self.problems.append("xarray: a computed Reaction row not whole")
        self.reads += 1


def train_args(out: Path, epochs: int, *extra: str) -> list[str]:
    return ["run", "--out", str(out), "--epochs", str(epochs), "-q", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("onnx", [False, True], ids=["safetensors", "onnx-twins"])
def test_a_follower_started_first_ends_by_itself_with_the_post_hoc_results(tmp_path, onnx):
    run = tmp_path / "run"
    extra = ("--onnx",) if onnx else ()
    watching = follower(run / "checkpoints")
    time.sleep(1.0)  # the follower is up before anything exists
    training = start("trainer", *train_args(run, 25 if onnx else 40, *extra))
    reader = WholeEpochReader(run / "run.h5")
    reader.start()
    finish(training)
    stderr = finish(watching, timeout=120)
    reader.stop.set()
    reader.join()
    assert reader.problems == [] and reader.reads > 10, (reader.problems, reader.reads)
    assert reader.saw_partial_run, "the reader never looked while the run was going on"
    assert "waiting for the first checkpoint" in stderr
    assert "trained 40/40" in stderr.replace("\r", "\n") or onnx  # the bar's last state
    assert "training finished" in stderr
    with h5py.File(run / "run.h5", "r") as handle:
        assert handle["reaction/train"].attrs["backend"] == ("onnx" if onnx else "torch")
        assert handle["reaction/train/computed"][()].all()
    assert_same_results(run / "run.h5", post_hoc(run, tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("onnx", [False, True], ids=["safetensors", "onnx-twins"])
def test_trainer_and_follower_killed_at_random_moments_then_restarted(tmp_path, onnx):
    run, epochs = tmp_path / "run", 40 if onnx else 60
    rng = random.Random(7)
    training = start("trainer", *train_args(run, epochs, *(["--onnx"] if onnx else [])))
    watching = follower(run / "checkpoints", "-q")
    kills = {"trainer": 0, "follower": 0}
    deadline = time.monotonic() + 240
    while training.poll() is None and min(kills.values()) < 2:
        assert time.monotonic() < deadline, "the run did not finish"
        time.sleep(rng.uniform(0.3, 1.5))
        if rng.random() < 0.5 and training.poll() is None:
            training.send_signal(signal.SIGKILL)
            training.wait()
            kills["trainer"] += 1
            resume = ("--resume",) if (run / "run.h5").exists() else \
                ("--epochs", str(epochs), *(["--onnx"] if onnx else []))
            training = start("trainer", "run", "--out", str(run), *resume, "-q")
        elif watching.poll() is None:
            watching.send_signal(signal.SIGKILL)
            watching.wait()
            kills["follower"] += 1
            watching = follower(run / "checkpoints", "-q")
    finish(training)
    finish(watching, timeout=120)
    assert kills["trainer"] >= 1 and kills["follower"] >= 1, kills
    assert_same_results(run / "run.h5", post_hoc(run, tmp_path))


@pytest.mark.slow
def test_a_foreign_folder_fed_by_a_script_is_followed_into_out_until_idle(tmp_path):
    source = tmp_path / "trained"
    trained = run_cli("trainer", *train_args(source, 30))
    assert trained.returncode == 0, trained.stderr
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    out = tmp_path / "results.h5"
    images = write_digit_folder(tmp_path / "images")

    def start_follower() -> subprocess.Popen:
        return start("analyzer", "reaction", "--ckpt-dir", str(foreign), "--model", "small",
                     "--data", f"train={images}", "--out", str(out), "--follow", "--idle", "3",
                     "--poll", "0.1", "-q")

    watching = start_follower()
    for checkpoint in sorted((source / "checkpoints").glob("*.safetensors")):
        temporary = foreign / f".{checkpoint.name}.tmp"
        shutil.copyfile(checkpoint, temporary)
        os.replace(temporary, foreign / checkpoint.name)  # as a trainer writes atomically
        time.sleep(0.1)
        if checkpoint.name == "epoch_0018.safetensors":  # killed once, mid-run
            watching.send_signal(signal.SIGKILL)
            watching.wait()
            watching = start_follower()
    stderr = finish(watching, timeout=120)
    assert "no new checkpoint for 3 s" in stderr
    reference = tmp_path / "reference.h5"
    result = run_cli("analyzer", "reaction", "--ckpt-dir", str(foreign), "--model", "small",
                     "--data", f"train={tmp_path / 'images'}", "--out", str(reference), "-q")
    assert result.returncode == 0, result.stderr
    assert_same_results(out, reference)
    assert not list(tmp_path.glob("results.h5.*.tmp"))  # a killed copy's leftovers removed
    with h5py.File(out, "r") as handle:  # the rows grown ahead were trimmed at the end
        assert handle["reaction/train/epoch"][()].tolist() == list(range(1, 31))


def wait_for_computed(run_file: Path, count: int, process: subprocess.Popen) -> None:
    """Wait until ``count`` checkpoints of the train split are stored."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        with h5py.File(run_file, "r", locking=False) as handle:
            group = handle.get("reaction/train")
            if group is not None and group["computed"][()].sum() >= count:
                return
        time.sleep(0.05)
    raise AssertionError(f"{count} checkpoints were not stored: {process.communicate()[1]}")


def write_digit_folder(root: Path) -> Path:
    """Some of the embedded digits as PNG files, one sub-folder per class."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for index in range(0, 200):
        folder = root / str(digits.target[index])
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[index] / 16 * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


@pytest.mark.slow
def test_sigterm_during_a_checkpoint_stores_it_whole_or_not_at_all(tmp_path):
    run = tmp_path / "run"
    # 8 checkpoints: the third attempt stops at the 6th at the latest, so some stay to do
    trained = run_cli("trainer", *train_args(run, 8))
    assert trained.returncode == 0, trained.stderr
    rng = random.Random(3)
    for attempt in range(3):
        # batch size 1: a checkpoint takes seconds, so the signal lands inside one
        watching = start("analyzer", "reaction", "--ckpt-dir", str(run / "checkpoints"),
                         "--follow", "--splits", "train,test", "--batch-size", "1", "-q")
        wait_for_computed(run / "run.h5", 2 * attempt + 1, watching)
        time.sleep(rng.uniform(0.0, 0.8))
        watching.send_signal(signal.SIGTERM)
        _, stderr = watching.communicate(timeout=60)
        assert watching.returncode == 0, stderr
        assert "stopped by a signal" in stderr, stderr
        with h5py.File(run / "run.h5", "r") as handle:
            flags = {split: handle[f"reaction/{split}/computed"][()] for split in
                     ("train", "test")}
            written = np.isfinite(handle["reaction/train/image_reaction"][()]).all(axis=1)
        np.testing.assert_array_equal(flags["train"], flags["test"])  # whole checkpoints
        np.testing.assert_array_equal(written, flags["train"] == 1)  # no half-written row
        assert 0 < flags["train"].sum() < 8
    rerun = run_cli("analyzer", "reaction", "--ckpt-dir", str(run / "checkpoints"),
                    "--follow", "--splits", "train,test", "--batch-size", "1", "-q")
    assert rerun.returncode == 0, rerun.stderr
    assert_same_results(run / "run.h5", post_hoc(run, tmp_path, "--batch-size", "1"))


def test_a_follower_waiting_for_a_first_checkpoint_ends_on_sigterm_or_idle(tmp_path):
    waiting = follower(tmp_path / "not-yet", "--poll", "0.1")
    first_line = waiting.stderr.readline()  # once it says so, its signal handlers are in place
    assert "waiting for the first checkpoint" in first_line, first_line
    waiting.send_signal(signal.SIGTERM)
    _, stderr = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, stderr
    assert "stopped before the first checkpoint" in stderr
    idle = run_cli("analyzer", "reaction", "--ckpt-dir", str(tmp_path / "never"), "--follow",
                   "--idle", "1", "--poll", "0.1")
    assert idle.returncode == 1
    assert idle.stderr.strip().splitlines()[-1] == \
        f"Error: no checkpoint in {tmp_path / 'never'} after 1 s (--idle)"
    alone = run_cli("analyzer", "reaction", "--ckpt-dir", str(tmp_path), "--idle", "5")
    assert alone.returncode == 1 and "--idle applies to --follow only" in alone.stderr
