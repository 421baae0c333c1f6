"""Shared test helpers: run the real console scripts in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def script(name: str) -> list[str]:
    """The command that runs console script ``name`` of this installation."""
    installed = Path(sys.executable).parent / name
    if installed.exists():
        return [str(installed)]
    return [sys.executable, "-c", f"import cli; cli.{name}()"]


def run_cli(name: str, *args: str, cwd: Path | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``name args...`` to completion and return the finished process (text output)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([*script(name), *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=timeout, check=False)


# The console script in a process where importing torch fails, as a pass that must not need
# it (ONNX files on the CPU) is run.
_WITHOUT_TORCH = """
import sys


class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ImportError(f"{{name}} was imported by a command that must not need torch")


sys.meta_path.insert(0, NoTorch())
import cli

sys.argv = [{name!r}, *sys.argv[1:]]
cli.{name}()
"""


def run_cli_without_torch(name: str, *args: str,
                          timeout: float = 300) -> subprocess.CompletedProcess:
    """:func:`run_cli`, in a process where any import of torch raises ImportError."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", _WITHOUT_TORCH.format(name=name), *args],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout,
                          check=False)


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (to prove that nothing changed).

    Writer-lock side files are left out: they are empty and only exist to be locked.
    """
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.endswith(".lock")}


def assert_only_computed_rows_differ(before: Path, after: Path) -> None:
    """``after`` is ``before`` plus whole, computed results: the same attributes, groups and
    epoch axes (a new group holds computed rows only); a row differs only where ``after``
    flags it computed and ``before`` did not.

    Args:
        before: a copy of the results (or run) file taken before a command.
        after: the file after the command.
    """
    with h5py.File(before, "r", locking=False) as old, h5py.File(after, "r",
                                                                 locking=False) as new:
        assert dict(old.attrs) == dict(new.attrs)
        assert set(old.get("reaction", {})) <= set(new.get("reaction", {}))
        for split in set(new.get("reaction", {})) - set(old.get("reaction", {})):
            assert new[f"reaction/{split}/computed"][()].all(), split  # only whole rows
        for split in old.get("reaction", {}):
            was, now = old[f"reaction/{split}"], new[f"reaction/{split}"]
            np.testing.assert_array_equal(was["epoch"][()], now["epoch"][()], err_msg=split)
            assert sorted(was) == sorted(now)
            assert dict(was.attrs) == dict(now.attrs)
            new_rows = (now["computed"][()] == 1) & (was["computed"][()] == 0)
            for name in was:
                if was[name].shape[:1] == was["epoch"].shape and name != "epoch":
                    np.testing.assert_array_equal(was[name][()][~new_rows],
                                                  now[name][()][~new_rows], err_msg=name)


def write_rgb_classes(root: Path, classes: tuple[str, ...], count: int) -> Path:
    """A folder of random 10x14 RGB PNGs, ``count`` per class sub-folder (seeded)."""
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for index in range(count):
            pixels = rng.integers(0, 255, (10, 14, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index}.png")
    return root


@pytest.fixture
def cli():
    """``cli("trainer", "run", ...)`` → CompletedProcess."""
    return run_cli


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of many tiny per-image passes: with two threads on a busy
    2-core machine, thread hand-offs cost 10-50x the arithmetic."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def graph_cache_in_a_temporary_folder(tmp_path_factory):
    """The ONNX graph cache (store/graph_cache.py) of every test and of the commands they
    run lies in one temporary folder: no test writes to ~/.cache."""
    saved = {name: os.environ.get(name) for name in ("REACTION_CACHE_DIR",
                                                     "REACTION_GRAPH_CACHE")}
    os.environ["REACTION_CACHE_DIR"] = str(tmp_path_factory.mktemp("graph-cache"))
    os.environ.pop("REACTION_GRAPH_CACHE", None)
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
