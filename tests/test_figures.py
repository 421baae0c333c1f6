"""`analyzer plot` and `analyzer cam`: the figures checked through their matplotlib objects.

The inputs are real: a short run of the real trainer, analysed by the real `analyzer reaction`
(built once per session and shared with ``test_report.py``), overlaid with a copy of itself
in another folder, and a results-only file holding its train split alone.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from analyzer.cam import (
    CamOptions,
    cam_epochs,
    cam_figure,
    cell_title,
    compute_cam_grid,
    pick_images,
)
from analyzer.figures import (
    SWEEP_THRESHOLDS,
    accuracy_by_epoch,
    load_run,
    load_runs,
    model_reaction_figure,
    moving_average,
    per_class_figure,
    scatter_figure,
    sweep_curves,
    sweep_figure,
    thesis_figures,
)
from cli import analyzer
from store.errors import InputError
from store.results import (
    EpochResult,
    SplitImages,
    create_results_file,
    prepare_split,
    read_split_results,
    write_epoch_result,
)
from tests.conftest import run_cli

EPOCHS = 4


def analysed_runs(tmp_path_factory) -> list[Path]:
    """Two analysed run files (``a/run.h5`` trained and analysed, ``b/run.h5`` a copy), built
    once per session whichever test module asks first."""
    base = tmp_path_factory.getbasetemp() / "analysed_runs"
    runs = [base / "a" / "run.h5", base / "b" / "run.h5"]
    if runs[1].exists():
        return runs
    trained = run_cli("trainer", "run", "--out", str(base / "a"), "--epochs", str(EPOCHS), "-q")
    assert trained.returncode == 0, trained.stderr
    analysed = run_cli("analyzer", "reaction", "--ckpt-dir", str(base / "a" / "checkpoints"),
                       "-q")
    assert analysed.returncode == 0, analysed.stderr
    shutil.copytree(base / "a", base / "b")
    return runs


@pytest.fixture(scope="module")
def run_files(tmp_path_factory) -> list[Path]:
    return analysed_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def results_only(run_files, tmp_path_factory) -> Path:
    """A stand-alone results file with the train split only: no curves, no test results."""
    path = tmp_path_factory.mktemp("results") / "results.h5"
    train = read_split_results(run_files[0], "train")
    classes = [str(c) for c in train["class"]]
    create_results_file(path, classes)
    prepare_split(path, "train", epochs=train["epoch"].tolist(), class_names=classes,
                  images=SplitImages([str(i) for i in train["image"]], train["label"]),
                  settings=train["settings"], device="cpu")
    for row, epoch in enumerate(train["epoch"]):
        write_epoch_result(path, "train", EpochResult(
            epoch=int(epoch), **{name: train[name][row] for name in (
                "image_reaction", "prediction", "class_reaction", "accuracy", "loss",
                "empty_maps", "model_reaction", "seconds", "checkpoint_file",
                "checkpoint_sha256")}))
    return path


def line_data(axes) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(line.get_xdata(), line.get_ydata()) for line in axes.get_lines()]


def visible_axes(figure) -> list:
    return [axes for axes in figure.axes if axes.get_visible()]


def test_moving_average_is_centred_and_shrinks_at_the_ends():
    series = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    np.testing.assert_allclose(moving_average(series, 3), [1.5, 2, 3, 4, 5, 5.5])
    # Even windows reach one further back than forward: i-1 … i.
    np.testing.assert_allclose(moving_average(series, 2), [1, 1.5, 2.5, 3.5, 4.5, 5.5])
    np.testing.assert_allclose(moving_average(series, 4), [1.5, 2, 2.5, 3.5, 4.5, 5])
    np.testing.assert_allclose(moving_average(series, 1), series)
    np.testing.assert_allclose(moving_average(series, 100), np.full(6, 3.5))


def test_moving_average_ignores_nan_and_keeps_an_all_nan_window_nan():
    np.testing.assert_allclose(moving_average(np.array([1.0, np.nan, 3.0]), 3), [1, 2, 3])
    result = moving_average(np.array([np.nan, np.nan, 5.0]), 1)
    assert np.isnan(result[:2]).all() and result[2] == 5.0
    assert np.isnan(moving_average(np.array([np.nan, np.nan, np.nan, 4.0]), 2)[:3]).all()


def test_runs_are_labelled_by_model_name_and_run_folder(run_files):
    assert [run.label for run in load_runs(run_files)] == ["small (a)", "small (b)"]


@pytest.mark.parametrize(("quantity", "split", "variable", "scale", "y_label"), [
    ("reaction", "train", "class_reaction", 1.0, "class Reaction (a.u.)"),
    ("loss", "train", "loss", 1.0, "loss (nat, cross-entropy)"),
    ("train_accuracy", "train", "accuracy", 100.0, "training accuracy (%)"),
    ("test_accuracy", "test", "accuracy", 100.0, "test accuracy (%)"),
])
def test_per_class_figure_overlays_the_runs_in_one_subplot_per_class(
        run_files, quantity, split, variable, scale, y_label):
    runs = load_runs(run_files)
    figure = per_class_figure(runs, quantity, smooth=1)
    axes = visible_axes(figure)
    stored = read_split_results(run_files[0], split)
    assert [a.get_title() for a in axes] == [f"class {c}" for c in range(10)]
    for c, subplot in enumerate(axes):
        lines = line_data(subplot)
        assert len(lines) == 2
        for x, y in lines:
            np.testing.assert_array_equal(x, stored["epoch"])
            np.testing.assert_allclose(y, scale * stored[variable][:, c])
    assert axes[0].get_ylabel() == y_label and axes[5].get_ylabel() == y_label
    assert axes[-1].get_xlabel() == "epoch"
    assert [t.get_text() for t in figure.legends[0].get_texts()] == ["small (a)", "small (b)"]
    assert "not smoothed" in figure.get_suptitle()


def test_per_class_curves_are_the_moving_average_of_the_stored_values(run_files):
    figure = per_class_figure(load_runs(run_files[:1]), "reaction", smooth=3)
    stored = read_split_results(run_files[0], "train")["class_reaction"][:, 7]
    np.testing.assert_allclose(visible_axes(figure)[7].get_lines()[0].get_ydata(),
                               moving_average(stored, 3))
    assert "moving average of 3 analysed epochs" in figure.get_suptitle()


def test_scatter_has_one_point_per_class_named_for_train_and_for_test(run_files):
    runs = load_runs(run_files)
    figure = scatter_figure(runs, epoch=EPOCHS)
    assert len(figure.axes) == 4  # two runs x (train, test)
    assert str(EPOCHS) in figure.get_suptitle()
    for split, subplot in zip(["train", "test"], figure.axes[:2], strict=True):
        stored = read_split_results(run_files[0], split)
        row = list(stored["epoch"]).index(EPOCHS)
        points = subplot.collections[0].get_offsets()
        np.testing.assert_allclose(points[:, 0], 100 * stored["accuracy"][row])
        np.testing.assert_allclose(points[:, 1], stored["class_reaction"][row])
        assert [t.get_text() for t in subplot.texts] == [str(c) for c in range(10)]
        assert subplot.get_xlabel() == f"{split} accuracy of the class (%)"
        assert subplot.get_ylabel() == "class Reaction (a.u.)"
        assert subplot.get_title() == f"small (a): {split} images"


def test_model_reaction_has_one_line_per_run_equal_to_the_stored_series(run_files):
    figure = model_reaction_figure(load_runs(run_files), smooth=1)
    (axes,) = figure.axes
    stored = read_split_results(run_files[1], "train")
    assert len(axes.get_lines()) == 2
    np.testing.assert_allclose(axes.get_lines()[1].get_ydata(), stored["model_reaction"])
    assert [t.get_text() for t in axes.get_legend().get_texts()] == ["small (a)", "small (b)"]
    assert axes.get_xlabel() == "epoch" and "Reaction" in axes.get_ylabel()


def test_sweep_draws_the_extracted_epoch_and_its_test_accuracy_per_run_and_series(run_files):
    from analyzer.extract import sweep

    runs = load_runs(run_files)
    curves = sweep_curves(runs)
    assert [(c.run_label, c.series) for c in curves] == [
        ("small (a)", "reaction:train"), ("small (a)", "loss:val"),
        ("small (b)", "reaction:train"), ("small (b)", "loss:val")]
    figure = sweep_figure(curves, [r.label for r in runs])
    top, bottom = figure.axes
    assert len(top.get_lines()) == len(bottom.get_lines()) == 4
    stored = read_split_results(run_files[0], "train")
    expected = sweep(stored["epoch"], stored["model_reaction"], list(SWEEP_THRESHOLDS),
                     window=100)
    x, y = line_data(top)[0]
    np.testing.assert_allclose(x, SWEEP_THRESHOLDS)
    np.testing.assert_allclose(y, [np.nan if e is None else e for e in expected])
    accuracy = accuracy_by_epoch(runs[0])
    np.testing.assert_allclose(line_data(bottom)[0][1], [
        np.nan if e is None else 100 * accuracy[e] for e in expected])
    assert top.get_ylabel() == "extracted epoch"
    assert bottom.get_xlabel() == "threshold T"
    assert bottom.get_ylabel() == "test accuracy at the extracted epoch (%)"


def test_accuracy_by_epoch_is_the_share_of_correct_test_predictions(run_files):
    stored = read_split_results(run_files[0], "test")
    accuracy = accuracy_by_epoch(load_run(run_files[0]))
    assert sorted(accuracy) == list(range(1, EPOCHS + 1))
    assert accuracy[2] == pytest.approx(np.mean(stored["prediction"][1] == stored["label"]))


def test_a_results_only_file_skips_what_it_lacks_with_a_note(results_only):
    named = {n.name: n for n in thesis_figures(load_runs([results_only]), smooth=2)}
    assert named["test_accuracy_per_class"].figure is None
    assert "test split" in named["test_accuracy_per_class"].note
    for name in ("reaction_per_class", "loss_per_class", "train_accuracy_per_class",
                 "model_reaction", "threshold_sweep", f"scatter_epoch_{EPOCHS}"):
        assert named[name].figure is not None, name
    scatter = named[f"scatter_epoch_{EPOCHS}"].figure
    assert scatter.axes[1].texts[0].get_text() == f"no test results at epoch {EPOCHS}"
    # Only the Reaction series can be swept: a results file has no validation loss.
    assert len(named["threshold_sweep"].figure.axes[0].get_lines()) == 1


def test_plot_command_writes_every_figure_and_notes_what_it_skips(run_files, results_only,
                                                                  tmp_path, cli):
    result = cli("analyzer", "plot", *map(str, run_files), "--out", str(tmp_path / "figs"),
                 "--smooth", "2", "--dpi", "40")
    assert result.returncode == 0, result.stderr
    written = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert written == sorted(f"{name}.png" for name in (
        "reaction_per_class", "loss_per_class", "train_accuracy_per_class",
        "test_accuracy_per_class", f"scatter_epoch_{EPOCHS}", "model_reaction",
        "threshold_sweep"))
    assert result.stdout.count("wrote ") == 7
    # A results file with the train split only: the figure that needs the test split is
    # skipped with a note; the others are written.
    alone = CliRunner().invoke(analyzer, ["plot", str(results_only), "--out",
                                          str(tmp_path / "alone"), "--format", "svg",
                                          "--epoch", "2"])
    assert alone.exit_code == 0, alone.output
    assert sorted(p.name for p in (tmp_path / "alone").iterdir()) == [
        "loss_per_class.svg", "model_reaction.svg", "reaction_per_class.svg",
        "scatter_epoch_2.svg", "threshold_sweep.svg", "train_accuracy_per_class.svg"]
    assert alone.stderr.splitlines() == [
        "note: test_accuracy_per_class skipped: no run has Reaction results for the test split"]
    assert (tmp_path / "alone" / "threshold_sweep.svg").read_text().lstrip().startswith("<?xml")
    # Asked for a split that no file holds: an error, not a folder of notes.
    val = CliRunner().invoke(analyzer, ["plot", str(results_only), "--out",
                                        str(tmp_path / "val"), "--split", "val"])
    assert val.exit_code == 1
    assert val.stderr.strip() == ("Error: --split val: no file has Reaction results for it "
                                  "(they have: train)")
    assert not (tmp_path / "val").exists()


def test_plot_command_refuses_a_missing_file_in_one_line(tmp_path, cli):
    result = cli("analyzer", "plot", str(tmp_path / "nothing.h5"), "--out", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"Error: run file not found: "
                                                  f"{tmp_path / 'nothing.h5'}"]


def test_pick_images_takes_the_first_of_each_class_then_the_second():
    labels = np.array([2, 0, 0, 1, 2, 0, 1])
    assert pick_images(labels, 5).tolist() == [1, 3, 0, 2, 6]
    assert pick_images(labels, 100).tolist() == [1, 3, 0, 2, 6, 4, 5]


def test_cam_epochs_are_the_first_the_powers_of_ten_and_the_last():
    assert cam_epochs(range(1, 1001)) == [1, 10, 100, 1000]
    assert cam_epochs([1, 2, 3, 4]) == [1, 4]
    assert cam_epochs(range(5, 3001, 5)) == [5, 10, 100, 1000, 3000]
    assert cam_epochs([]) == []


def test_cam_grid_maps_give_exactly_the_stored_reaction(run_files):
    ckpt_dir = run_files[0].parent / "checkpoints"
    grid = compute_cam_grid(CamOptions(ckpt_dir=ckpt_dir, epochs="1,4", images=5,
                                       device="cpu"))
    stored = read_split_results(run_files[0], "train")
    assert grid.epochs == [1, 4] and grid.maps.shape[:2] == (5, 2)
    assert grid.pixels.shape == (5, 1, 8, 8)
    assert grid.labels.tolist() == stored["label"][grid.image_index].tolist() == [0, 1, 2, 3, 4]
    rows = [list(stored["epoch"]).index(e) for e in grid.epochs]
    np.testing.assert_allclose(grid.reaction, stored["image_reaction"][rows][:, grid.image_index].T,
                               rtol=1e-5, atol=1e-9)
    # The Reaction is the mean of the map over its positive positions (thesis eq. 3.3).
    positive = grid.maps[2, 1][grid.maps[2, 1] > 0]
    assert grid.reaction[2, 1] == pytest.approx(positive.mean(), rel=1e-5)


def test_cam_figure_is_a_grid_of_images_by_epochs_titled_with_class_epoch_reaction(run_files):
    grid = compute_cam_grid(CamOptions(ckpt_dir=run_files[0].parent / "checkpoints",
                                       epochs="1:4:3", images=3, device="cpu"))
    figure = cam_figure(grid)
    assert len(figure.axes) == 3 * 2
    stored = read_split_results(run_files[0], "train")
    for i in range(3):
        for j, epoch in enumerate((1, 4)):
            title = figure.axes[i * 2 + j].get_title()
            assert title.startswith(f"class {i} · epoch {epoch}\nReaction ")
            shown = float(re.search(r"Reaction (\S+)", title)[1])
            expected = stored["image_reaction"][epoch - 1, grid.image_index[i]]
            assert shown == pytest.approx(expected, rel=1e-3)
            # The image below, the heat map (upsampled to the 8x8 input) above it.
            assert [im.get_array().shape for im in figure.axes[i * 2 + j].images] == [(8, 8)] * 2
    assert cell_title("3", 7, 0.0).endswith("Reaction 0 (empty map)")


def test_cam_command_writes_the_grid_and_refuses_an_epoch_without_checkpoint(run_files,
                                                                            tmp_path, cli):
    ckpt_dir = run_files[0].parent / "checkpoints"
    out = tmp_path / "cam.png"
    result = cli("analyzer", "cam", "--ckpt-dir", str(ckpt_dir), "--epochs", "1,2",
                 "--images", "2", "--out", str(out), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(InputError, match=r"^no checkpoint for epoch 1000$"):
        compute_cam_grid(CamOptions(ckpt_dir=ckpt_dir, epochs="1,1000"))


def test_cam_from_onnx_checkpoints_exported_with_maps_equals_the_torch_grid(run_files,
                                                                           tmp_path):
    from analyzer.onnx_export import ExportOptions, export_checkpoints

    ckpt_dir = run_files[0].parent / "checkpoints"
    onnx_dir = tmp_path / "onnx"
    export_checkpoints(ExportOptions(ckpt_dir=ckpt_dir, out=onnx_dir, epochs="4",
                                     with_maps=True), progress=False)
    from_onnx = compute_cam_grid(CamOptions(ckpt_dir=onnx_dir, run=run_files[0], epochs="4",
                                            images=3, device="cpu"))
    from_torch = compute_cam_grid(CamOptions(ckpt_dir=ckpt_dir, epochs="4", images=3,
                                             device="cpu"))
    assert from_onnx.image_index.tolist() == from_torch.image_index.tolist()
    np.testing.assert_allclose(from_onnx.maps, from_torch.maps, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(from_onnx.reaction, from_torch.reaction, rtol=1e-4, atol=1e-8)
