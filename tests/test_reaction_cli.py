"""`analyzer reaction` end to end through the real console script, on real files."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from store.checkpoints import load_checkpoint, save_checkpoint
from store.datasets import open_source
from store.runfile import read_run_info
from tests.conftest import ROOT, assert_only_computed_rows_differ, script, write_rgb_classes
from trainer.models import ModelSpec, build_model, gradcam_layer


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 6-epoch run of the default model on the embedded digits."""
    out = tmp_path_factory.mktemp("run") / "demo"
    result = subprocess.run([*script("trainer"), "run", "--out", str(out), "--epochs", "6",
                             "-q"], capture_output=True, text=True, check=False,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def epoch_1_analysed(trained, tmp_path_factory) -> Path:
    """A copy of ``trained`` whose epoch 1 has its Reaction (the bad-input cases' start)."""
    run = copy_run(trained, tmp_path_factory.mktemp("epoch1"))
    analysed = subprocess.run([*script("analyzer"), "reaction", "--ckpt-dir",
                               str(run / "checkpoints"), "--epochs", "1", "-q"],
                              capture_output=True, text=True, check=False,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert analysed.returncode == 0, analysed.stderr
    return run


def copy_run(trained: Path, tmp_path: Path) -> Path:
    target = tmp_path / "demo"
    subprocess.run(["cp", "-r", str(trained), str(target)], check=True)
    return target


def reference_reaction(model: torch.nn.Module, layer: str, images: np.ndarray,
                       labels: np.ndarray) -> np.ndarray:
    """Per-image float64 Grad-CAM and Reaction, written independently of the analyzer."""
    model = model.double().eval()
    module = dict(model.named_modules())[layer]
    values = []
    for image, label in zip(images, labels, strict=True):
        stored = {}

        def keep(_module, _inputs, output, stored=stored):
            stored["a"] = output
        handle = module.register_forward_hook(keep)
        logits = model(torch.as_tensor(image[None], dtype=torch.float64))
        handle.remove()
        (gradient,) = torch.autograd.grad(logits[0, int(label)], stored["a"])
        activation = stored["a"][0].detach()
        alpha = gradient[0].mean(dim=(1, 2))
        cam = torch.relu((alpha[:, None, None] * activation).sum(0))
        positive = int((cam > 0).sum())
        values.append(float(cam.sum()) / positive if positive else 0.0)
    return np.array(values)


def test_reaction_of_every_checkpoint_and_split_matches_a_float64_loop(trained, tmp_path, cli):
    run = copy_run(trained, tmp_path)
    result = cli("analyzer", "reaction", "--ckpt-dir", str(run / "checkpoints"), "-q")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"results: {run / 'run.h5'}"
    info = read_run_info(run / "run.h5")
    source = open_source("digits")
    tensors, metadata = load_checkpoint(run / "checkpoints" / "epoch_0004.safetensors")
    spec = ModelSpec.from_json(metadata["model"])
    with h5py.File(run / "run.h5", "r") as handle:
        for split in ("train", "val", "test"):
            group = handle[f"reaction/{split}"]
            assert group["computed"][()].tolist() == [1] * 6
            assert group.attrs["layer"] == gradcam_layer("small")
            ids = info.split_ids[split][:40]
            labels = info.split_labels[split][:40]
            model = build_model(spec)
            model.load_state_dict(tensors)
            expected = reference_reaction(model, gradcam_layer("small"),
                                          source.load(ids, 1, (8, 8),
                                                      which="test" if split == "test"
                                                      else "train"), labels)
            stored = group["image_reaction"][3, :40]
            np.testing.assert_allclose(stored, expected, rtol=1e-5, atol=1e-7)
            assert np.isfinite(group["class_reaction"][()]).all()
            assert (group["empty_maps"][()] >= 0).all()


def test_accuracy_and_loss_per_class_match_an_independent_evaluation(trained, tmp_path, cli):
    run = copy_run(trained, tmp_path)
    assert cli("analyzer", "reaction", "--ckpt-dir", str(run / "checkpoints"), "--splits",
               "test", "--epochs", "6", "-q").returncode == 0
    info = read_run_info(run / "run.h5")
    tensors, metadata = load_checkpoint(run / "checkpoints" / "epoch_0006.safetensors")
    model = build_model(ModelSpec.from_json(metadata["model"]))
    model.load_state_dict(tensors)
    model.eval()
    images = open_source("digits").load(info.split_ids["test"], 1, (8, 8), which="test")
    labels = info.split_labels["test"]
    with torch.no_grad():
        logits = model(torch.as_tensor(images)).double()
    losses = torch.nn.functional.cross_entropy(logits, torch.as_tensor(labels),
                                               reduction="none").numpy()
    hits = (logits.argmax(1).numpy() == labels)
    with h5py.File(run / "run.h5", "r") as handle:
        group = handle["reaction/test"]
        row = list(group["epoch"][()]).index(6)
        assert group["computed"][()].sum() == 1
        for label in range(10):
            mine = labels == label
            assert group["accuracy"][row, label] == pytest.approx(hits[mine].mean())
            assert group["loss"][row, label] == pytest.approx(losses[mine].mean(), rel=1e-5)
        assert "reaction/train" not in handle


def test_a_rerun_skips_what_is_done_and_other_settings_are_refused(trained, tmp_path, cli):
    run = copy_run(trained, tmp_path)
    assert cli("analyzer", "reaction", "--ckpt-dir", str(run / "checkpoints"), "--epochs",
               "1:6:2", "-q").returncode == 0
    with h5py.File(run / "run.h5", "r") as handle:
        assert handle["reaction/train/computed"][()][:6].tolist() == [1, 0, 1, 0, 1, 0]
    done = cli("analyzer", "reaction", "--ckpt-dir", str(run / "checkpoints"), "--epochs",
               "1:6:2")  # no -q: it would silence the note
    assert done.returncode == 0 and "already analysed" in done.stderr
    before = (run / "run.h5").read_bytes()
    refused = cli("analyzer", "reaction", "--ckpt-dir", str(run / "checkpoints"), "--score",
                  "softmax", "-q")
    assert refused.returncode != 0
    assert "score='logit'" in refused.stderr and "--out" in refused.stderr
    assert (run / "run.h5").read_bytes() == before
    side = cli("analyzer", "reaction", "--ckpt-dir", str(run / "checkpoints"), "--score",
               "softmax", "--epochs", "2", "--out", str(tmp_path / "softmax.h5"), "-q")
    assert side.returncode == 0, side.stderr
    assert (run / "run.h5").read_bytes() == before


@pytest.mark.parametrize("case", ["truncated", "wrong model", "no such layer", "pickle",
                                  "class count", "no epoch selected", "huge epoch range",
                                  "no such device", "lock cannot be opened",
                                  "another run's file", "checkpoint replaced since"])
def test_bad_input_is_one_line_and_earlier_results_stay(epoch_1_analysed, tmp_path, cli, case):
    run = copy_run(epoch_1_analysed, tmp_path)
    before = (run / "run.h5").read_bytes()
    args = ["--ckpt-dir", str(run / "checkpoints"), "-q"]
    if case == "truncated":
        path = run / "checkpoints" / "epoch_0003.safetensors"
        path.write_bytes(path.read_bytes()[:100])
        expected = "epoch_0003.safetensors"
    elif case == "wrong model":
        args += ["--model", "mnist", "--image-size", "28x28"]
        expected = "missing"
    elif case == "no such layer":
        args += ["--layer", "features.55"]
        expected = "features.5"
    elif case == "pickle":
        torch.save({"weights": Path("x")}, run / "checkpoints" / "epoch_0007.pt")
        expected = "weights_only"
    elif case == "no epoch selected":
        args += ["--epochs", "10:20"]
        expected = "selects none of the 6 checkpoints (epochs 1–6)"
    elif case == "huge epoch range":  # filtered, never built: no memory blow-up
        args += ["--epochs", "7:99999999999999999"]
        expected = "selects none"
    elif case == "no such device":
        args += ["--device", "banana"]
        expected = "'banana' is not a device"
    elif case == "lock cannot be opened":  # as a read-only folder for a non-owner (CI is root)
        (run / "run.h5.lock").unlink()
        (run / "run.h5.lock").mkdir()
        expected = "cannot write in"
    elif case == "checkpoint replaced since":  # epoch 1's results are stored above
        folder = run / "checkpoints"
        (folder / "epoch_0001.safetensors").write_bytes(
            (folder / "epoch_0002.safetensors").read_bytes())
        expected = "epoch_0001.safetensors changed since its results were stored"
    elif case == "another run's file":  # same classes, other train/val images (seed 1)
        other = tmp_path / "other"
        assert cli("trainer", "run", "--out", str(other), "--epochs", "1", "--seed", "1",
                   "-q").returncode == 0
        other_before = (other / "run.h5").read_bytes()
        args += ["--out", str(other / "run.h5")]
        expected = "is the run file of other data"
    else:
        data = tmp_path / "folder"
        for name in ("x", "y", "z"):
            (data / name).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(data / name / "0.png")
        args += ["--data", f"train={data}", "--out", str(tmp_path / "other.h5")]
        expected = "classes"
    result = cli("analyzer", "reaction", *args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: ") and expected in lines[-1], result.stderr
    assert not any(line.startswith("Traceback") for line in lines)
    with h5py.File(run / "run.h5", "r") as handle:
        kept = handle["reaction/train/image_reaction"][0]
    assert np.isfinite(kept).all()
    if case in ("truncated", "pickle"):  # found after epochs 2.. were computed and stored
        (tmp_path / "before.h5").write_bytes(before)
        assert_only_computed_rows_differ(tmp_path / "before.h5", run / "run.h5")
        with h5py.File(run / "run.h5", "r") as handle:
            assert handle["reaction/train/computed"][()].sum() >= 2
    else:  # caught before any write
        assert (run / "run.h5").read_bytes() == before
    if case == "another run's file":
        assert (other / "run.h5").read_bytes() == other_before


@pytest.mark.slow
def test_kill_nine_mid_run_then_rerun_equals_an_uninterrupted_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "long"
    subprocess.run([*script("trainer"), "run", "--out", str(out), "--epochs", "40", "-q"],
                   check=True, env=env)
    reference = tmp_path / "reference"
    subprocess.run(["cp", "-r", str(out), str(reference)], check=True)
    command = [*script("analyzer"), "reaction", "-q", "--batch-size", "64"]
    subprocess.run([*command, "--ckpt-dir", str(reference / "checkpoints")], check=True,
                   env=env)

    process = subprocess.Popen([*command, "--ckpt-dir", str(out / "checkpoints")], env=env,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        with h5py.File(out / "run.h5", "r", locking=False) as handle:
            group = handle.get("reaction/test")
            if group is not None and group["computed"][()].sum() >= 8:
                break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    with h5py.File(out / "run.h5", "r") as handle:
        partial = int(handle["reaction/test/computed"][()].sum())
    assert 0 < partial < 40, "the kill should land mid-run"
    subprocess.run([*command, "--ckpt-dir", str(out / "checkpoints")], check=True, env=env)
    with h5py.File(out / "run.h5", "r") as done, h5py.File(reference / "run.h5", "r") as ref:
        for split in ("train", "val", "test"):
            for name in ("image_reaction", "prediction", "class_reaction", "accuracy", "loss",
                         "empty_maps", "model_reaction", "computed", "checkpoint_sha256"):
                np.testing.assert_array_equal(done[f"reaction/{split}/{name}"][()],
                                              ref[f"reaction/{split}/{name}"][()],
                                              err_msg=f"{split}/{name}")


FOREIGN_MODULE = '''
import torch
from torch import nn


class Residual(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.conv1(x)))


class Net(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
                                  Residual(6), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(6, num_classes))

    def forward(self, x):
        return self.head(self.body(x))


def make_cnn(num_classes):
    return Net(num_classes)
'''


def test_foreign_lightning_checkpoints_with_a_residual_model_and_image_folders(tmp_path, cli):
    (tmp_path / "mynets.py").write_text(FOREIGN_MODULE)
    import importlib.util
    spec = importlib.util.spec_from_file_location("mynets_test_copy", tmp_path / "mynets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    data = write_rgb_classes(tmp_path / "images", ("arabic", "greek", "thai"), 5)
    checkpoints = tmp_path / "ckpts"
    checkpoints.mkdir()
    models = {}
    for epoch in (1, 2):
        torch.manual_seed(epoch)
        model = module.make_cnn(3)
        model.body[1].running_mean.uniform_(-0.5, 0.5)
        models[epoch] = model
        torch.save({"epoch": epoch, "state_dict": {f"model.{k}": v for k, v in
                                                   model.state_dict().items()}},
                   checkpoints / f"run-epoch={epoch}-step={epoch * 10}.ckpt")
    (checkpoints / "notes.txt").write_text("not a checkpoint")
    out = tmp_path / "reaction.h5"
    result = cli("analyzer", "reaction", "--ckpt-dir", str(checkpoints), "--model",
                 "mynets:make_cnn", "--layer", "body.4", "--data", f"train={data}",
                 "--image-size", "10x14", "--channels", "3", "--out", str(out),
                 cwd=tmp_path)  # no -q: it would silence the note
    assert result.returncode == 0, result.stderr
    assert "ignoring notes.txt" in result.stderr
    with h5py.File(out, "r") as handle:
        group = handle["reaction/train"]
        assert group["epoch"][()].tolist() == [1, 2]
        ids = [v.decode() for v in group["image"][()]]
        labels = group["label"][()]
        for row, epoch in enumerate((1, 2)):
            images = np.stack([np.asarray(Image.open(data / i).convert("RGB"), np.float32)
                               .transpose(2, 0, 1) / 255 for i in ids])
            expected = reference_reaction(models[epoch], "body.4", images, labels)
            np.testing.assert_allclose(group["image_reaction"][row], expected, rtol=1e-5,
                                       atol=1e-7)


def test_a_tilde_in_a_data_folder_means_the_home_folder(tmp_path, monkeypatch):
    from analyzer.inputs import parse_data_options

    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse_data_options(("train=~/siw13/train",)) == {"train": tmp_path / "siw13/train"}


def test_a_diverged_checkpoint_is_stored_as_nan_with_a_note(trained, tmp_path, cli):
    run = copy_run(trained, tmp_path)
    path = run / "checkpoints" / "epoch_0002.safetensors"
    tensors, metadata = load_checkpoint(path)
    tensors["classifier.1.weight"][0, 0] = float("nan")  # the first dense layer
    save_checkpoint(path, tensors, metadata)
    result = cli("analyzer", "reaction", "--ckpt-dir", str(run / "checkpoints"), "--epochs",
                 "1:2", "--splits", "val", "--out", str(tmp_path / "r.h5"))  # no -q: no note
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("note:")] == [
        "note: epoch_0002.safetensors: the network's outputs are not finite on val images "
        "(diverged training?): its Reaction and loss are stored as NaN"]
    with h5py.File(tmp_path / "r.h5", "r") as handle:
        loss = handle["reaction/val/loss"][()]
    assert np.isfinite(loss[0]).all() and np.isnan(loss[1]).all()
