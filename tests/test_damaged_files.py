"""Damaged files: a run file cut short by a copy, a results group that lost a dataset, a
checkpoint whose safetensors header lies about its sizes. Every command answers with one line
and exit 1, never a traceback or a hang; `analyzer info` says what can still be read."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import h5py
import pytest
from click.testing import CliRunner

from analyzer.reaction import ReactionOptions, compute_reaction
from cli import analyzer, trainer
from tests.conftest import assert_only_computed_rows_differ
from trainer.train import TrainConfig, train

COMMANDS = {
    "info": ["info", "{run}"],
    "extract": ["extract", "{run}", "--threshold", "0.3"],
    "plot": ["plot", "{run}", "--out", "{tmp}/figures"],
    "report": ["report", "{run}", "--out", "{tmp}/report"],
    "reaction": ["reaction", "--ckpt-dir", "{folder}/checkpoints", "--splits", "test", "-q"],
    "compare": ["compare", "{run}", "{run}"],
}


@pytest.fixture(scope="module")
def analysed(tmp_path_factory) -> Path:
    """A 3-epoch run with Reaction on its test split."""
    out = tmp_path_factory.mktemp("damaged") / "run"
    train(TrainConfig(epochs=3), out, progress=False)
    compute_reaction(ReactionOptions(ckpt_dir=out / "checkpoints", splits=["test"]),
                     progress=False)
    return out


def invoke(group, args: list[str], **names: Path):
    result = CliRunner().invoke(group, [arg.format(**names) for arg in args])
    assert not isinstance(result.exception, Exception) or isinstance(
        result.exception, SystemExit), repr(result.exception)  # no traceback
    return result


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


@pytest.mark.parametrize("command", [*COMMANDS, "trainer --resume"])
@pytest.mark.parametrize("fraction", [0.001, 0.25, 0.9, 0.999])
def test_a_run_file_cut_short_is_one_line_from_every_command(analysed, tmp_path, command,
                                                              fraction):
    folder = tmp_path / "run"
    shutil.copytree(analysed, folder)
    run = folder / "run.h5"
    size = run.stat().st_size
    with open(run, "r+b") as handle:
        handle.truncate(int(size * fraction))
    if command == "trainer --resume":
        result = invoke(trainer, ["run", "--out", "{folder}", "--resume", "-q"], folder=folder)
    else:
        result = invoke(analyzer, COMMANDS[command], run=run, tmp=tmp_path, folder=folder)
    line = one_line_error(result)
    if fraction > 0.01:  # past the superblock: HDF5 knows the size it should have
        assert f"is cut short: {int(size * fraction):,} of its {size:,} bytes" in line


@pytest.mark.parametrize("command", [name for name in COMMANDS if name != "info"])
def test_a_results_group_without_a_dataset_is_one_line_and_info_says_what_is_left(
        analysed, tmp_path, command):
    folder = tmp_path / "run"
    shutil.copytree(analysed, folder)
    run = folder / "run.h5"
    with h5py.File(run, "r+") as handle:
        del handle["reaction/test/image_reaction"]
    line = one_line_error(invoke(analyzer, COMMANDS[command], run=run, tmp=tmp_path,
                                 folder=folder))
    assert f"{run}:/reaction/test is damaged: no image_reaction" in line
    info = invoke(analyzer, ["info", str(run)])
    assert info.exit_code == 0, info.output
    assert "training: 3 of 3 epochs completed" in info.output
    assert "reaction/test: damaged (no image_reaction): unreadable" in info.output


def lie_about_sizes(path: Path) -> None:
    """Rewrite a safetensors header so that its first tensor claims 1 GB more data."""
    payload = path.read_bytes()
    length = struct.unpack("<Q", payload[:8])[0]
    header = json.loads(payload[8:8 + length])
    name = next(key for key in header if key != "__metadata__")
    start, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [start, end + 10**9]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + payload[8 + length:])


@pytest.mark.parametrize("command", ["reaction", "cam"])
def test_a_checkpoint_whose_header_lies_about_its_sizes_is_one_line(analysed, tmp_path,
                                                                     command):
    folder = tmp_path / "run"
    shutil.copytree(analysed, folder)
    checkpoint = folder / "checkpoints" / "epoch_0002.safetensors"
    lie_about_sizes(checkpoint)
    args = {"reaction": ["reaction", "--ckpt-dir", str(folder / "checkpoints"), "--splits",
                         "val", "-q"],
            "cam": ["cam", "--ckpt-dir", str(folder / "checkpoints"), "--epochs", "2",
                    "--out", str(tmp_path / "cam.png")]}[command]
    shutil.copyfile(folder / "run.h5", tmp_path / "before.h5")
    line = one_line_error(invoke(analyzer, args))
    assert f"checkpoint {checkpoint} is corrupt or truncated" in line
    assert_only_computed_rows_differ(tmp_path / "before.h5", folder / "run.h5")  # epoch 1
