"""Shared test helpers: run the real console scripts in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.fixture
def cli():
    """``cli("trainer", "run", ...)`` → CompletedProcess."""
    return run_cli
