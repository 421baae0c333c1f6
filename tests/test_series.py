"""Named series of run, results and CSV files; /extract; `analyzer extract` and `analyzer info`.

The run file below is built by hand, so every answer can be worked out on paper:

    epoch                 1     2     3     4     5     6
    val_loss (trainer)    2.0   1.0   0.9   0.5   0.6   0.7
    model Reaction train  1     5     -     2     3     2.5     (epoch 3 not analysed)
    test accuracy         0.25  0.5   0.75  1.0   0.75  0.5     (4 test images)

loss:val, threshold: i=2 is a decrease with ratio 2 (two values); i=3: window {2, 1, 0.9},
mean 1.3, S = sqrt(0.74/3) = 0.4967, |Δ| / S = 0.1 / 0.4967 = 0.2013 → accepted for T = 0.3,
not for T = 0.2 (i=4: window {2, 1, 0.9, 0.5}, S = sqrt(1.22/4) = 0.5523, 0.4 / 0.5523 = 0.724;
then it rises). Minimum: epoch 4.
reaction:train, threshold over the analysed epochs 1, 2, 4, 5, 6: epoch 4: window {1, 5, 2},
S = sqrt(78/27) = 1.6997, 3 / 1.6997 = 1.765; epoch 5 rises; epoch 6: window {1, 5, 2, 3, 2.5},
mean 2.7, S = sqrt(8.8/5) = 1.3266, 0.5 / 1.3266 = 0.3769 → none at T = 0.3, epoch 6 at T = 0.4.
Minimum after the peak (5 at epoch 2): min{2, 3, 2.5} → epoch 4.
Best test accuracy: 1.0 at epoch 4.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from cli import analyzer
from store.errors import InputError
from store.results import (
    EpochResult,
    SplitImages,
    create_results_file,
    prepare_split,
    write_epoch_result,
)
from store.runfile import EpochRecord, create_run_file, write_epoch
from store.series import (
    StoredExtraction,
    default_series,
    read_extract,
    read_series,
    read_test_accuracy,
    series_names,
    write_extract,
)
from store.spec import ReactionSpec

CLASSES = ["a", "b"]
VAL_LOSS = [2.0, 1.0, 0.9, 0.5, 0.6, 0.7]
REACTION = {1: 1.0, 2: 5.0, 4: 2.0, 5: 3.0, 6: 2.5}
TEST_LABELS = np.array([0, 0, 1, 1])
TEST_RIGHT = [1, 2, 3, 4, 3, 2]  # images predicted right at epochs 1-6
SETTINGS = {**ReactionSpec("features.5").attributes(), "backend": "torch"}


def reaction_row(epoch: int, model_reaction: float, prediction: np.ndarray) -> EpochResult:
    size = prediction.size
    return EpochResult(epoch, np.full(size, model_reaction, np.float32),
                       prediction.astype(np.int16), np.full(2, model_reaction),
                       np.array([1.0, 0.5]), np.array([0.2, 0.6]), np.zeros(2, np.int32),
                       model_reaction, 0.1, f"epoch_{epoch:04d}.safetensors", "ab" * 32)


def add_reaction(path: Path) -> None:
    train = SplitImages(["0", "1"], np.array([0, 1]))
    test = SplitImages(["2", "3", "4", "5"], TEST_LABELS)
    for split, images in (("train", train), ("test", test)):
        prepare_split(path, split, epochs=list(range(1, 7)), class_names=CLASSES,
                      images=images, settings=SETTINGS, device="cpu")
    for epoch, value in REACTION.items():
        write_epoch_result(path, "train", reaction_row(epoch, value, np.array([0, 1])))
    for epoch, right in enumerate(TEST_RIGHT, start=1):
        prediction = np.where(np.arange(4) < right, TEST_LABELS, 1 - TEST_LABELS)
        write_epoch_result(path, "test", reaction_row(epoch, 1.0, prediction))


@pytest.fixture
def run_file(tmp_path) -> Path:
    path = tmp_path / "run.h5"
    create_run_file(
        path, config={"epochs": 6, "seed": 0},
        model_json='{"name": "small", "in_channels": 1, "image_size": [8, 8], '
                   '"num_classes": 2}',
        class_names=CLASSES, split_ids={"train": ["0", "1"], "val": ["6"],
                                        "test": ["2", "3", "4", "5"]},
        split_labels={"train": np.array([0, 1]), "val": np.array([1]), "test": TEST_LABELS},
        data_description="hand-built", provenance={"command": "test", "finished": ""})
    for epoch, loss in enumerate(VAL_LOSS, start=1):
        write_epoch(path, EpochRecord(epoch, 3.0 - epoch / 3, 0.5, loss, 0.5,
                                      np.array([loss, loss]), np.array([0.5, 0.5]), 1.0, 0.1,
                                      1e9 + epoch, f"epoch_{epoch:04d}.safetensors", "0" * 64))
    add_reaction(path)
    return path


# --- reading series ------------------------------------------------------------------------


def test_named_series_come_from_the_trainer_and_the_reaction_groups(run_file):
    reaction = read_series(run_file, "reaction:train")
    assert reaction.epochs.tolist() == list(REACTION)           # epoch 3 was not computed
    assert reaction.values.tolist() == list(REACTION.values())
    assert reaction.source == "/reaction/train/model_reaction"
    loss = read_series(run_file, "loss:val")
    assert loss.source == "/training/val_loss" and loss.values.tolist() == VAL_LOSS
    accuracy = read_series(run_file, "accuracy:test")
    np.testing.assert_allclose(accuracy.values, np.array(TEST_RIGHT) / 4)
    assert read_series(run_file, "training/val_accuracy").values.tolist() == [0.5] * 6
    assert read_series(run_file, "/reaction/train/model_reaction").epochs.tolist() == \
        list(REACTION)


def test_series_names_and_defaults(run_file):
    names = series_names(run_file)
    for name in ("reaction:train", "reaction:test", "loss:val", "loss:train", "accuracy:test",
                 "training/val_loss", "reaction/train/model_reaction"):
        assert name in names
    assert "training/epoch" not in names and "reaction/train/computed" not in names
    assert default_series(run_file) == ["reaction:train", "loss:val"]


def test_unknown_series_is_one_clear_error_listing_the_known_ones(run_file):
    with pytest.raises(InputError, match=r"no series 'reaction:nope'.*loss:val"):
        read_series(run_file, "reaction:nope")


def test_loss_falls_back_to_the_reaction_pass_in_a_results_file(tmp_path):
    # Per-class loss 0.2 (class a: images 2, 3) and 0.6 (class b: images 4, 5):
    # mean over the 4 images = (2·0.2 + 2·0.6) / 4 = 0.4.
    path = tmp_path / "results.h5"
    create_results_file(path, CLASSES)
    add_reaction(path)
    loss = read_series(path, "loss:test")
    assert loss.source.startswith("/reaction/test/loss")
    np.testing.assert_allclose(loss.values, [0.4] * 6)
    assert default_series(path) == ["reaction:train"]


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_csv_columns_are_series_and_percent_test_accuracy_becomes_a_fraction(tmp_path):
    path = write_csv(tmp_path / "curves.csv",
                     "epoch,val_loss,test_accuracy\n1,2.0,25\n2,,50\n3,0.9,75\n")
    loss = read_series(path, "val_loss")
    assert loss.epochs.tolist() == [1, 2, 3]
    assert np.isnan(loss.values[1]) and loss.values[2] == 0.9
    assert read_test_accuracy(path).values.tolist() == [0.25, 0.5, 0.75]
    assert default_series(path) == ["val_loss"]


def test_tensorboard_csv_uses_step_as_the_epoch(tmp_path):
    path = write_csv(tmp_path / "tb.csv", "Wall time,Step,Value\n1.5,1,0.9\n2.5,2,0.8\n")
    assert read_series(path, "Value").epochs.tolist() == [1, 2]
    assert default_series(path) == ["Value"]


@pytest.mark.parametrize(("text", "message"), [
    ("loss\n1.0\n", "no 'epoch' column"),
    ("epoch,loss\n1,abc\n", "'abc' is not a number"),
    ("epoch,loss\n1,1.0,3\n", "3 cells"),
    ("epoch,loss\n1.5,1.0\n", "whole epoch"),
    ("epoch,loss\n1,0.4\n2,0.3\n1,0.3\n", "epoch 1 appears 2 times"),
    (b"epoch,loss\xfc\n1,0.5\n", "not UTF-8 text"),
])
def test_bad_csv_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(InputError, match=message):
        read_series(path, "loss")


# --- /extract ------------------------------------------------------------------------------


def stored(series: str, criterion: str, threshold: float | None, epoch: int | None,
           window: int = 100) -> StoredExtraction:
    return StoredExtraction(series, "/x", criterion, threshold, window, epoch,
                            None if epoch is None else 0.5, 4, 1.0, "/reaction/test", 5)


def test_extract_rows_round_trip_and_merge_by_series_criterion_threshold_window(run_file):
    write_extract(run_file, [stored("loss:val", "threshold", 0.3, 3),
                             stored("loss:val", "minimum", None, 4, window=0)])
    write_extract(run_file, [stored("loss:val", "threshold", 0.3, 5),        # replaces
                             stored("loss:val", "threshold", 0.2, None),     # adds
                             stored("reaction:train", "auto", None, 6)])     # adds
    rows = read_extract(run_file)
    assert [(r.series, r.criterion, r.threshold, r.epoch) for r in rows] == [
        ("loss:val", "threshold", 0.2, None), ("loss:val", "threshold", 0.3, 5),
        ("loss:val", "minimum", None, 4), ("reaction:train", "auto", None, 6)]
    assert rows[0].test_accuracy is None and rows[1].best_test_epoch == 4
    with h5py.File(run_file, "r") as handle:   # a labelled table, like every other group
        assert handle["extract/epoch"].dims[0][0].name == "/extract/row"
        assert handle["extract/epoch"][()].tolist() == [-1, 5, 4, 6]


def test_extract_is_not_written_into_a_foreign_hdf5_file(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as handle:
        handle.attrs["format"] = "something"
    with pytest.raises(InputError, match="refusing"):
        write_extract(path, [stored("x", "minimum", None, 1)])


# --- the command line (a few real subprocesses; the rest in process, to stay fast) ---------


def invoke(*args: str):
    """``analyzer ARGS`` in this process: result with exit_code, stdout, stderr."""
    return CliRunner().invoke(analyzer, list(args))


def test_extract_table_like_thesis_table_5_1(run_file, cli):
    result = cli("analyzer", "extract", str(run_file), "--threshold", "0.3")
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines()]
    assert lines[0] == ["series", "criterion", "threshold", "window", "epoch", "test", "acc",
                        "%", "best", "test", "acc", "%", "(epoch)"]
    assert lines[1:5] == [
        ["reaction:train", "threshold", "0.30", "100", "none", "-", "100.00", "(4)"],
        ["reaction:train", "minimum", "-", "-", "4", "100.00", "100.00", "(4)"],
        ["loss:val", "threshold", "0.30", "100", "3", "75.00", "100.00", "(4)"],
        ["loss:val", "minimum", "-", "-", "4", "100.00", "100.00", "(4)"]]
    assert result.stdout.splitlines()[5:] == [
        "none: reaction:train threshold T=0.30: no step down smaller than T times its window's "
        "standard deviation in 5 analysed epochs"]  # epoch 3 has no Reaction
    assert f"stored in {run_file}:/extract" in result.stderr
    assert [(r.series, r.criterion, r.epoch) for r in read_extract(run_file)] == [
        ("loss:val", "threshold", 3), ("loss:val", "minimum", 4),
        ("reaction:train", "threshold", None), ("reaction:train", "minimum", 4)]


def test_extract_json_schema_and_auto(run_file):
    result = invoke("extract", str(run_file), "--series", "reaction:train",
                    "--threshold", "auto", "--window", "4", "--json", "--no-save")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert all(set(row) == {"series", "criterion", "threshold", "window", "epoch", "reason",
                            "test_accuracy"} for row in rows)
    # Auto, window 4, from the peak (epoch 2): {5, 2, 3, 2.5} is not strictly decreasing.
    assert rows == [
        {"series": "reaction:train", "criterion": "auto", "threshold": None, "window": 4,
         "epoch": 6, "reason": None, "test_accuracy": 0.5},
        {"series": "reaction:train", "criterion": "minimum", "threshold": None, "window": None,
         "epoch": 4, "reason": None, "test_accuracy": 1.0}]
    assert read_extract(run_file) == []  # --no-save


def test_auto_window_rows_carry_their_reason_into_json_extract_and_info(run_file, cli):
    # Reaction (epochs 1, 2, 4, 5, 6: 1, 5, 2, 3, 2.5) peaks at epoch 2: m = 4 values from the
    # peak, ⌊4/2⌋ = 2 < 10, so --window auto (the default for auto) cannot choose a window.
    reason = ("only 4 analysed epochs from the peak at epoch 2 to the end; the trend test of "
              "--window auto needs at least 20")
    result = invoke("extract", str(run_file), "--series", "reaction:train", "--threshold",
                    "auto", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0] == {
        "series": "reaction:train", "criterion": "auto", "threshold": None, "window": None,
        "epoch": None, "reason": reason, "test_accuracy": None}
    table = invoke("extract", str(run_file), "--series", "reaction:train", "--threshold",
                   "auto", "--window", "4")   # today's behaviour: epoch 6 (see above)
    assert table.stdout.splitlines()[1].split()[:5] == ["reaction:train", "auto", "-", "4", "6"]
    rows = {(r.criterion, r.window_rule): r for r in read_extract(run_file)}
    assert set(rows) == {("auto", "auto"), ("auto", "fixed"), ("minimum", "")}  # both kept
    assert (rows["auto", "auto"].epoch, rows["auto", "auto"].window,
            rows["auto", "auto"].reason) == (None, 0, reason)
    assert (rows["auto", "fixed"].epoch, rows["auto", "fixed"].window,
            rows["auto", "fixed"].reason) == (6, 4, "")
    text = cli("analyzer", "info", str(run_file)).stdout
    assert f"reaction:train: auto window auto → epoch none ({reason})" in text
    assert "reaction:train: auto window 4 → epoch 6, test acc 50.00%" in text


def test_extract_rows_of_an_older_file_without_reason_and_window_rule_still_read(run_file):
    write_extract(run_file, [stored("loss:val", "auto", None, 3),
                             stored("loss:val", "minimum", None, 4, window=0)])
    with h5py.File(run_file, "a") as handle:   # the layout before issue 16
        del handle["extract/reason"], handle["extract/window_rule"]
    rows = read_extract(run_file)
    assert [(r.criterion, r.window_rule, r.reason) for r in rows] == [
        ("auto", "fixed", ""), ("minimum", "", "")]
    write_extract(run_file, [stored("loss:val", "auto", None, 7)])   # replaces the fixed row
    assert [(r.criterion, r.epoch) for r in read_extract(run_file)] == [
        ("auto", 7), ("minimum", 4)]


def test_extract_sweep_has_one_hundred_thresholds_per_series(run_file):
    result = invoke("extract", str(run_file), "--sweep", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    for series in ("reaction:train", "loss:val"):
        swept = [r for r in rows if r["series"] == series and r["criterion"] == "threshold"]
        assert [r["threshold"] for r in swept] == [round(k / 100, 2) for k in range(1, 101)]
    loss = {r["threshold"]: r["epoch"] for r in rows if r["series"] == "loss:val"}
    assert loss[0.2] is None and loss[0.21] == 3     # ratio 0.2013
    reaction = {r["threshold"]: r["epoch"] for r in rows if r["series"] == "reaction:train"}
    assert reaction[0.37] is None and reaction[0.38] == 6   # ratio 0.3769
    assert len(read_extract(run_file)) == 202
    info = invoke("info", str(run_file)).stdout.splitlines()
    assert "extract: 202 rows" in info
    sweeps = [line for line in info if "threshold sweep" in line]
    assert [line.split(":")[0].strip() for line in sweeps] == ["loss", "reaction"]
    assert "loss:val: threshold sweep, 100 values T=0.01…1.00 window 100 → epochs 3–" in sweeps[0]
    assert "(20 with none)" in sweeps[0]   # T = 0.01 … 0.20
    assert len(info) < 20


def test_extract_reads_a_csv_through_the_real_command(tmp_path, cli):
    # val_loss is VAL_LOSS; the peaked column is the Reaction of the run file above, with
    # epoch 3 empty. test_accuracy in percent.
    path = write_csv(tmp_path / "curves.csv",
                     "epoch,val_loss,peaked,test_accuracy\n"
                     "1,2.0,1,25\n2,1.0,5,50\n3,0.9,,75\n4,0.5,2,100\n5,0.6,3,75\n6,0.7,2.5,50\n")
    result = cli("analyzer", "extract", str(path), "--series", "val_loss", "--json")
    assert result.returncode == 0, result.stderr
    assert [(r["criterion"], r["epoch"], r["test_accuracy"]) for r in json.loads(result.stdout)] \
        == [("threshold", 3, 0.75), ("minimum", 4, 1.0)]
    result = invoke("extract", str(path), "--series", "peaked", "--after-peak",
                    "--threshold", "0.4", "--json")
    assert [(r["criterion"], r["epoch"]) for r in json.loads(result.stdout)] == [
        ("threshold", 6), ("minimum", 4)]
    without = invoke("extract", str(path), "--series", "peaked", "--json")
    assert json.loads(without.stdout)[1]["epoch"] == 1   # the overall minimum, before the peak
    assert "stored" not in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--threshold", "0"], "(0, 1]"),
    (["--threshold", "high"], "'auto'"),
    (["--window", "1"], "at least 2"),
    (["--window", "ten"], "whole number or 'auto'"),
    (["--window", "auto"], "give --threshold auto too"),
    (["--series", "loss:nope"], "no series 'loss:nope'"),
])
def test_extract_errors_are_one_line(run_file, args, message):
    result = invoke("extract", str(run_file), *args)
    assert result.exit_code == 1
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_info_text_and_json(run_file, cli):
    write_extract(run_file, [stored("loss:val", "threshold", 0.3, 3)])
    text = cli("analyzer", "info", str(run_file))
    assert text.returncode == 0, text.stderr
    assert "reaction-run 1.1" in text.stdout
    assert "model: small, input 1x8x8, 2 classes" in text.stdout
    assert "training: 6 of 6 epochs completed" in text.stdout
    assert "reaction/train: 5 of 6 epochs computed, epochs 1–6, 2 images" in text.stdout
    assert "loss:val: threshold T=0.30 window 100 → epoch 3" in text.stdout
    summary = json.loads(invoke("info", str(run_file), "--json").stdout)
    assert summary["splits"]["test"]["images"] == 4
    assert summary["training"] == {"epochs": 6, "completed_epochs": 6}
    assert summary["reaction"]["train"]["computed_epochs"] == 5
    assert summary["reaction"]["test"]["settings"] == SETTINGS
    assert summary["extract"][0]["epoch"] == 3


def test_info_refuses_a_file_that_is_not_a_run(tmp_path):
    path = tmp_path / "x.h5"
    with h5py.File(path, "w"):
        pass
    result = invoke("info", str(path))
    assert result.exit_code == 1 and "not a reaction run or results file" in result.stderr
