"""`trainer run` end to end through the real console script: files, refusals, kill and resume."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from analyzer.reaction import ReactionOptions, compute_reaction
from store.checkpoint_files import sha256_file
from store.checkpoints import load_checkpoint
from store.datasets import load_split, open_source, plan_splits
from store.errors import InputError
from store.results import read_split_results
from store.runfile import read_provenance, read_run_info, read_training_curves
from tests.conftest import ROOT, script, tree
from trainer.models import ModelSpec, build_model
from trainer.train import SavedCheckpoint, TrainConfig, epoch_generator, train

CURVES = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_class_loss",
          "val_class_accuracy")


def test_a_short_run_writes_every_epoch_checkpoint_and_curve(tmp_path, cli):
    out = tmp_path / "demo"
    result = cli("trainer", "run", "--out", str(out), "--epochs", "3", "-q")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"run file: {out / 'run.h5'}"
    info = read_run_info(out / "run.h5")
    assert (info.epochs, info.completed_epochs) == (3, 3)
    assert info.class_names == [str(d) for d in range(10)]
    assert sum(len(ids) for ids in info.split_ids.values()) == 1797
    curves = read_training_curves(out / "run.h5")
    assert curves["epoch"].tolist() == [1, 2, 3]
    for name in CURVES:
        assert np.isfinite(curves[name]).all(), name
    assert curves["train_loss"][2] < curves["train_loss"][0]
    for file_name, digest in zip(curves["checkpoint_file"], curves["checkpoint_sha256"],
                                 strict=True):
        assert sha256_file(out / "checkpoints" / file_name) == digest
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "epoch_0001.safetensors", "epoch_0002.safetensors", "epoch_0003.safetensors"]
    provenance = read_provenance(out / "run.h5")
    started, finished = (datetime.fromisoformat(provenance[key]) for key in ("started",
                                                                             "finished"))
    assert started.tzinfo is not None and started <= finished  # extended ISO 8601, offset
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", provenance["started"])


def test_a_checkpoint_rebuilds_its_model_from_its_own_metadata(tmp_path, cli):
    out = tmp_path / "demo"
    assert cli("trainer", "run", "--out", str(out), "--epochs", "1", "-q").returncode == 0
    tensors, metadata = load_checkpoint(out / "checkpoints" / "epoch_0001.safetensors")
    model = build_model(ModelSpec.from_json(metadata["model"]))
    model.load_state_dict(tensors)  # strict: every weight and batch-norm buffer is there
    assert any("running_mean" in name for name in tensors)
    assert metadata["model"] == read_run_info(out / "run.h5").model


def test_an_existing_run_is_refused_without_resume_or_force(tmp_path, cli):
    out = tmp_path / "demo"
    assert cli("trainer", "run", "--out", str(out), "--epochs", "1", "-q").returncode == 0
    before = tree(out)
    result = cli("trainer", "run", "--out", str(out), "--epochs", "2", "-q")
    assert result.returncode != 0
    assert "already holds a run" in result.stderr
    assert tree(out) == before
    forced = cli("trainer", "run", "--out", str(out), "--epochs", "2", "-q", "--force")
    assert forced.returncode == 0, forced.stderr
    assert read_run_info(out / "run.h5").completed_epochs == 2


def test_resume_of_a_finished_run_changes_nothing(tmp_path, cli):
    out = tmp_path / "demo"
    assert cli("trainer", "run", "--out", str(out), "--epochs", "2", "-q").returncode == 0
    before = tree(out)
    assert cli("trainer", "run", "--out", str(out), "--resume", "-q").returncode == 0
    assert tree(out) == before  # the run file's "finished" time included
    again = cli("trainer", "run", "--out", str(out), "--epochs", "2", "--seed", "0",
                "--lr", "1e-4", "--data", "digits", "--resume", "-q")  # the same command again
    assert again.returncode == 0, again.stderr
    assert tree(out) == before


@pytest.mark.parametrize(("options", "message"), [
    (["--lr", "0.5"], "--lr 0.5 differs from this run's 0.0001"),
    (["--seed", "4"], "--seed 4 differs from this run's 0"),
    (["--image-size", "10x10"], "--image-size 10x10 differs from this run's none"),
    (["--onnx"], "--onnx on differs from this run's off"),
    (["--epochs", "1"], "--epochs 1 is below this run's 2"),
])
def test_resume_refuses_a_different_setting_naming_both_values(tmp_path, options, message):
    out = tmp_path / "demo"
    train(TrainConfig(epochs=2), out, progress=False)
    before = tree(out)
    with pytest.raises(InputError, match=re.escape(message)):
        train(TrainConfig(**{**TrainConfig(epochs=2).__dict__, **_fields(options)}), out,
              resume=True, progress=False)
    assert tree(out) == before


def _fields(options: list[str]) -> dict[str, object]:
    """``["--lr", "0.5"]`` as TrainConfig fields (``--onnx``: a flag)."""
    names = {"--lr": ("learning_rate", float), "--seed": ("seed", int),
             "--image-size": ("image_size", str), "--epochs": ("epochs", int)}
    if options == ["--onnx"]:
        return {"onnx": True}
    name, kind = names[options[0]]
    return {name: kind(options[1])}


def test_resume_accepts_the_image_size_the_run_has_and_the_data_folder_spelled_otherwise(
        tmp_path, cli):
    data = write_png_classes(tmp_path / "pngs", {"a": 6, "b": 6})
    out = tmp_path / "run"
    first = cli("trainer", "run", "--out", str(out), "--data", str(data), "--epochs", "1",
                "--image-size", "12x40", "-q")
    assert first.returncode == 0, first.stderr
    spelled = cli("trainer", "run", "--out", str(out), "--data", f"{data}/../pngs/",
                  "--image-size", "12X40", "--epochs", "2", "--resume", "-q")
    assert spelled.returncode == 0, spelled.stderr
    assert read_run_info(out / "run.h5").completed_epochs == 2


def test_resume_with_more_epochs_lengthens_the_run_and_equals_a_longer_run(tmp_path, cli):
    short, long = tmp_path / "short", tmp_path / "long"
    assert cli("trainer", "run", "--out", str(short), "--epochs", "2", "--seed", "3",
               "-q").returncode == 0
    test_split = ReactionOptions(ckpt_dir=short / "checkpoints", splits=["test"])
    compute_reaction(test_split, progress=False)
    early = read_split_results(short / "run.h5", "test")
    lengthened = cli("trainer", "run", "--out", str(short), "--epochs", "4", "--seed", "3",
                     "--resume", "-q")
    assert lengthened.returncode == 0, lengthened.stderr
    assert cli("trainer", "run", "--out", str(long), "--epochs", "4", "--seed", "3",
               "-q").returncode == 0
    info = read_run_info(short / "run.h5")
    assert (info.epochs, info.completed_epochs, info.config["epochs"]) == (4, 4, 4)
    grown, reference = read_training_curves(short / "run.h5"), read_training_curves(
        long / "run.h5")
    assert grown["epoch"].tolist() == [1, 2, 3, 4]
    for name in CURVES:
        np.testing.assert_array_equal(grown[name], reference[name], err_msg=name)
    assert tree(short / "checkpoints") == tree(long / "checkpoints")  # value for value
    provenance = read_provenance(short / "run.h5")
    assert provenance["finished"]
    assert [(r["epoch"], r["epochs"]) for r in json.loads(provenance["resumes"])] == [(3, 4)]

    assert compute_reaction(test_split, progress=False).analysed == 2  # epochs 3 and 4 only
    grown_results = read_split_results(short / "run.h5", "test")
    assert grown_results["epoch"].tolist() == [1, 2, 3, 4]
    np.testing.assert_array_equal(grown_results["image_reaction"][:2], early["image_reaction"])
    compute_reaction(replace(test_split, ckpt_dir=long / "checkpoints"), progress=False)
    np.testing.assert_array_equal(grown_results["image_reaction"],
                                  read_split_results(long / "run.h5", "test")["image_reaction"])


def write_png_classes(root: Path, counts: dict[str, int]) -> Path:
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for index in range(count):
            pixels = np.random.default_rng(index).integers(0, 255, (12, 40), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index}.png")
    return root


def test_a_folder_of_images_trains_at_the_requested_size(tmp_path, cli):
    data = write_png_classes(tmp_path / "data", {"arabic": 6, "greek": 6})
    out = tmp_path / "out"
    result = cli("trainer", "run", "--data", str(data), "--image-size", "8x8", "--epochs", "2",
                 "--out", str(out), "-q")
    assert result.returncode == 0, result.stderr
    info = read_run_info(out / "run.h5")
    assert info.class_names == ["arabic", "greek"]
    assert sorted(info.split_ids["train"] + info.split_ids["val"]) == sorted(
        f"{c}/{i}.png" for c in ("arabic", "greek") for i in range(6))
    assert info.split_ids["test"] == []


@pytest.mark.parametrize("case", ["unknown model", "empty folder", "one class", "not an image",
                                  "too small", "unwritable out", "bad size", "absurd size"])
def test_bad_input_is_one_line_nonzero_exit_and_nothing_written(tmp_path, cli, case):
    data = tmp_path / "data"
    out = tmp_path / "out"
    args = ["--epochs", "1", "-q"]
    if case == "unknown model":
        args += ["--model", "resnet9000"]
        expected = "resnet9000"
    elif case == "empty folder":
        data.mkdir()
        args += ["--data", str(data)]
        expected = str(data)
    elif case == "one class":
        write_png_classes(data, {"only": 3})
        args += ["--data", str(data)]
        expected = "2 classes"
    elif case == "not an image":
        write_png_classes(data, {"a": 3, "b": 3})
        (data / "b" / "broken.png").write_bytes(b"this is not a png")
        args += ["--data", str(data), "--image-size", "8x8"]
        expected = "broken.png"
    elif case == "too small":
        args += ["--model", "model4", "--image-size", "20x20"]
        expected = "too small"
    elif case == "bad size":
        args += ["--image-size", "50by200"]
        expected = "50by200"
    elif case == "absurd size":  # 330 TB for the first dense layer, beyond any address space
        args += ["--image-size", "400000x400000"]
        expected = "out of memory"
    else:
        (tmp_path / "a_file").write_text("x")
        out = tmp_path / "a_file" / "out"
        expected = "a_file"
    result = cli("trainer", "run", "--out", str(out), *args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0], \
        result.stderr
    assert not out.exists() or case == "unwritable out"


def test_models_lists_the_zoo_with_parameter_counts(cli):
    result = cli("trainer", "models")
    assert result.returncode == 0, result.stderr
    names = [line.split()[0] for line in result.stdout.splitlines()[1:]]
    assert names == ["small", "mnist", "model1", "model2", "model3", "model4", "model5",
                     "model6"]


def test_a_python_caller_asking_for_onnx_twins_without_their_writer_is_refused(tmp_path):
    with pytest.raises(InputError, match="no ONNX checkpoint writer"):
        train(TrainConfig(epochs=1, onnx=True), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_writer_runs_after_the_checkpoint_and_before_the_commit(tmp_path):
    class Recorder:
        name = "recorder"

        def __init__(self) -> None:
            self.seen: list[tuple[int, bool, int]] = []

        def write(self, saved: SavedCheckpoint) -> None:
            completed = read_run_info(tmp_path / "run" / "run.h5").completed_epochs
            self.seen.append((saved.epoch, saved.path.exists(), completed))

    recorder = Recorder()
    train(TrainConfig(epochs=2), tmp_path / "run", progress=False,
          checkpoint_writers=[recorder])
    assert recorder.seen == [(1, True, 0), (2, True, 1)]


def test_the_trainer_computes_what_a_plain_loop_computes(tmp_path):
    """Weights bit for bit, curves to rounding, against a hand-written loop (same seeds)."""
    config = TrainConfig(epochs=3, seed=5, batch_size=64)
    run = train(config, tmp_path / "run", progress=False)
    source = open_source("digits")
    plan = plan_splits(source, config.val_fraction, config.seed)
    images, labels = (torch.as_tensor(array) for array in (
        load_split(source, plan, "train", 1, (8, 8)).images, plan.labels["train"]))
    val_images = torch.as_tensor(load_split(source, plan, "val", 1, (8, 8)).images)
    val_labels = torch.as_tensor(plan.labels["val"])
    torch.manual_seed(config.seed)
    model = build_model(ModelSpec("small", 1, (8, 8), 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    curves = read_training_curves(run)
    for epoch in range(1, 4):
        generator = epoch_generator(config.seed, epoch)
        order = torch.randperm(len(labels), generator=generator)
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        model.train()
        losses, hits = [], 0
        for batch in order.split(config.batch_size):
            logits = model(images[batch])
            loss = torch.nn.functional.cross_entropy(logits, labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()) * len(batch))
            hits += int((logits.argmax(1) == labels[batch]).sum())
        model.eval()
        with torch.no_grad():
            logits = model(val_images)
        val_loss = torch.nn.functional.cross_entropy(logits, val_labels, reduction="none")
        val_loss, val_hit = val_loss.double().numpy(), (logits.argmax(1) == val_labels).numpy()
        row = epoch - 1
        np.testing.assert_allclose(curves["train_loss"][row], sum(losses) / len(labels),
                                   rtol=1e-6)
        assert curves["train_accuracy"][row] == hits / len(labels)
        np.testing.assert_allclose(curves["val_loss"][row], val_loss.mean(), rtol=1e-12)
        assert curves["val_accuracy"][row] == val_hit.mean()
        per_class = [val_labels.numpy() == label for label in range(10)]
        np.testing.assert_allclose(curves["val_class_loss"][row],
                                   [val_loss[members].mean() for members in per_class],
                                   rtol=1e-12)
        np.testing.assert_array_equal(curves["val_class_accuracy"][row],
                                      [val_hit[members].mean() for members in per_class])
        stored, _ = load_checkpoint(run.parent / "checkpoints" / curves["checkpoint_file"][row])
        assert stored.keys() == model.state_dict().keys()
        for name, tensor in model.state_dict().items():
            assert torch.equal(stored[name], tensor), (epoch, name)


def start_training(out: Path, epochs: int, resume: bool = False,
                   onnx: bool = False) -> subprocess.Popen:
    args = [*script("trainer"), "run", "--out", str(out), "--epochs", str(epochs), "-q",
            *(["--onnx"] if onnx else [])]
    if resume:  # the run's own config, --onnx included, comes from the run file
        args = [*script("trainer"), "run", "--out", str(out), "--resume", "-q"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for_checkpoint(out: Path, epoch: int, process: subprocess.Popen) -> bool:
    target = out / "checkpoints" / f"epoch_{epoch:04d}.safetensors"
    while not target.exists():
        if process.poll() is not None:
            return False
        time.sleep(0.005)
    return True


def wait_for_twinless_checkpoint(out: Path, process: subprocess.Popen) -> bool:
    """Wait until a checkpoint is on disk without its ONNX twin (``trainer run --onnx``
    writes the twin after the checkpoint, before the epoch's commit)."""
    while not any(not path.with_suffix(".onnx").exists()
                  for path in (out / "checkpoints").glob("*.safetensors")):
        if process.poll() is not None:
            return False
        time.sleep(0.002)
    return True


def assert_complete_epochs_are_whole(run_file: Path, onnx: bool = False) -> int:
    with h5py.File(run_file, "r", locking=False) as handle:
        completed = int(handle["training/completed_epochs"][()])
        for name in CURVES:
            assert np.isfinite(handle["training"][name][:completed]).all(), name
        files = handle["training/checkpoint_file"][:completed]
    for file_name in files:
        checkpoint = run_file.parent / "checkpoints" / file_name.decode()
        assert checkpoint.exists()
        assert checkpoint.with_suffix(".onnx").exists() == onnx
    return completed


@pytest.mark.slow
@pytest.mark.parametrize("onnx", [False, True], ids=["checkpoints", "checkpoints+onnx"])
def test_kill_nine_then_resume_equals_an_uninterrupted_run(tmp_path, onnx):
    epochs = 12
    reference = tmp_path / "reference"
    finished = start_training(reference, epochs, onnx=onnx)
    assert finished.wait(300) == 0, finished.stderr.read()

    killed = tmp_path / "killed"
    process = start_training(killed, epochs, onnx=onnx)
    rng = random.Random(1)
    kills = checkpoints_without_onnx = 0
    # The second process, with --onnx, is killed between a checkpoint and its ONNX file (its
    # first twin waits for the Grad-CAM graph's trace, seconds); the others at random.
    for kill_after in (2, 3, 6):
        if onnx and kill_after == 3:
            reached = wait_for_twinless_checkpoint(killed, process)
        else:
            reached = wait_for_checkpoint(killed, kill_after, process)
            time.sleep(rng.uniform(0, 0.05))  # somewhere inside the next epoch or its commit
        if reached:
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills += 1
            checkpoints_without_onnx += any(
                not path.with_suffix(".onnx").exists()
                for path in (killed / "checkpoints").glob("*.safetensors"))
        assert assert_complete_epochs_are_whole(killed / "run.h5", onnx) >= 1
        process = start_training(killed, epochs, resume=True)
    assert process.wait(300) == 0, process.stderr.read()
    assert kills >= 2
    if onnx:
        assert checkpoints_without_onnx >= 1

    reference_curves = read_training_curves(reference / "run.h5")
    resumed_curves = read_training_curves(killed / "run.h5")
    assert resumed_curves["epoch"].tolist() == list(range(1, epochs + 1))
    for name in CURVES:
        np.testing.assert_array_equal(resumed_curves[name], reference_curves[name], err_msg=name)
    np.testing.assert_array_equal(resumed_curves["checkpoint_sha256"],
                                  reference_curves["checkpoint_sha256"])
    assert tree(killed / "checkpoints") == tree(reference / "checkpoints")


def test_a_second_trainer_in_the_same_folder_is_refused_while_the_first_runs(tmp_path, cli):
    out = tmp_path / "run"
    first = start_training(out, 300)
    try:
        assert wait_for_checkpoint(out, 1, first), first.stderr.read()
        for extra in (["--epochs", "3", "--force"], ["--resume"]):
            second = cli("trainer", "run", "--out", str(out), "-q", *extra)
            assert second.returncode == 1
            assert second.stderr.strip() == f"Error: another trainer is running in {out}"
    finally:
        first.kill()
        first.wait()
    resumed = cli("trainer", "run", "--out", str(out), "--resume", "-q")  # the lock died with it
    assert resumed.returncode == 0, resumed.stderr
    assert read_run_info(out / "run.h5").completed_epochs == 300
