"""`analyzer reaction` under real `torchrun --standalone` jobs on the CPU (gloo).

Every rank runs one thread, as does the single process it is compared with, so the results
must be equal value for value.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import ROOT, run_cli, script
from tests.test_follow import assert_same_results, computed_rows

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.slow


def torchrun(ranks: int, *args: str) -> list[str]:
    """The command line of ``analyzer reaction ARGS`` on ``ranks`` CPU ranks of one machine."""
    return [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", str(ranks),
            "--standalone", "--", *script("analyzer"), "reaction", *args]


def run_job(ranks: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun(ranks, *args), capture_output=True, text=True, env=ENV,
                          timeout=120, check=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A 7-epoch run with one process's results over it in ``single.h5`` beside it."""
    root = tmp_path_factory.mktemp("distributed")
    trained = run_cli("trainer", "run", "--out", str(root / "run"), "--epochs", "7", "-q")
    assert trained.returncode == 0, trained.stderr
    single = run_cli("analyzer", "reaction", "--ckpt-dir", str(root / "run" / "checkpoints"),
                     "--out", str(root / "single.h5"), "-q")
    assert single.returncode == 0, single.stderr
    return root / "run"


def test_two_ranks_equal_one_process_and_rank_0_alone_speaks(run, tmp_path):
    out = tmp_path / "two.h5"
    job = run_job(2, "--ckpt-dir", str(run / "checkpoints"), "--out", str(out))
    assert job.returncode == 0, job.stderr
    assert job.stdout.splitlines() == [f"results: {out}"]  # rank 1 prints nothing
    assert_same_results(out, run.parent / "single.h5")
    with h5py.File(out, "r") as handle:
        assert handle["reaction/train"].attrs["devices"] == '["cpu"]'
    again = run_job(2, "--ckpt-dir", str(run / "checkpoints"), "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("note: all 7 checkpoints already analysed") == 1, again.stderr


def test_more_ranks_than_checkpoints(run, tmp_path):
    out = tmp_path / "three.h5"
    job = run_job(3, "--ckpt-dir", str(run / "checkpoints"), "--out", str(out), "--epochs",
                  "2,5", "-q")
    assert job.returncode == 0, job.stderr
    ours, reference = computed_rows(out), computed_rows(run.parent / "single.h5")
    for split, rows in reference.items():
        wanted = np.isin(rows["epoch"], [2, 5])
        for name, values in rows.items():
            np.testing.assert_array_equal(ours[split][name], values[wanted], err_msg=name)


def assert_whole_rows(path: Path) -> np.ndarray:
    """No half-written row: a row holds values exactly when it is flagged; the flags."""
    with h5py.File(path, "r", locking=False) as handle:
        group = handle["reaction/train"]
        flags = group["computed"][()]
        np.testing.assert_array_equal(np.isfinite(group["image_reaction"][()]).all(axis=1),
                                      flags == 1)
        return flags


def test_a_corrupt_checkpoint_on_one_rank_ends_the_job_with_its_line(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    corrupt = copy / "checkpoints" / "epoch_0002.safetensors"  # planned second: rank 1's
    corrupt.write_bytes(corrupt.read_bytes()[:1000])
    out = tmp_path / "results.h5"
    job = run_job(2, "--ckpt-dir", str(copy / "checkpoints"), "--out", str(out), "-q")
    assert job.returncode != 0
    errors = [line for line in job.stderr.splitlines() if line.startswith("Error: ")]
    assert errors[0].startswith(f"Error: checkpoint {corrupt} is corrupt or truncated"), \
        job.stderr
    assert all(line.startswith("Error: rank 0: receiving epoch 2 from rank 1 failed")
               for line in errors[1:]), errors  # at most rank 0's own line, one line
    if out.exists():  # rank 0 stored its checkpoints before the failure: whole rows, and
        # the corrupt checkpoint's row, if the file has one yet, is not flagged computed
        with h5py.File(out, "r", locking=False) as handle:
            epochs = handle["reaction/train/epoch"][()].tolist()
        assert dict(zip(epochs, assert_whole_rows(out), strict=True)).get(2, 0) == 0
    shutil.copyfile(run / "checkpoints" / corrupt.name, corrupt)
    rerun = run_job(2, "--ckpt-dir", str(copy / "checkpoints"), "--out", str(out), "-q")
    assert rerun.returncode == 0, rerun.stderr
    assert_same_results(out, run.parent / "single.h5")


def rank_pid(job: subprocess.Popen, rank: int) -> int | None:
    """The process id of ``rank`` among the descendants of a running torchrun ``job``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if f"RANK={rank}".encode() in environ and parent == job.pid:
            return int(entry.name)
    return None


def test_a_rank_killed_ends_the_job_and_a_rerun_completes_it(run, tmp_path):
    out = tmp_path / "results.h5"
    slow = ("--ckpt-dir", str(run / "checkpoints"), "--out", str(out), "--splits", "train",
            "--batch-size", "1", "-q")  # about a second per checkpoint
    job = subprocess.Popen(torchrun(2, *slow), env=ENV, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and job.poll() is None:
        if out.exists():  # created before its groups (two atomic replacements)
            with h5py.File(out, "r", locking=False) as handle:
                group = handle.get("reaction/train")
                if group is not None and group["computed"][()].sum() >= 1:
                    break
        time.sleep(0.05)
    pid = rank_pid(job, 1)
    assert pid is not None and job.poll() is None, job.communicate()
    os.kill(pid, signal.SIGKILL)
    _, stderr = job.communicate(timeout=60)
    assert job.returncode != 0, stderr
    flags = assert_whole_rows(out)
    assert 1 <= flags.sum() < 7, flags
    rerun = run_job(2, *slow)
    assert rerun.returncode == 0, rerun.stderr
    reference = tmp_path / "reference.h5"
    single = run_cli("analyzer", "reaction", *slow[:2], "--out", str(reference), *slow[4:])
    assert single.returncode == 0, single.stderr
    assert_same_results(out, reference)


def test_two_ranks_on_the_onnx_backend_equal_one_process(tmp_path):
    trained = run_cli("trainer", "run", "--out", str(tmp_path / "run"), "--epochs", "2",
                      "--onnx", "-q")
    assert trained.returncode == 0, trained.stderr
    folder = tmp_path / "run" / "checkpoints"
    single = run_cli("analyzer", "reaction", "--ckpt-dir", str(folder), "--backend", "onnx",
                     "--splits", "val", "--out", str(tmp_path / "single.h5"), "-q")
    assert single.returncode == 0, single.stderr
    job = run_job(2, "--ckpt-dir", str(folder), "--backend", "onnx", "--splits", "val",
                  "--out", str(tmp_path / "two.h5"), "-q")
    assert job.returncode == 0, job.stderr
    assert_same_results(tmp_path / "two.h5", tmp_path / "single.h5")
    with h5py.File(tmp_path / "two.h5", "r") as handle:
        assert handle["reaction/val"].attrs["backend"] == "onnx"
