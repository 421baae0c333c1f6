"""`analyzer compare` on hand-built run files, every answer worked out on paper below.

Six runs of 6 epochs; test accuracy = images right / test images (4, run C: 6).

    run        val_loss (trainer)            Reaction, train              test right
    A small    2.0 1.0 0.9 0.5 0.6 0.7       1 5 4 2 1 3                  1 2 3 2 4 2
    B small    2.0 1.0 0.5 0.8 0.5 0.9       2 6 6 3 1 1                  1 2 3 4 3 2
    C model4   1.0 0.8 0.6 0.7 0.65 0.9      1 2 3 4 5 6                  1 2 4 5 5 6  (of 6)
    D model2   2.0 1.0 0.9 nan 0.6 0.7       1 5 - 2 3 2.5 (3: not run)   1 2 3 3 4 2
    E small    1.0 0.5 0.7 0.6 0.8 0.9       no Reaction at all           no test results
    F small    1.0 0.5 0.7 0.6 0.8 0.9       1 5 4 2 1 3                  no test split

Minimum criterion (loss: overall minimum; Reaction: minimum strictly after the peak; ties
to the earliest epoch):

    A: loss min 0.5 → epoch 4, acc 2/4 = 50 %; Reaction peak 5 (epoch 2), min after 1 →
       epoch 5, acc 4/4 = 100 % = the best (epoch 5). Shortfalls 50 and 0; Reaction +50.
    B: loss 0.5 at epochs 3 and 5 → 3 (tie), acc 75 %; Reaction peaks 6 at 2 and 3 → 2,
       min 1 at 5 and 6 → 5 (ties), acc 75 %. Best 100 % (epoch 4): shortfalls 25; equal.
    C: loss → 3, acc 4/6 = 66.67 %, best 100 % (epoch 6), shortfall 33.33; Reaction peaks at
       the last epoch: no epoch after it → none. Not compared. (Classes x, y, z.)
    D: the NaN at epoch 4 is dropped: loss min 0.6 → epoch 5, acc 100 % = best (epoch 5);
       Reaction over epochs 1, 2, 4, 5, 6: peak at 2, min after 2 → epoch 4, acc 75 %,
       shortfall 25; Reaction −25.
    E: loss → 2, no test accuracy; no reaction:train. F: loss → 2, Reaction → 5, no test.

Summary: 6 runs, compared A, B, D: higher 1, equal 1, lower 1; mean (50 + 0 − 25) / 3 =
+8.33 points.

Threshold criterion (window 100 ≥ the series: S_i over all values up to i):

    A loss  i=3: {2, 1, 0.9} mean 1.3, S = sqrt(0.74/3) = 0.4967, 0.1/S = 0.2013 (i=4: 0.724;
            then rises) → epoch 3 for T ≥ 0.21, none for T ≤ 0.20.
    A Reac. i=3: {1, 5, 4} S = sqrt(78/27) = 1.6997, 1/S = 0.5883; i=4: {1, 5, 4, 2} S =
            sqrt(2.5), 2/S = 1.2649; i=5: {1, 5, 4, 2, 1} S = sqrt(2.64), 1/S = 0.6155
            → epoch 3 for T ≥ 0.59, none below.
    D loss  analysed 2, 1, 0.9, 0.6, 0.7 (epochs 1, 2, 3, 5, 6): epoch 3 ratio 0.2013; epoch
            5: {2, 1, 0.9, 0.6} S = 0.5262, 0.3/S = 0.5701 → epoch 3 for T ≥ 0.21, else none.
    D Reac. epoch 4: {1, 5, 2} 3/S = 1.765; epoch 6: {1, 5, 2, 3, 2.5} S = sqrt(1.76), 0.5/S =
            0.3769 → epoch 6 for T ≥ 0.38, else none.

At T = 0.6: A loss 3 (75 %), Reaction 3 (75 %): equal; D loss 3 (75 %), Reaction 6 (50 %):
−25; mean −12.50. Sweep of A and D, 200 (run, T) pairs: A compared for T = 0.59 … 1.00 (42,
all equal at epoch 3); D for T = 0.38 … 1.00 (63, all −25); mean −25 · 63 / 105 = −15.00.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from analyzer.compare import (
    CompareRow,
    compare_rows,
    load_compare_runs,
    parse_criteria,
    summarize,
)
from analyzer.figures import load_runs
from analyzer.report import comparison_table
from cli import analyzer
from store.errors import InputError
from store.results import EpochResult, SplitImages, prepare_split, write_epoch_result
from store.runfile import EpochRecord, create_run_file, write_epoch
from store.spec import ReactionSpec

SETTINGS = {**ReactionSpec("features.5").attributes(), "backend": "torch"}
NAN = math.nan
RUNS = {  # folder: (model, classes, val_loss, Reaction by epoch, test right by epoch)
    "a": ("small", "ab", [2.0, 1.0, 0.9, 0.5, 0.6, 0.7],
          [1, 5, 4, 2, 1, 3], [1, 2, 3, 2, 4, 2]),
    "b": ("small", "ab", [2.0, 1.0, 0.5, 0.8, 0.5, 0.9],
          [2, 6, 6, 3, 1, 1], [1, 2, 3, 4, 3, 2]),
    "c": ("model4", "xyz", [1.0, 0.8, 0.6, 0.7, 0.65, 0.9],
          [1, 2, 3, 4, 5, 6], [1, 2, 4, 5, 5, 6]),
    "d": ("model2", "ab", [2.0, 1.0, 0.9, NAN, 0.6, 0.7],
          [1, 5, None, 2, 3, 2.5], [1, 2, 3, 3, 4, 2]),
    "e": ("small", "ab", [1.0, 0.5, 0.7, 0.6, 0.8, 0.9], None, None),
    "f": ("small", "ab", [1.0, 0.5, 0.7, 0.6, 0.8, 0.9], [1, 5, 4, 2, 1, 3], None),
}
NO_TEST = "no test results (accuracy:test): run analyzer reaction on the test split"


def result(epoch: int, classes: int, reaction: float, prediction: np.ndarray) -> EpochResult:
    return EpochResult(epoch, np.full(prediction.size, reaction, np.float32),
                       prediction.astype(np.int16), np.full(classes, reaction),
                       np.ones(classes), np.ones(classes), np.zeros(classes, np.int32),
                       reaction, 0.1, f"epoch_{epoch:04d}.safetensors", "ab" * 32)


def build_run(folder: Path, model: str, classes: str, val_loss: list[float],
              reaction: list[float | None] | None, test_right: list[int] | None) -> Path:
    """A run file of 6 epochs: trainer curves, Reaction on train (None: not analysed), test."""
    folder.mkdir(parents=True)
    path = folder / "run.h5"
    train_labels = np.arange(len(classes))
    test_labels = np.repeat(train_labels, 2)  # 4 test images, or 6 for three classes
    create_run_file(
        path, config={"epochs": 6, "seed": 0, "model": model},
        model_json=json.dumps({"name": model}), class_names=list(classes),
        split_ids={"train": [str(i) for i in train_labels], "val": ["v"],
                   "test": [f"t{i}" for i in range(test_labels.size)]},
        split_labels={"train": train_labels, "val": np.array([0]), "test": test_labels},
        data_description="hand-built", provenance={"command": "test"})
    for epoch, loss in enumerate(val_loss, start=1):
        write_epoch(path, EpochRecord(epoch, 1.0, 0.5, loss, 0.5, np.full(len(classes), loss),
                                      np.full(len(classes), 0.5), 1.0, 0.1, 1e9 + epoch,
                                      f"epoch_{epoch:04d}.safetensors", "0" * 64))
    if reaction is None:
        return path
    images = SplitImages([str(i) for i in train_labels], train_labels)
    prepare_split(path, "train", epochs=range(1, 7), class_names=list(classes), images=images,
                  settings=SETTINGS, device="cpu")
    for epoch, value in enumerate(reaction, start=1):
        if value is not None:
            write_epoch_result(path, "train", result(epoch, len(classes), value, train_labels))
    if test_right is not None:
        test = SplitImages([f"t{i}" for i in range(test_labels.size)], test_labels)
        prepare_split(path, "test", epochs=range(1, 7), class_names=list(classes), images=test,
                      settings=SETTINGS, device="cpu")
        for epoch, right in enumerate(test_right, start=1):
            wrong = (test_labels + 1) % len(classes)
            prediction = np.where(np.arange(test_labels.size) < right, test_labels, wrong)
            write_epoch_result(path, "test", result(epoch, len(classes), 1.0, prediction))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {folder: build_run(root / folder, *spec) for folder, spec in RUNS.items()}


def table(rows: list[CompareRow]) -> list[tuple]:
    return [(r.run, r.series, r.criterion, r.threshold, r.epoch,
             None if r.test_accuracy is None else round(100 * r.test_accuracy, 2),
             None if r.shortfall is None else round(100 * r.shortfall, 2), r.note)
            for r in rows]


def test_minimum_rows_and_summary_worked_out_on_paper(runs):
    rows = compare_rows(load_compare_runs(list(runs.values())))
    assert table(rows) == [
        ("small (a)", "loss:val", "minimum", None, 4, 50.0, 50.0, ""),
        ("small (a)", "reaction:train", "minimum", None, 5, 100.0, 0.0, ""),
        ("small (b)", "loss:val", "minimum", None, 3, 75.0, 25.0, ""),          # tie 3, 5
        ("small (b)", "reaction:train", "minimum", None, 5, 75.0, 25.0, ""),    # ties
        ("model4 (c)", "loss:val", "minimum", None, 3, 66.67, 33.33, ""),
        ("model4 (c)", "reaction:train", "minimum", None, None, None, None,
         "still rising: the maximum is at the last analysed epoch (6)"),
        ("model2 (d)", "loss:val", "minimum", None, 5, 100.0, 0.0, ""),         # NaN dropped
        ("model2 (d)", "reaction:train", "minimum", None, 4, 75.0, 25.0, ""),
        ("small (e)", "loss:val", "minimum", None, 2, None, None, NO_TEST),
        ("small (e)", "reaction:train", "minimum", None, None, None, None,
         "no reaction:train in this file (run analyzer reaction); " + NO_TEST),
        ("small (f)", "loss:val", "minimum", None, 2, None, None, NO_TEST),
        ("small (f)", "reaction:train", "minimum", None, 5, None, None, NO_TEST),
    ]
    assert [(r.best_test_epoch, r.best_test_accuracy) for r in rows[::2]] == [
        (5, 1.0), (4, 1.0), (6, 1.0), (5, 1.0), (None, None), (None, None)]
    [summary] = summarize(rows, "reaction:train", "loss:val")
    assert (summary.pairs, summary.higher, summary.equal, summary.lower) == (6, 1, 1, 1)
    assert summary.mean_difference == pytest.approx(25 / 3)      # (50 + 0 − 25) / 3
    assert summary.text() == ("minimum: reaction:train pick vs loss:val pick, test accuracy "
                              "over 3 of 6 runs: higher in 1, equal in 1, lower in 1; mean "
                              "difference +8.33 points")


def test_threshold_and_auto_criteria(runs):
    two = load_compare_runs([runs["a"], runs["d"]])
    rows = compare_rows(two, criteria=parse_criteria(None, 0.6, False, 100))
    assert [(r.run, r.series, r.epoch, r.test_accuracy) for r in rows] == [
        ("small (a)", "loss:val", 3, 0.75), ("small (a)", "reaction:train", 3, 0.75),
        ("model2 (d)", "loss:val", 3, 0.75), ("model2 (d)", "reaction:train", 6, 0.5)]
    [summary] = summarize(rows, "reaction:train", "loss:val")
    assert summary.text().startswith("threshold T=0.60: reaction:train pick vs loss:val pick,"
                                     " test accuracy over 2 of 2 runs: higher in 0, equal in "
                                     "1, lower in 1; mean difference -12.50 points")
    # Auto on D: Reaction from the peak {5, 2, 3, 2.5} is not decreasing → epoch 6; the loss
    # {2, 1, 0.9, 0.6, 0.7} has tau = −0.8, p = 5/120 < 0.05: still decreasing → none.
    auto = compare_rows(two[1:], criteria=parse_criteria("threshold", "auto", False, 100),
                        auto_window=100)
    assert [(r.criterion, r.epoch, r.note) for r in auto] == [
        ("auto", None, "still decreasing at the last epoch 6: trend test p = 0.042 < 0.05 "
                       "over the last 5 analysed epochs (1–6)"), ("auto", 6, "")]
    # The default window rule (--window auto): 5 loss values, 4 Reaction values from the peak:
    # ⌊5/2⌋ = 2 and ⌊4/2⌋ = 2 are below 10, so neither can be tested, and the notes say so.
    default = compare_rows(two[1:], criteria=parse_criteria("threshold", "auto", False, 100))
    assert [r.note for r in default] == [
        "only 5 analysed epochs in the series; the trend test of --window auto needs at least 20",
        "only 4 analysed epochs from the peak at epoch 2 to the end; the trend test of --window "
        "auto needs at least 20"]
    [summary] = summarize(auto, "reaction:train", "loss:val")
    assert summary.text().endswith("over 0 of 1 runs: higher in 0, equal in 0, lower in 0; "
                                   "no mean difference")


def test_sweep_summary_over_every_threshold(runs):
    rows = compare_rows(load_compare_runs([runs["a"], runs["d"]]),
                        criteria=parse_criteria(None, None, True, 100))
    assert len(rows) == 2 * 2 * 100
    picks = {(r.run, r.series, r.threshold): r.epoch for r in rows}
    assert picks["small (a)", "loss:val", 0.2] is None and picks["small (a)", "loss:val", 0.21] == 3
    assert picks["small (a)", "reaction:train", 0.58] is None
    assert picks["small (a)", "reaction:train", 0.59] == 3
    assert picks["model2 (d)", "reaction:train", 0.37] is None
    assert picks["model2 (d)", "reaction:train", 0.38] == 6
    [summary] = summarize(rows, "reaction:train", "loss:val")
    assert (summary.pairs, summary.compared, summary.higher, summary.equal, summary.lower) == \
        (200, 105, 0, 42, 63)
    assert summary.mean_difference == pytest.approx(-15.0)      # −25 · 63 / 105
    assert summary.text().startswith("threshold T=0.01…1.00: ")
    assert "over 105 of 200 run × threshold pairs" in summary.text()


def test_labels_keep_two_runs_of_one_model_in_same_named_folders_apart(tmp_path, runs):
    spec = RUNS["a"]
    clash = [build_run(tmp_path / side / "a", *spec) for side in ("x", "y")]
    labels = [run.label for run in load_compare_runs(clash)]
    assert labels == [f"small (a) [{clash[0]}]", f"small (a) [{clash[1]}]"]


@pytest.mark.parametrize(("criterion", "threshold", "sweep", "window", "message"), [
    ("minimum", 0.3, False, 100, "--threshold applies to --criterion threshold only"),
    (None, 0.3, True, 100, "drop --threshold"),
    ("minimum", None, True, 100, "drop --criterion"),
    (None, None, False, 1, "at least 2"),
])
def test_contradictory_options_are_refused(criterion, threshold, sweep, window, message):
    with pytest.raises(InputError, match=message):
        parse_criteria(criterion, threshold, sweep, window)


def test_the_command_prints_the_table_and_the_summary(runs, cli):
    done = cli("analyzer", "compare", *map(str, runs.values()))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:4] == ["run", "series", "criterion", "threshold"]
    assert lines[1].split() == ["small", "(a)", "loss:val", "minimum", "-", "4", "50.00",
                                "100.00", "(5)", "50.00"]
    assert lines[6].split() == ["model4", "(c)", "reaction:train", "minimum", "-", "none", "-",
                                "100.00", "(6)", "-", "still", "rising:", "the", "maximum",
                                "is", "at", "the", "last", "analysed", "epoch", "(6)"]
    assert lines[-1] == ("minimum: reaction:train pick vs loss:val pick, test accuracy over 3 "
                         "of 6 runs: higher in 1, equal in 1, lower in 1; mean difference "
                         "+8.33 points")
    assert len(lines) == 1 + 12 + 1


def invoke(*args: str):
    return CliRunner().invoke(analyzer, ["compare", *args])


def test_json_and_csv(runs):
    done = invoke(str(runs["d"]), str(runs["e"]), "--threshold", "0.6", "--json")
    assert done.exit_code == 0, done.output
    rows = json.loads(done.stdout)
    assert rows[1] == {"run": "model2 (d)", "model": "model2", "series": "reaction:train",
                       "criterion": "threshold", "threshold": 0.6, "epoch": 6,
                       "test_accuracy": 0.5, "best_test_accuracy": 1.0}
    assert rows[3]["epoch"] is None and rows[3]["best_test_accuracy"] is None
    assert f"note: small (e): {NO_TEST}" in done.stderr
    done = invoke(str(runs["c"]), "--csv")
    assert done.exit_code == 0, done.output
    lines = list(csv.DictReader(io.StringIO(done.stdout)))
    assert [(r["series"], r["epoch"], r["test_accuracy"][:6], r["shortfall"][:6], r["note"])
            for r in lines] == [("loss:val", "3", "0.6666", "0.3333", ""),
                                ("reaction:train", "", "", "", "still rising: the maximum "
                                 "is at the last analysed epoch (6)")]


def test_sweep_table_and_figure(runs, tmp_path):
    out = tmp_path / "figs" / "compare.png"
    done = invoke(str(runs["a"]), str(runs["d"]), "--sweep", "--out", str(out))
    assert done.exit_code == 0, done.output
    lines = [line.split() for line in done.stdout.splitlines()]
    assert lines[1] == ["small", "(a)", "42", "of", "100", "0", "42", "0", "+0.00"]
    assert lines[2] == ["model2", "(d)", "63", "of", "100", "0", "0", "63", "-25.00"]
    assert done.stdout.splitlines()[3].endswith("mean difference -15.00 points")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("args", "message"), [
    (["--out", "x.png"], "give --sweep too"),
    (["--sweep", "--out", "x.gif"], ".png, .pdf or .svg"),
    (["--json", "--csv"], "exclude each other"),
    (["--threshold", "2"], "(0, 1]"),
    (["--window", "auto"], "give --threshold auto too"),
    (["--threshold", "auto", "--window", "x"], "whole number or 'auto'"),
])
def test_errors_are_one_line(runs, args, message):
    done = invoke(str(runs["a"]), *args)
    assert done.exit_code == 1
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_missing_file_is_one_line(tmp_path):
    done = invoke(str(tmp_path / "nope.h5"))
    assert done.exit_code == 1 and "run file not found" in done.stderr


def test_the_report_compares_several_runs(runs):
    table = comparison_table(load_runs([runs["a"], runs["b"], runs["d"]]))
    assert table.caption.endswith("over 3 of 3 runs: higher in 1, equal in 1, lower in 1; "
                                  "mean difference +8.33 points")   # (50 + 0 − 25) / 3
    assert [row[:4] for row in table.rows] == [
        ("small (a)", "loss:val", "4", "50.00"), ("small (a)", "reaction:train", "5", "100.00"),
        ("small (b)", "loss:val", "3", "75.00"), ("small (b)", "reaction:train", "5", "75.00"),
        ("model2 (d)", "loss:val", "5", "100.00"),
        ("model2 (d)", "reaction:train", "4", "75.00")]
