"""`analyzer occlusion`: maps checked on paper and against a per-position loop, stored, drawn.

A network whose probability map can be written on paper (its logit is ln 2 times the sum of
the pixels) pins the definitions; the batched maps of a really trained checkpoint are checked
against a plain loop, one forward per position in float64, written here. The inputs are real:
a short run of the real trainer (shared with ``test_figures.py``), copied so that the maps
written here stay out of the other tests' run file.
"""

from __future__ import annotations

import math
import shutil
from fractions import Fraction
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sklearn.datasets import load_digits
from torch import nn

from analyzer.occlusion import occlusion_maps, patch_positions
from analyzer.occlusion_figures import map_extent, occlusion_figure, sensitivity_figure
from analyzer.occlusion_pass import (
    OcclusionOptions,
    compute_occlusion,
    default_patch,
    parse_fill,
)
from analyzer.pass_setup import PassRequest
from analyzer.report import ReportContent, ReportOptions, render_html, write_report
from analyzer.torch_backend import TorchBackend
from cli import analyzer
from store.errors import InputError
from store.model_files import load_weights_file
from store.occlusion import read_occlusion
from store.runfile import read_run_info
from store.spec import ReactionSpec
from tests.conftest import run_cli
from tests.test_figures import analysed_runs
from trainer.models import ModelSpec, build_model

LN2 = math.log(2)


class PixelSum(nn.Module):
    """z_0 = ln 2 · S, z_1 = 0 for S the sum of the pixels, so p_0 = 2^S / (2^S + 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(1, 1, kernel_size=1, bias=False)
        self.classifier = nn.Linear(1, 2)
        with torch.no_grad():
            self.features.weight.fill_(LN2)
            self.classifier.weight.copy_(torch.tensor([[1.0], [0.0]]))
            self.classifier.bias.zero_()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images).sum(dim=(1, 2, 3))[:, None])


def p0(pixel_sum: int) -> Fraction:
    """Class 0's probability for a whole pixel sum S, on paper: 2^S / (2^S + 1)."""
    return Fraction(2**pixel_sum, 2**pixel_sum + 1)


def occlusion_options(*, ckpt_dir: Path, run: Path | None = None, model: str | None = None,
                      split: str = "train", device: str = "cpu",
                      **options: object) -> OcclusionOptions:
    """The options of `analyzer occlusion` with these checkpoints and network, on the CPU."""
    return OcclusionOptions(PassRequest(ckpt_dir=ckpt_dir, run=run, model=model,
                                        splits=[split], device=device), **options)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A copy of the shared 4-epoch digits run: ``<copy>/run.h5`` and its checkpoints."""
    source = analysed_runs(tmp_path_factory)[0].parent
    target = tmp_path_factory.mktemp("occlusion") / "run"
    shutil.copytree(source, target)
    return target


@pytest.fixture(scope="module")
def stored(run) -> tuple[Path, object]:
    """`analyzer occlusion` of 3 train images at epochs 1 and 4, patch 3, stride 2."""
    result = compute_occlusion(occlusion_options(ckpt_dir=run / "checkpoints", epochs="1,4",
                                                images=3, patch=3, stride=2))
    return run / "run.h5", result


# --- the definitions, on paper -----------------------------------------------------------

def test_patch_positions_keep_the_square_inside_the_image():
    assert patch_positions(8, 3, 1) == [0, 1, 2, 3, 4, 5]
    assert patch_positions(50, 10, 5) == [0, 5, 10, 15, 20, 25, 30, 35, 40]
    assert len(patch_positions(200, 10, 5)) == 39
    assert patch_positions(3, 2, 2) == [0]
    assert patch_positions(4, 4, 3) == [0]
    with pytest.raises(ValueError):
        patch_positions(3, 4, 1)


def test_default_patch_is_a_fifth_of_the_shorter_side():
    assert default_patch(50, 200) == 10
    assert default_patch(8, 8) == 2
    assert default_patch(28, 28) == 6
    assert default_patch(3, 100) == 1


@pytest.mark.parametrize("batch_size", [1, 3, 256])
def test_pixel_sum_network_gives_the_hand_derived_maps(batch_size):
    # Image A (true class 0): S = 4. A 2x2 square of 0 at (r, c) removes the four pixels
    # under it: (0,0) covers 1+0+0+1 = 2, (0,1) 0+0+1+0 = 1, (1,0) 0+1+0+0 = 1,
    # (1,1) 1+0+0+2 = 3, so S = 2, 3, 3, 1 and p_0 = 4/5, 8/9, 8/9, 2/3; without it 16/17.
    # Image B (true class 1) is black: S = 0 everywhere, p_1 = 1/2, sensitivity 0.
    backend = TorchBackend(PixelSum(), ReactionSpec("features"), "cpu")
    images = torch.tensor([[[[1.0, 0, 0], [0, 1, 0], [0, 0, 2]]], [[[0.0, 0, 0]] * 3]])
    targets = torch.tensor([0, 1])
    maps = occlusion_maps(backend.logits, images, targets, patch=2, stride=1, fill=0.0,
                          batch_size=batch_size)
    expected_a = [[p0(2), p0(3)], [p0(3), p0(1)]]
    assert [[Fraction(4, 5), Fraction(8, 9)], [Fraction(8, 9), Fraction(2, 3)]] == expected_a
    np.testing.assert_allclose(maps.probability[0].numpy(), np.array(expected_a, dtype=float),
                               atol=1e-7)
    np.testing.assert_allclose(maps.probability[1].numpy(), np.full((2, 2), 0.5), atol=1e-7)
    np.testing.assert_allclose(maps.logit[0].numpy(), [[2 * LN2, 3 * LN2], [3 * LN2, LN2]],
                               atol=1e-6)
    np.testing.assert_allclose(maps.logit[1].numpy(), np.zeros((2, 2)), atol=1e-7)
    np.testing.assert_allclose(maps.unoccluded_probability.numpy(), [16 / 17, 0.5], atol=1e-7)
    np.testing.assert_allclose(maps.unoccluded_logit.numpy(), [4 * LN2, 0.0], atol=1e-6)
    # sensitivity: 16/17 - 2/3 = 14/51 for A, 1/2 - 1/2 = 0 for B
    np.testing.assert_allclose(maps.sensitivity.numpy(), [14 / 51, 0.0], atol=1e-7)
    # the most probable class: 0 wherever S > 0; B's logits tie (0, 0) and argmax takes 0
    assert maps.prediction.tolist() == [[[0, 0], [0, 0]], [[0, 0], [0, 0]]]


def test_the_fill_value_replaces_every_pixel_under_the_square():
    # fill 0.5 on a 2x2 square adds 2 and removes what was there: A's S = 4, 5, 5, 3 and
    # B's S = 2 everywhere, so B's p_1 = 1/(2^2 + 1) = 1/5 and its sensitivity 1/2 - 1/5.
    backend = TorchBackend(PixelSum(), ReactionSpec("features"), "cpu")
    images = torch.tensor([[[[1.0, 0, 0], [0, 1, 0], [0, 0, 2]]], [[[0.0, 0, 0]] * 3]])
    maps = occlusion_maps(backend.logits, images, torch.tensor([0, 1]), patch=2, stride=1,
                          fill=0.5)
    np.testing.assert_allclose(maps.probability[0].numpy(),
                               [[16 / 17, 32 / 33], [32 / 33, 8 / 9]], atol=1e-7)
    np.testing.assert_allclose(maps.probability[1].numpy(), np.full((2, 2), 1 / 5), atol=1e-7)
    np.testing.assert_allclose(maps.sensitivity.numpy(), [16 / 17 - 8 / 9, 0.5 - 0.2],
                               atol=1e-7)
    assert maps.prediction[1].tolist() == [[0, 0], [0, 0]]  # z_0 = 2 ln 2 > z_1 = 0


def test_fill_option_takes_mean_or_a_number_and_refuses_the_rest():
    assert parse_fill("mean") is None
    assert parse_fill("0.25") == 0.25
    for bad in ("grey", "nan", "inf"):
        with pytest.raises(InputError, match=r"^--fill takes 'mean' or a number"):
            parse_fill(bad)


# --- a trained checkpoint, against a per-position loop -----------------------------------

def per_position_loop(run_file: Path, checkpoint: Path, pixels: np.ndarray,
                      labels: np.ndarray, patch: int, stride: int, fill: float) -> dict:
    """One float64 forward per image and position, the square cut out by slicing."""
    model = build_model(ModelSpec.from_json(read_run_info(run_file).model))
    model.load_state_dict(load_weights_file(checkpoint).state_dict)
    model = model.double().eval()
    height, width = pixels.shape[-2:]
    rows = range(0, height - patch + 1, stride)
    cols = range(0, width - patch + 1, stride)
    probability = np.zeros((len(pixels), len(rows), len(cols)))
    logit = np.zeros_like(probability)
    prediction = np.zeros(probability.shape, dtype=np.int64)
    plain = np.zeros(len(pixels))
    with torch.no_grad():
        for i, image in enumerate(pixels.astype(np.float64)):
            z = model(torch.from_numpy(image[None]))[0]
            plain[i] = torch.softmax(z, dim=0)[labels[i]].item()
            for a, r in enumerate(rows):
                for b, c in enumerate(cols):
                    occluded = image.copy()
                    occluded[:, r:r + patch, c:c + patch] = fill
                    z = model(torch.from_numpy(occluded[None]))[0]
                    probability[i, a, b] = torch.softmax(z, dim=0)[labels[i]].item()
                    logit[i, a, b] = z[labels[i]].item()
                    prediction[i, a, b] = int(z.argmax())
    return {"probability": probability, "logit": logit, "prediction": prediction,
            "unoccluded_probability": plain,
            "sensitivity": plain - probability.reshape(len(pixels), -1).min(axis=1)}


def test_batched_maps_equal_a_per_position_float64_loop(run, stored):
    run_file, result = stored
    maps = result.stored
    assert maps.epochs.tolist() == [1, 4] and result.computed == [1, 4]
    for j, epoch in enumerate(maps.epochs):
        loop = per_position_loop(run_file, run / "checkpoints" / f"epoch_{epoch:04d}.safetensors",
                                 maps.images.pixels, maps.images.labels, 3, 2,
                                 maps.settings.fill)
        for name in ("probability", "logit", "unoccluded_probability", "sensitivity"):
            np.testing.assert_allclose(maps.arrays[name][j], loop[name], rtol=0, atol=1e-6,
                                       err_msg=name)
        agree = maps.arrays["prediction"][j] == loop["prediction"]
        assert agree.mean() == 1.0


def test_images_fill_and_positions_are_those_of_the_split(run, stored):
    run_file, result = stored
    maps = result.stored
    with h5py.File(run_file, "r", locking=False) as handle:
        train_ids = [s.decode() for s in handle["splits/train/image"][()]]
        train_labels = handle["splits/train/label"][()]
    digits = load_digits()
    train_pixels = digits.images[[int(i) for i in train_ids]] / 16.0
    # the first image of classes 0, 1, 2 in split order (those of `analyzer cam`)
    first = [train_ids[int(np.flatnonzero(train_labels == c)[0])] for c in range(3)]
    assert maps.images.ids == first
    assert maps.images.labels.tolist() == [0, 1, 2]
    np.testing.assert_allclose(maps.images.pixels[:, 0],
                               digits.images[[int(i) for i in first]] / 16.0, atol=1e-7)
    assert maps.settings.fill_source == "mean"
    assert maps.settings.fill == pytest.approx(train_pixels.mean(), rel=1e-6)
    assert maps.rows.tolist() == maps.cols.tolist() == [0, 2, 4]


def test_onnx_checkpoints_give_the_torch_maps(run, stored, tmp_path):
    from analyzer.onnx_export import ExportOptions, export_checkpoints

    _, result = stored
    export_checkpoints(ExportOptions(ckpt_dir=run / "checkpoints", out=tmp_path / "onnx",
                                     epochs="4"), progress=False)
    onnx = compute_occlusion(occlusion_options(
        ckpt_dir=tmp_path / "onnx", run=run / "run.h5", epochs="4", images=3, patch=3,
        stride=2, results=tmp_path / "onnx.h5"))
    assert onnx.stored.settings.backend == "onnx"
    torch_maps = result.stored.only_epochs([4])
    for name in ("probability", "logit", "unoccluded_probability", "sensitivity"):
        np.testing.assert_allclose(onnx.stored.arrays[name], torch_maps.arrays[name],
                                   rtol=1e-5, atol=1e-6, err_msg=name)


def save_pt_state_dict(checkpoint: Path, folder: Path, model: nn.Module) -> None:
    torch.save(load_weights_file(checkpoint).state_dict, folder / "epoch_0004.pt")


def save_torchscript(checkpoint: Path, folder: Path, model: nn.Module) -> None:
    model.load_state_dict(load_weights_file(checkpoint).state_dict)
    torch.jit.script(model.eval()).save(str(folder / "epoch_0004.pt"))


def save_exported_program(checkpoint: Path, folder: Path, model: nn.Module) -> None:
    model.load_state_dict(load_weights_file(checkpoint).state_dict)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model.eval(), (torch.zeros(2, 1, 8, 8),),
                                  dynamic_shapes={"images": {0: batch}})
    torch.export.save(program, folder / "epoch_0004.pt2")


@pytest.mark.parametrize("write", [save_pt_state_dict, save_torchscript,
                                   save_exported_program],
                         ids=["pt-state-dict", "torchscript", "torch-export"])
def test_every_pytorch_checkpoint_kind_gives_the_same_maps(run, stored, tmp_path, write):
    _, result = stored
    model = build_model(ModelSpec.from_json(read_run_info(run / "run.h5").model))
    folder = tmp_path / "ckpts"
    folder.mkdir()
    write(run / "checkpoints" / "epoch_0004.safetensors", folder, model)
    other = compute_occlusion(occlusion_options(
        ckpt_dir=folder, run=run / "run.h5", model="small", epochs="4", images=3, patch=3,
        stride=2, results=tmp_path / "maps.h5"))
    torch_maps = result.stored.only_epochs([4])
    for name in ("probability", "logit", "sensitivity"):
        np.testing.assert_allclose(other.stored.arrays[name], torch_maps.arrays[name],
                                   rtol=0, atol=1e-6, err_msg=name)


# --- the file ----------------------------------------------------------------------------

def test_the_group_is_labelled_for_xarray_with_its_settings(stored):
    import xarray as xr

    run_file, result = stored
    group = xr.open_dataset(run_file, engine="h5netcdf", group="occlusion/train")
    assert group["probability"].dims == ("epoch", "image", "row", "col")
    assert group["logit"].dims == group["prediction"].dims == group["probability"].dims
    assert group["sensitivity"].dims == ("epoch", "image")
    assert group["pixels"].dims == ("image", "channel", "y", "x")
    assert group["epoch"].values.tolist() == [1, 4]
    assert group["row"].values.tolist() == [0, 2, 4]
    assert group["image"].values.tolist() == result.stored.images.ids
    assert (group.attrs["patch"], group.attrs["stride"]) == (3, 2)
    assert group.attrs["fill"] == pytest.approx(result.stored.settings.fill)
    assert group.attrs["target"] == "label" and group.attrs["backend"] == "torch"
    assert group["computed"].values.tolist() == [1, 1]
    np.testing.assert_array_equal(group["probability"].sel(epoch=4).values,
                                  result.stored.arrays["probability"][1])


def test_a_second_call_reads_stored_epochs_back_and_adds_the_new_ones(run, stored):
    run_file, first = stored
    again = compute_occlusion(occlusion_options(ckpt_dir=run / "checkpoints", epochs="1,2,4",
                                               images=3, patch=3, stride=2))
    assert again.computed == [2]
    assert again.stored.epochs.tolist() == [1, 2, 4]
    np.testing.assert_array_equal(again.stored.only_epochs([1, 4]).arrays["probability"],
                                  first.stored.arrays["probability"])
    assert read_occlusion(run_file, "train").epochs.tolist() == [1, 2, 4]


def test_fewer_images_are_rows_of_the_stored_maps(run, stored):
    _, first = stored
    fewer = compute_occlusion(occlusion_options(ckpt_dir=run / "checkpoints", epochs="4",
                                               images=2, patch=3, stride=2))
    assert fewer.computed == []
    assert fewer.stored.images.ids == first.stored.images.ids[:2]
    np.testing.assert_array_equal(fewer.stored.arrays["logit"],
                                  first.stored.arrays["logit"][1:, :2])


@pytest.mark.parametrize(("change", "message"), [
    ({"patch": 2}, r"computed with patch=3, not 2: write these to another file with "
                   r"--results$"),
    ({"fill": 0.0}, r"computed with fill=0\.\d+, not 0\.0: "),
    ({"images": 5}, r"occlusion maps of other images \(3 images\): choose at most "
                    r"--images 3, or write these to another file with --results$"),
])
def test_other_settings_or_images_are_refused_in_one_line(run, stored, change, message):
    options = {"epochs": "1", "images": 3, "patch": 3, "stride": 2, "device": "cpu", **change}
    with pytest.raises(InputError, match=message):
        compute_occlusion(occlusion_options(ckpt_dir=run / "checkpoints", **options))


def test_maps_of_other_pixels_of_the_same_images_are_refused(run, stored):
    with pytest.raises(InputError, match=r"occlusion maps of these images with other pixels "
                                         r"\(another --image-size, --channels or data\?\)"):
        compute_occlusion(OcclusionOptions(
            PassRequest(ckpt_dir=run / "checkpoints", splits=["train"], device="cpu",
                        channels=3),
            epochs="1", images=3, patch=3, stride=2))


def test_a_replaced_checkpoint_is_refused(run, stored, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "checkpoints" / "epoch_0001.safetensors").write_bytes(
        (copy / "checkpoints" / "epoch_0002.safetensors").read_bytes())
    with pytest.raises(InputError, match=r"epoch_0001\.safetensors changed since its "
                                         r"occlusion maps were stored"):
        compute_occlusion(occlusion_options(ckpt_dir=copy / "checkpoints", epochs="1",
                                           images=3, patch=3, stride=2))


# --- figures, report, info ---------------------------------------------------------------

def test_the_map_lies_over_the_patch_centres():
    class Stored:  # the attributes map_extent reads
        settings = type("S", (), {"patch": 3, "stride": 1})
        rows = cols = np.arange(6)

    # the square at column 0 covers pixels 0..2, centred on 1: its cell spans 0.5..1.5
    assert map_extent(Stored) == (0.5, 6.5, 6.5, 0.5)


def test_the_grid_shows_the_stored_maps_titled_with_probability_and_sensitivity(stored):
    _, result = stored
    maps = result.stored
    figure = occlusion_figure(maps, result.class_names)
    cells = [axes for axes in figure.axes if axes.get_title()]
    assert len(cells) == 3 * 2
    for i in range(3):
        for j, epoch in enumerate((1, 4)):
            cell = cells[i * 2 + j]
            assert cell.get_title() == (
                f"class {i} · epoch {epoch}\n"
                f"p {maps.arrays['unoccluded_probability'][j, i]:.3g}, "
                f"sensitivity {maps.arrays['sensitivity'][j, i]:.3g}")
            image, heat = cell.images
            assert image.get_array().shape == (8, 8)
            np.testing.assert_array_equal(heat.get_array(), maps.arrays["probability"][j, i])
    curves = sensitivity_figure(maps, result.class_names).axes[0].get_lines()
    assert [line.get_ydata().tolist() for line in curves] == \
        maps.arrays["sensitivity"].T.tolist()


def test_the_report_has_an_occlusion_section_when_the_file_holds_maps(run, stored, tmp_path):
    page = write_report(ReportOptions(runs=[run / "run.h5"], out=tmp_path / "with",
                                      cam=False)).read_text()
    assert '<h2 id="occlusion">' in page
    assert '<figure id="occlusion_1_grid">' in page
    assert '<figure id="occlusion_1_sensitivity">' in page
    without = render_html(ReportContent(runs=[], figures=[]))
    assert 'id="occlusion"' not in without and 'href="#occlusion"' not in without


def test_info_names_the_occlusion_group(stored):
    from store.inventory import describe_file, format_summary

    run_file, _ = stored
    summary = describe_file(run_file)
    assert summary["occlusion"]["train"]["positions"] == [3, 3]
    line = next(line for line in format_summary(summary).splitlines()
                if line.startswith("occlusion/train"))
    assert line.startswith("occlusion/train: epochs 1, ")
    assert ", 3 images, patch 3, stride 2, fill " in line
    assert line.endswith("(mean), 3x3 positions; backend torch, devices cpu")


# --- the command -------------------------------------------------------------------------

@pytest.mark.parametrize(("arguments", "message"), [
    (["--patch", "9"], "Error: --patch 9 does not fit in the 8x8 images (at most 8)"),
    (["--fill", "grey"], "Error: --fill takes 'mean' or a number (a pixel value, e.g. 0.5), "
                         "got 'grey'"),
    (["--epochs", "7"], "Error: no checkpoint for epoch 7"),
])
def test_bad_options_are_one_line_errors(run, arguments, message):
    result = CliRunner().invoke(analyzer, ["occlusion", "--ckpt-dir", str(run / "checkpoints"),
                                           "--device", "cpu", *arguments])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [message]


def test_without_a_run_file_the_maps_need_a_results_file(run, tmp_path):
    from PIL import Image

    folder = tmp_path / "ckpts"
    shutil.copytree(run / "checkpoints", folder)
    digits = load_digits()
    for label in range(10):  # one 8x8 PNG per class, as a user's image folder holds them
        (tmp_path / "digits" / str(label)).mkdir(parents=True)
        index = int(np.flatnonzero(digits.target == label)[0])
        Image.fromarray((digits.images[index] * 255 / 16).astype(np.uint8)).save(
            tmp_path / "digits" / str(label) / "0.png")
    arguments = ["occlusion", "--ckpt-dir", str(folder), "--data",
                 f"train={tmp_path / 'digits'}", "--device", "cpu", "-q"]
    result = CliRunner().invoke(analyzer, arguments)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: no run file to store the maps in: give --results FILE.h5"]
    result = CliRunner().invoke(analyzer, [*arguments, "--results", str(tmp_path / "m.h5")])
    assert result.exit_code == 0, result.output
    assert read_occlusion(tmp_path / "m.h5", "train").images.ids == [
        f"{label}/0.png" for label in range(8)]
    # a results file that holds occlusion maps only still makes a report of them
    page = write_report(ReportOptions(runs=[tmp_path / "m.h5"], out=tmp_path / "report",
                                      cam=False)).read_text()
    assert '<figure id="occlusion_1_grid">' in page and 'id="curves"' in page


@pytest.mark.slow
def test_the_command_prints_the_table_writes_the_figure_and_the_maps(run, tmp_path):
    out = tmp_path / "figs" / "occlusion.png"
    result = run_cli("analyzer", "occlusion", "--ckpt-dir", str(run / "checkpoints"),
                     "--epochs", "3,4", "--images", "2", "--patch", "4", "--stride", "2",
                     "--out", str(out), "--results", str(tmp_path / "maps.h5"),
                     "--device", "cpu")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("occlusion of 2 train images: patch 4, stride 2, fill 0.")
    assert lines[0].endswith("3x3 positions; 2 epochs computed, 0 read back")
    assert lines[2].split() == ["image", "class", "epoch", "3", "epoch", "4"]
    assert lines[-2:] == [f"wrote {out}", f"results: {tmp_path / 'maps.h5'}:/occlusion/train"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    maps = read_occlusion(tmp_path / "maps.h5", "train")
    shown = [line.split()[2:] for line in lines[3:5]]
    for i, cells in enumerate(shown):  # "p / sensitivity" per epoch, as stored
        for j in range(2):
            assert float(cells[3 * j]) == pytest.approx(
                maps.arrays["unoccluded_probability"][j, i], abs=5e-4)
            assert float(cells[3 * j + 2]) == pytest.approx(maps.arrays["sensitivity"][j, i],
                                                            abs=5e-4)
