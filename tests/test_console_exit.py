"""The console scripts' exit (cli._console_script): the interpreter's teardown is skipped, and
nothing is lost for it. Each case runs a small click group through it in a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import ROOT, script

GROUP = """
import atexit, sys, threading, time
import click, h5py, numpy
import cli

@click.group()
def demo():
    pass

@demo.command()
@click.argument("folder")
def run(folder):
    {body}

cli._console_script(demo)()
"""


def run_group(body: str, folder: Path) -> subprocess.CompletedProcess:
    """Run ``demo run FOLDER`` whose command is ``body``, through the console-script exit."""
    source = GROUP.format(body=textwrap.indent(textwrap.dedent(body), " " * 4).strip())
    environment = {name: value for name, value in os.environ.items()
                   if name != "PYTHONUNBUFFERED"}  # a piped stdout is block-buffered
    return subprocess.run([sys.executable, "-c", source, "run", str(folder)],
                          capture_output=True, text=True, timeout=120,
                          env={**environment, "PYTHONPATH": str(ROOT)})


def test_output_and_exit_handlers_are_not_lost(tmp_path: Path) -> None:
    done = run_group("""
        atexit.register(lambda: open(folder + "/atexit", "w").close())
        print("x" * 200_000)  # print, unlike click.echo, leaves a piped stdout unflushed
        click.echo("a note", err=True)
    """, tmp_path)
    assert done.returncode == 0
    assert done.stdout == "x" * 200_000 + "\n" and done.stderr == "a note\n"
    assert (tmp_path / "atexit").exists()


@pytest.mark.parametrize(("body", "code", "stderr"), [
    ("sys.exit(3)", 3, ""),
    ("raise click.ClickException('refused')", 1, "Error: refused\n"),
    ("sys.exit('a message')", 1, "a message\n"),
], ids=["status", "click-error", "message"])
def test_the_commands_exit_status_is_kept(tmp_path: Path, body: str, code: int,
                                          stderr: str) -> None:
    done = run_group(body, tmp_path)
    assert (done.returncode, done.stderr) == (code, stderr)


def test_a_thread_still_running_is_joined(tmp_path: Path) -> None:
    done = run_group("""
        def late():
            time.sleep(0.5)
            open(folder + "/late", "w").close()
        threading.Thread(target=late).start()
    """, tmp_path)
    assert done.returncode == 0
    assert (tmp_path / "late").exists()


def test_an_hdf5_file_left_open_is_closed_with_its_data(tmp_path: Path) -> None:
    done = run_group("""
        global left_open  # a file object kept alive: its file stays open
        left_open = h5py.File(folder + "/open.h5", "w")
        left_open["values"] = numpy.arange(1000.0)
        left_open.create_group("group")["more"] = numpy.ones(10)  # only in HDF5's cache
        left_open.attrs["note"] = "still open at exit"
    """, tmp_path)
    assert done.returncode == 0, done.stderr
    with h5py.File(tmp_path / "open.h5", "r") as handle:
        np.testing.assert_array_equal(handle["values"][()], np.arange(1000.0))
        np.testing.assert_array_equal(handle["group/more"][()], np.ones(10))
        assert handle.attrs["note"] == "still open at exit"


def test_a_reader_that_goes_away_ends_the_command_quietly() -> None:
    # `trainer models | head -0`: the pipe is closed before the table is written.
    command = subprocess.Popen([*script("trainer"), "models"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    command.stdout.close()
    _, stderr = command.communicate(timeout=120)
    assert (command.returncode, stderr) == (1, "")
