"""`analyzer features`: the strongest activation, its deconvnet projection and receptive field,
checked against plain loops and a deconvnet written out layer by layer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr
from click.testing import CliRunner
from torch import nn

from analyzer.deconvnet import project_to_pixels, receptive_fields
from analyzer.features import FeatureOptions, compute_features, feature_epochs, parse_channels
from cli import analyzer
from store.checkpoints import load_checkpoint
from store.datasets import open_source
from store.errors import InputError
from store.runfile import read_run_info
from tests.test_filters import EPOCHS, trained_run
from trainer.models import ModelSpec, build_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 3-epoch run of the default model on the embedded digits (shared, read only)."""
    return trained_run(tmp_path_factory)


class TinyNet(nn.Module):
    """conv 3×3 → ReLU → max-pool 2 → conv 3×3 → ReLU; ``functional`` uses F.relu instead
    of ReLU modules (the deconvnet must catch both)."""

    def __init__(self, functional: bool = False, padding: int = 0) -> None:
        super().__init__()
        self.functional = functional
        self.conv1 = nn.Conv2d(1, 2, 3, padding=padding)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(2, 3, 3, padding=padding)
        self.relu2 = nn.ReLU()
        self.top = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rectify1 = F.relu if self.functional else self.relu1
        rectify2 = F.relu if self.functional else self.relu2
        x = F.max_pool2d(rectify1(self.conv1(x)), 2)
        return self.top(rectify2(self.conv2(x)))


def manual_projection(net: TinyNet, image: torch.Tensor, channel: int, row: int, col: int,
                      guided: bool = False) -> torch.Tensor:
    """Zeiler & Fergus's deconvnet for TinyNet, step by step in float64: forward with the
    pooling switches, then unpool, rectify and filter with the transposed kernels. ``guided``:
    rectification also keeps only where the forward pass was positive (guided backprop)."""
    w1, b1 = net.conv1.weight.detach().double(), net.conv1.bias.detach().double()
    w2, b2 = net.conv2.weight.detach().double(), net.conv2.bias.detach().double()
    x = image.double()[None]
    a1 = F.conv2d(x, w1, b1, padding=net.conv1.padding)
    p1, switches = F.max_pool2d(torch.relu(a1), 2, return_indices=True)
    a2 = F.conv2d(p1, w2, b2, padding=net.conv2.padding)
    r2 = torch.relu(a2)
    signal = torch.zeros_like(r2)
    signal[0, channel, row, col] = r2[0, channel, row, col]
    signal = torch.relu(signal) * ((a2 > 0) if guided else 1)  # the layer's own rectification
    down = F.conv_transpose2d(signal, w2, padding=net.conv2.padding)
    down = F.max_unpool2d(down, switches, 2, output_size=a1.shape[-2:])
    down = torch.relu(down) * ((a1 > 0) if guided else 1)
    return F.conv_transpose2d(down, w1, padding=net.conv1.padding)[0]


@pytest.mark.parametrize("method", ["deconvnet", "guided"])
@pytest.mark.parametrize("functional", [False, True])
def test_the_projection_equals_one_written_layer_by_layer(functional, method):
    torch.manual_seed(0)
    net = TinyNet(functional).eval()
    images = torch.rand(4, 1, 10, 10)
    channels, rows, cols = (torch.tensor(v) for v in ([0, 1, 2, 1], [0, 1, 0, 1], [1, 0, 0, 1]))
    projection = project_to_pixels(net, net.relu2 if not functional else net.top,
                                   "relu2", images, channels, rows, cols, method)
    assert projection.rectifiers == 2  # one ReLU call per layer, for the whole batch
    for r in range(4):
        expected = manual_projection(net, images[r], int(channels[r]), int(rows[r]),
                                     int(cols[r]), guided=method == "guided")
        np.testing.assert_allclose(projection.pixels[r].numpy(), expected.numpy(),
                                   rtol=1e-5, atol=1e-6)
    assert (projection.pixels.abs().flatten(1).amax(1) > 0).sum() >= 2  # not all zero


def test_deconvnet_and_guided_differ_where_the_forward_pass_was_negative():
    torch.manual_seed(0)
    net = TinyNet().eval()
    images = torch.rand(2, 1, 10, 10)
    where = (torch.tensor([0, 2]), torch.tensor([1, 0]), torch.tensor([0, 1]))
    deconvnet = project_to_pixels(net, net.relu2, "relu2", images, *where).pixels
    guided = project_to_pixels(net, net.relu2, "relu2", images, *where, "guided").pixels
    assert not torch.allclose(deconvnet, guided)


def test_the_projection_is_not_the_plain_gradient():
    torch.manual_seed(3)
    net = TinyNet().eval()
    image = torch.rand(1, 1, 10, 10, requires_grad=True)
    channel, row, col = torch.tensor([1]), torch.tensor([1]), torch.tensor([1])
    projection = project_to_pixels(net, net.relu2, "relu2", image.detach(), channel, row,
                                      col).pixels
    out = F.relu(net.conv2(F.max_pool2d(F.relu(net.conv1(image)), 2)))
    (gradient,) = torch.autograd.grad(out[0, 1, 1, 1] * out[0, 1, 1, 1].detach(), image)
    assert not torch.allclose(projection, gradient)  # negative signals pass the gradient


def test_without_relus_the_projection_is_the_gradient_times_the_activation():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3)).eval()
    image = torch.rand(1, 1, 7, 7, requires_grad=True)
    projection = project_to_pixels(net, net[1], "1", image.detach(), torch.tensor([1]),
                                   torch.tensor([2]), torch.tensor([0]))
    assert projection.rectifiers == 0
    value = net(image)[0, 1, 2, 0]
    (gradient,) = torch.autograd.grad(value, image)
    torch.testing.assert_close(projection.pixels, gradient * value.detach())


def test_receptive_fields_worked_out_on_paper():
    net = TinyNet().eval()
    # 10×10 → conv 8×8 → pool 4×4 → conv 2×2; position y of the top sees pool rows y…y+2,
    # i.e. input rows 2y … 2(y+2)+1+2 = 2y+7: the box [2y, 2y+8)
    boxes = receptive_fields(net, net.relu2, "relu2", (1, 10, 10), torch.tensor([0, 2, 1]),
                             torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]))
    assert boxes.tolist() == [[0, 8, 0, 8], [2, 10, 0, 8], [2, 10, 2, 10]]
    padded = TinyNet(padding=1).eval()
    # padding 1: 10×10 → 10×10 → 5×5 → 5×5; top position 0 sees pool rows −1…1 → input
    # rows 0…3 and one more for the first conv's padding: [0, 5), clipped at the border
    boxes = receptive_fields(padded, padded.relu2, "relu2", (1, 10, 10), torch.tensor([0]),
                             torch.tensor([0]), torch.tensor([4]))
    assert boxes.tolist() == [[0, 5, 5, 10]]


def loop_strongest(model: nn.Module, layer: str, images: np.ndarray,
                   channels: list[int]) -> list[tuple[int, int, int, float]]:
    """(image, row, col, value) of each channel's strongest activation: a plain loop over
    images and positions in float64; the first one wins on ties."""
    model = model.double().eval()
    module = dict(model.named_modules())[layer]
    kept = {}
    handle = module.register_forward_hook(lambda m, i, o: kept.update(a=o))
    best = {c: (-1, -1, -1, -np.inf) for c in channels}
    with torch.no_grad():
        for n, image in enumerate(images):
            model(torch.as_tensor(image[None], dtype=torch.float64))
            activation = kept["a"][0].numpy()
            for c in channels:
                for y in range(activation.shape[1]):
                    for x in range(activation.shape[2]):
                        if activation[c, y, x] > best[c][3]:
                            best[c] = (n, y, x, float(activation[c, y, x]))
    handle.remove()
    return [best[c] for c in channels]


def test_the_strongest_activation_over_the_training_images_matches_a_plain_loop(trained):
    computed = compute_features(FeatureOptions(
        ckpt_dir=trained / "checkpoints", epochs=f"1,{EPOCHS}", channels="0:32:5",
        batch_size=100, device="cpu"))
    evolution, run_file = computed.evolution, computed.run_file
    assert computed.class_names == [str(c) for c in range(10)]
    assert run_file == trained / "run.h5"
    assert evolution.channels.tolist() == [0, 5, 10, 15, 20, 25, 30]
    info = read_run_info(run_file)
    images = open_source("digits").load(info.split_ids["train"], 1, (8, 8))
    for k, epoch in enumerate((1, EPOCHS)):
        weights, metadata = load_checkpoint(
            trained / "checkpoints" / f"epoch_{epoch:04d}.safetensors")
        model = build_model(ModelSpec.from_json(metadata["model"]))
        model.load_state_dict(weights)
        expected = loop_strongest(model, "features.5", images, evolution.channels.tolist())
        for c, (image, row, col, value) in enumerate(expected):
            assert (evolution.image[k, c], evolution.position_row[k, c],
                    evolution.position_col[k, c]) == (image, row, col)
            assert evolution.activation[k, c] == pytest.approx(value, rel=1e-5)
            assert evolution.image_id[k][c] == info.split_ids["train"][image]
            assert evolution.label[k, c] == info.split_labels["train"][image]
        np.testing.assert_array_equal(evolution.input[k], images[evolution.image[k]])
    # two 3×3 convolutions: a 5×5 patch around the position (the map is 4×4 of 8×8)
    boxes = evolution.patch.reshape(-1, 4)
    rows = evolution.position_row.ravel()
    cols = evolution.position_col.ravel()
    assert boxes.tolist() == [[r, r + 5, c, c + 5] for r, c in zip(rows, cols, strict=True)]


def test_features_command_stores_the_group_and_draws_the_grid(trained, tmp_path):
    run = tmp_path / "demo"
    shutil.copytree(trained, run)
    out = tmp_path / "features.png"
    result = CliRunner().invoke(analyzer, [
        "features", "--ckpt-dir", str(run / "checkpoints"), "--channels", "0,3",
        "--out", str(out), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    assert f"stored in {run / 'run.h5'}:/features/features.5" in result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads(result.stdout)
    with h5py.File(run / "run.h5", "r") as handle:
        group = handle["features/features.5"]
        assert [(r["epoch"], r["channel"]) for r in rows] == [
            (e, c) for e in (1, 2, 3) for c in (0, 3)]
        assert [r["image"] for r in rows] == group["image"][()].ravel().tolist()
        assert [r["activation"] for r in rows] == group["activation"][()].ravel().tolist()
        assert [r["patch"][0] for r in rows] == group["patch_row_start"][()].ravel().tolist()
        assert group.attrs["method"] == "deconvnet" and group.attrs["split"] == "train"
        assert group["epoch"][()].tolist() == [1, 2, 3]  # the default: nearest 1, 2, and last
        assert group["projection"].shape == (3, 2, 1, 8, 8)
        # outside the receptive field the projection is exactly zero
        for k in range(3):
            for c in range(2):
                top, stop = group["patch_row_start"][k, c], group["patch_row_stop"][k, c]
                left, right = group["patch_col_start"][k, c], group["patch_col_stop"][k, c]
                outside = np.ones((8, 8), bool)
                outside[top:stop, left:right] = False
                assert np.all(group["projection"][k, c, 0][outside] == 0)
    with xr.open_dataset(run / "run.h5", engine="h5netcdf",
                         group="features/features.5") as labelled:
        assert labelled["projection"].dims == ("epoch", "channel", "colour", "row", "col")
    info = CliRunner().invoke(analyzer, ["info", str(run / "run.h5")])
    assert info.exit_code == 0, info.output
    assert "features/features.5: 3 epochs (1, 2, 3), 2 channels, strongest over the train " \
        "images, deconvnet projection" in info.stdout.splitlines()


def test_bad_options_are_one_line(trained, tmp_path):
    for arguments, message in (
            (["--channels", "0:99:50"], "Error: --channels 0:99:50: the layer has channels "
                                        "0–31"),
            (["--channels", "a:b"], "Error: --channels takes START:STOP (e.g. 0:16) or a list "
                                    "(0,3,7), got 'a:b'"),
            (["--layer", "classifier.1"], "Error: layer 'classifier.1' gives (1, 64), not a "
                                          "feature map [batch, channels, height, width]: "
                                          "choose a convolutional layer")):
        result = CliRunner().invoke(analyzer, ["features", "--ckpt-dir",
                                               str(trained / "checkpoints"), "--epochs", "1",
                                               "--device", "cpu", *arguments])
        assert result.exit_code == 1
        assert result.output.strip().splitlines()[-1] == message


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    """Epochs 1 and 3 of ``trained`` as ONNX files only (analyzer export-onnx)."""
    out = tmp_path_factory.mktemp("onnx_only")
    result = CliRunner().invoke(analyzer, ["export-onnx", "--ckpt-dir",
                                           str(trained / "checkpoints"), "--epochs", "1,3",
                                           "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["epoch_0001.onnx", "epoch_0003.onnx"]
    return out


def test_onnx_checkpoints_give_what_their_safetensors_give(trained, exported):
    options = {"epochs": "1,3", "channels": "0:32:5", "device": "cpu", "batch_size": 300,
               "run": trained / "run.h5"}
    from_onnx = compute_features(FeatureOptions(ckpt_dir=exported, **options)).evolution
    reference = compute_features(FeatureOptions(ckpt_dir=trained / "checkpoints",
                                                **options)).evolution
    assert from_onnx.checkpoint_files == ["epoch_0001.onnx", "epoch_0003.onnx"]
    assert from_onnx.epochs.tolist() == [1, 3]
    # the same float32 weights in the same network: the same numbers, bit for bit
    for name in ("image", "position_row", "position_col", "patch", "activation", "projection"):
        np.testing.assert_array_equal(getattr(from_onnx, name), getattr(reference, name))


def test_onnx_checkpoints_that_cannot_be_rebuilt_are_one_line(trained, exported, tmp_path):
    import onnx

    cases = {"garbage": b"not really"}
    model = onnx.load(exported / "epoch_0001.onnx")
    anonymous = onnx.ModelProto()
    anonymous.CopyFrom(model)
    kept = [entry for entry in anonymous.metadata_props if entry.key != "model"]
    del anonymous.metadata_props[:]
    anonymous.metadata_props.extend(kept)
    cases["anonymous"] = anonymous.SerializeToString()
    for tensor in model.graph.initializer:  # as if batch norm had been folded away
        if tensor.name == "features.1.running_var":
            tensor.name = "folded"
    for node in model.graph.node:
        node.input[:] = ["folded" if name == "features.1.running_var" else name
                         for name in node.input]
    cases["folded"] = model.SerializeToString()
    messages = {
        "garbage": "is corrupt or truncated",
        "anonymous": "epoch_0001.onnx does not say which network it holds: give --model",
        "folded": "epoch_0001.onnx: its ONNX weights do not fit the model (missing "
                  "features.1.running_var): give the --model it was exported from"}
    run = tmp_path / "run" / "run.h5"  # names the model: left out for the anonymous file
    run.parent.mkdir()
    shutil.copy(trained / "run.h5", run)
    for case, payload in cases.items():
        folder = tmp_path / case
        folder.mkdir()
        (folder / "epoch_0001.onnx").write_bytes(payload)
        result = CliRunner().invoke(analyzer, [
            "features", "--ckpt-dir", str(folder), "--device", "cpu",
            *([] if case == "anonymous" else ["--run", str(run)])])
        assert result.exit_code == 1, (case, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), (case, result.output)
        assert messages[case] in lines[0], (case, lines[0])


def test_default_epochs_follow_seed_003():
    assert feature_epochs(range(1, 1001)) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
    assert feature_epochs([1, 10, 100, 1000]) == [1, 10, 100, 1000]
    assert parse_channels(None, 8) == list(range(8))
    assert parse_channels("2:", 5) == [2, 3, 4]
    with pytest.raises(InputError, match="at most 64 rows"):
        parse_channels("0:100", 128)


def test_report_shows_the_stored_features_and_leaves_the_section_out_without_them(trained,
                                                                                 tmp_path):
    run = tmp_path / "demo"
    shutil.copytree(trained, run)
    plain = CliRunner().invoke(analyzer, ["report", str(run / "run.h5"), "--out",
                                          str(tmp_path / "plain"), "--no-cam"])
    assert plain.exit_code == 0, plain.output
    assert 'id="features"' not in (tmp_path / "plain" / "index.html").read_text()
    stored = CliRunner().invoke(analyzer, ["features", "--ckpt-dir", str(run / "checkpoints"),
                                           "--channels", "0:2", "--epochs", "1", "-q"])
    assert stored.exit_code == 0, stored.output
    result = CliRunner().invoke(analyzer, ["report", str(run / "run.h5"), "--out",
                                           str(tmp_path / "report"), "--no-cam"])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "report" / "index.html").read_text()
    section = page.split('<h2 id="features">')[1]
    assert section.startswith("Feature evolution (seed 003 fig. 4)</h2>")
    assert '<figure id="features_1"><img alt="Feature evolution' in section
    assert "layer features.5, train images, epochs 1" in section
    assert '<a href="#features">' in page


FOREIGN_MODEL = '''
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    """Another trainer's network: functional ReLUs, a pool, global average pooling."""

    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.block = nn.Conv2d(4, 6, 3)
        self.head = nn.Linear(6, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.stem(x)), 2)
        x = F.relu(self.block(x))
        return self.head(x.mean(dim=(2, 3)))
'''


def test_a_foreign_model_with_functional_relus_from_pt_files(tmp_path):
    from tests.conftest import write_rgb_classes

    data = write_rgb_classes(tmp_path / "data", ("a", "b"), 3)
    (tmp_path / "foreign_net.py").write_text(FOREIGN_MODEL)
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    import importlib.util

    spec = importlib.util.spec_from_file_location("foreign_net", tmp_path / "foreign_net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    nets = []
    for epoch in (1, 2):
        torch.manual_seed(epoch)
        nets.append(module.Net(3, 2).eval())
        torch.save(nets[-1].state_dict(), ckpts / f"ckpt_{epoch}.pt")
    results = tmp_path / "features.h5"
    result = CliRunner().invoke(analyzer, [
        "features", "--ckpt-dir", str(ckpts), "--model", f"{tmp_path / 'foreign_net.py'}:Net",
        "--layer", "block", "--data", f"train={data}", "--image-size", "10x14",
        "--input-channels", "3", "--results", str(results), "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    with h5py.File(results, "r") as handle:
        assert handle.attrs["format"] == "reaction-results"
        assert json.loads(handle.attrs["classes"]) == ["a", "b"]
        group = handle["features/block"]
        assert group["channel"][()].tolist() == list(range(6))
        images = np.stack([group["input"][0, c] for c in range(6)])
        for k, net in enumerate(nets):
            # 'block' is the conv itself (the ReLU is functional, after it)
            expected = loop_strongest(net, "block", _folder_images(data), list(range(6)))
            assert [tuple(v) for v in zip(group["image"][k], group["position_row"][k],
                                          group["position_col"][k], strict=True)] == \
                [e[:3] for e in expected]
        assert images.shape == (6, 3, 10, 14)
        # receptive field worked out on paper: position y of 'block' sees pool rows y … y+2,
        # stem rows 2y … 2y+5, input rows 2y−1 … 2y+6 (the stem pads by 1), clipped
        for name, size in (("row", 10), ("col", 14)):
            position = group[f"position_{name}"][()]
            np.testing.assert_array_equal(group[f"patch_{name}_start"][()],
                                          np.maximum(0, 2 * position - 1))
            np.testing.assert_array_equal(group[f"patch_{name}_stop"][()],
                                          np.minimum(size, 2 * position + 7))


def _folder_images(folder: Path) -> np.ndarray:
    from store.datasets import folder_images, read_folder_images

    _, ids, _ = folder_images(folder)
    return read_folder_images(folder, ids, 3, (10, 14))


def test_a_torch_export_program_gives_what_its_safetensors_checkpoint_gives(trained, tmp_path):
    run = tmp_path / "demo"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("checkpoints"))
    (run / "programs").mkdir()
    weights, metadata = load_checkpoint(trained / "checkpoints" / "epoch_0003.safetensors")
    model = build_model(ModelSpec.from_json(metadata["model"]))
    model.load_state_dict(weights)
    program = torch.export.export(model.eval(), (torch.zeros(2, 1, 8, 8),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, run / "programs" / "epoch_0003.pt2")
    options = {"epochs": "3", "channels": "0:32:7", "device": "cpu", "batch_size": 200}
    exported = compute_features(FeatureOptions(ckpt_dir=run / "programs", **options)).evolution
    reference = compute_features(FeatureOptions(ckpt_dir=trained / "checkpoints",
                                                **options)).evolution
    for name in ("image", "position_row", "position_col", "patch"):
        np.testing.assert_array_equal(getattr(exported, name), getattr(reference, name))
    np.testing.assert_allclose(exported.activation, reference.activation, rtol=1e-5)
    np.testing.assert_allclose(exported.projection, reference.projection, rtol=1e-4,
                               atol=1e-6)
