"""A full disk and a file-size limit: one line naming the file and the room it needs, exit 1,
every earlier epoch intact, and a rerun with room continues (real processes, real tmpfs).

The disk is a tmpfs mounted for the test (CI runs as root); where mounting is not allowed the
full disk is played by a file-size limit (``ulimit -f``), which fails the same writes.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from store.checkpoint_files import sha256_file
from store.results import read_split_results
from store.runfile import read_run_info, read_training_curves
from tests.conftest import ROOT, script

pytestmark = pytest.mark.slow
EPOCHS = 5


class SmallDisk:
    """A folder on a disk of ``size`` bytes: a tmpfs, or else a file-size limit of that size."""

    def __init__(self, folder: Path, size: int) -> None:
        self.folder = folder
        folder.mkdir()
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                  str(folder)], capture_output=True, check=False)
        self.mounted = mounted.returncode == 0
        self.limit: int | None = None if self.mounted else size

    def grow(self, size: int) -> None:
        """Free space: a larger tmpfs (or a larger limit)."""
        if self.mounted:
            subprocess.run(["mount", "-o", f"remount,size={size}", str(self.folder)],
                           check=True)
        else:
            self.limit = size

    def run(self, name: str, *args: str) -> subprocess.CompletedProcess:
        """``name args...`` with this disk's limit, to completion."""
        limit = self.limit

        def limited() -> None:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        return subprocess.run([*script(name), *args], capture_output=True, text=True,
                              env=env, preexec_fn=limited, timeout=600, check=False)

    def unmount(self) -> None:
        """Unmount the tmpfs (its files go with it)."""
        if self.mounted:
            subprocess.run(["umount", str(self.folder)], check=False)


@contextlib.contextmanager
def small_disk(tmp_path: Path, size: int) -> Iterator[SmallDisk]:
    disk = SmallDisk(tmp_path / "disk", size)
    try:
        yield disk
    finally:
        disk.unmount()


def assert_one_line(result: subprocess.CompletedProcess, *expected: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stderr)  # never 139 (a crash)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert all(text in lines[0] for text in expected), lines[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The same run, trained and analysed on a roomy disk."""
    out = tmp_path_factory.mktemp("reference") / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for args in (["trainer", "run", "--out", str(out), "--epochs", str(EPOCHS), "-q"],
                 ["analyzer", "reaction", "--ckpt-dir", str(out / "checkpoints"), "--splits",
                  "test", "-q"]):
        done = subprocess.run([*script(args[0]), *args[1:]], capture_output=True, text=True,
                              env=env, check=False)
        assert done.returncode == 0, done.stderr
    return out


def test_a_trainer_on_a_full_disk_stops_with_one_line_and_resumes_once_there_is_room(
        tmp_path, reference):
    with small_disk(tmp_path, 420_000) as disk:  # room for a few epochs of the 5
        out = disk.folder / "run"
        full = disk.run("trainer", "run", "--out", str(out), "--epochs", str(EPOCHS), "-q")
        assert_one_line(full, "no room to write" if disk.mounted else "file-size limit",
                        str(out))
        completed = read_run_info(out / "run.h5").completed_epochs
        assert 1 <= completed < EPOCHS
        curves = read_training_curves(out / "run.h5")
        for name, sha in zip(curves["checkpoint_file"], curves["checkpoint_sha256"],
                             strict=True):
            assert sha256_file(out / "checkpoints" / name) == sha  # every epoch whole

        disk.grow(4_000_000)
        resumed = disk.run("trainer", "run", "--out", str(out), "--epochs", str(EPOCHS),
                           "--resume", "-q")
        assert resumed.returncode == 0, resumed.stderr
        grown, expected = read_training_curves(out / "run.h5"), read_training_curves(
            reference / "run.h5")
        for name in ("train_loss", "val_loss", "val_class_accuracy", "checkpoint_sha256"):
            np.testing.assert_array_equal(grown[name], expected[name], err_msg=name)


def test_an_analyzer_on_a_full_disk_changes_nothing_and_a_rerun_with_room_finishes(
        tmp_path, reference):
    run_size = sum(p.stat().st_size for p in (reference).rglob("*") if p.is_file())
    with small_disk(tmp_path, run_size + 64_000) as disk:
        out = disk.folder / "run"
        shutil.copytree(reference, out, ignore=shutil.ignore_patterns("*.lock"))
        with contextlib.suppress(FileNotFoundError):
            (out / "resume.safetensors").unlink()
        reference_results = read_split_results(reference / "run.h5", "test")
        analyse = ("analyzer", "reaction", "--ckpt-dir", str(out / "checkpoints"),
                   "--splits", "val", "-q")
        if not disk.mounted:
            disk.limit = (out / "run.h5").stat().st_size + 4096  # the copy cannot grow
        before = (out / "run.h5").read_bytes()
        full = disk.run(*analyse)
        assert_one_line(full, str(out / "run.h5"),
                        "free" if disk.mounted else "file-size limit")
        assert (out / "run.h5").read_bytes() == before
        assert not list(out.glob("*.tmp"))

        disk.grow(run_size * 4 + 4_000_000)
        again = disk.run(*analyse)
        assert again.returncode == 0, again.stderr
        assert read_split_results(out / "run.h5", "val")["epoch"].tolist() == list(
            range(1, EPOCHS + 1))
        kept = read_split_results(out / "run.h5", "test")
        np.testing.assert_array_equal(kept["image_reaction"],
                                      reference_results["image_reaction"])


def test_a_file_size_limit_is_one_line_naming_the_file(tmp_path, reference):
    out = tmp_path / "run"
    shutil.copytree(reference, out, ignore=shutil.ignore_patterns("*.lock"))
    results = tmp_path / "results.h5"
    limit = 20_000  # bytes: below any results file of 5 epochs
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    limited = subprocess.run(
        [*script("analyzer"), "reaction", "--ckpt-dir", str(out / "checkpoints"), "--out",
         str(results), "-q"], capture_output=True, text=True, env=env, check=False,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert_one_line(limited, str(results), "file-size limit (ulimit -f)")
    assert not results.exists() and not list(tmp_path.glob("*.tmp"))
