"""The analysis engine's parts on their own: the spec, the plan, the watcher, the sink."""

from __future__ import annotations

import os
import signal
import threading
import time

import h5py
import numpy as np
import pytest

from analyzer.plan import CheckpointWatcher, EpochSelection, plan_pending
from analyzer.stopping import StopRequested, StopSignals
from store.checkpoint_files import CheckpointFile, sha256_file
from store.errors import InputError
from store.results import (
    CheckpointResults,
    EpochResult,
    ResultsSink,
    SplitImages,
    read_split_results,
)
from store.runfile import update_provenance, write_epoch
from store.spec import ReactionSpec
from tests.test_store import make_run_file, record

CLASSES = ["a", "b"]
IMAGES = {"train": SplitImages(["a/1.png", "b/2.png", "b/3.png"], np.array([0, 1, 1])),
          "test": SplitImages(["a/9.png", "b/8.png"], np.array([0, 1]))}
SETTINGS = {**ReactionSpec("features.5").attributes(), "backend": "torch"}


def epoch_result(epoch: int, images: int) -> EpochResult:
    """A row whose every value is a function of the epoch (so rows can be told apart)."""
    return EpochResult(epoch, np.arange(images, dtype=np.float32) * epoch,
                       np.zeros(images, np.int16), np.array([0.1, 0.2]) * epoch,
                       np.array([1.0, 0.5]), np.array([0.3, 0.4]), np.array([0, 1]),
                       0.1 * epoch, 0.5, f"epoch_{epoch:04d}.pt", f"{epoch:064x}")


def checkpoint_results(epoch: int, splits=("train", "test")) -> CheckpointResults:
    return CheckpointResults(epoch, {s: epoch_result(epoch, len(IMAGES[s].ids)) for s in splits})


def sink(path, epochs, planned=()) -> ResultsSink:
    return ResultsSink(path, class_names=CLASSES, images=IMAGES, settings=SETTINGS,
                       devices=["cpu"], epochs=epochs, planned=planned)


# ---- the spec -------------------------------------------------------------------------------

def test_spec_round_trips_through_attributes_and_older_files_are_gradcam():
    spec = ReactionSpec("body.3", "softmax", "pred")
    assert ReactionSpec.from_attributes(spec.attributes()) == spec
    old = {"layer": "body.3", "score": "softmax", "target": "pred", "backend": "torch"}
    assert ReactionSpec.from_attributes(old) == spec
    assert spec.differences(ReactionSpec("body.3")) == [("score", "softmax", "logit"),
                                                        ("target", "pred", "label")]


@pytest.mark.parametrize("bad", [{"score": "probability"}, {"target": "truth"},
                                 {"weighting": "gradcam++"}, {"layer": ""}])
def test_spec_refuses_unknown_settings(bad):
    with pytest.raises(InputError):
        ReactionSpec(**{"layer": "x", **bad})


# ---- the plan -------------------------------------------------------------------------------

def test_epoch_selection_contains_and_chooses():
    selection = EpochSelection("1:10:3,50")
    assert [e for e in range(1, 60) if e in selection] == [1, 4, 7, 10, 50]
    assert selection.choose([1, 2, 3, 4, 50, 51]) == [1, 4, 50]
    with pytest.raises(InputError, match="no checkpoint for epoch 50"):
        selection.choose([1, 4])
    with pytest.raises(InputError, match="selects none"):
        EpochSelection("20:30").choose([1, 2])
    assert 12345 in EpochSelection(None)
    for bad in ("a", "1:2:0", "1:2:3:4"):
        with pytest.raises(InputError, match="--epochs"):
            EpochSelection(bad)


def test_plan_from_a_file_state_lists_missing_splits_and_refuses_changed_files(tmp_path):
    files = []
    for epoch in (1, 2, 3):
        path = tmp_path / f"epoch_{epoch}.pt"
        path.write_bytes(bytes([epoch]) * 10)
        files.append(CheckpointFile(epoch, path))
    done = {"train": {1: sha256_file(files[0].path), 2: sha256_file(files[1].path)},
            "test": {1: sha256_file(files[0].path)}}
    pending = plan_pending(files, ["train", "test"], done, tmp_path / "r.h5")
    assert [(p.checkpoint.epoch, p.splits) for p in pending] == [(2, ("test",)),
                                                                (3, ("train", "test"))]
    files[1].path.write_bytes(b"other weights")
    with pytest.raises(InputError, match=r"epoch_2\.pt changed since its results were stored"):
        plan_pending(files, ["train", "test"], done, tmp_path / "r.h5")


def test_watcher_yields_each_new_checkpoint_once_and_stops_when_idle(tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    (folder / "epoch_0001.pt").write_bytes(b"1")
    watcher = CheckpointWatcher(folder, (".pt",), EpochSelection("1:100:2"), {1}, None,
                                idle=0.6, stop=threading.Event(), poll=0.05)

    def write_later():
        for epoch in (2, 3, 5):
            time.sleep(0.15)
            (folder / f".epoch_{epoch:04d}.pt.tmp").write_bytes(b"x")  # not a checkpoint yet
            os.replace(folder / f".epoch_{epoch:04d}.pt.tmp", folder / f"epoch_{epoch:04d}.pt")

    writer = threading.Thread(target=write_later)
    writer.start()
    began = time.monotonic()
    seen = [c.epoch for c in watcher]
    writer.join()
    assert seen == [3, 5]  # 1 was known, 2 is not selected
    assert 0.6 < time.monotonic() - began < 5


def test_watcher_waits_for_the_run_files_commit_and_ends_when_training_finished(tmp_path):
    run_file = make_run_file(tmp_path / "run.h5", epochs=4)  # a real run file
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for epoch in (1, 2):
        (folder / f"epoch_{epoch:04d}.pt").write_bytes(b"w")
    stop = threading.Event()
    watcher = CheckpointWatcher(folder, (".pt",), EpochSelection(None), set(), run_file,
                                idle=None, stop=stop, poll=0.05)
    assert watcher.poll_once() == []  # nothing committed yet
    write_epoch(run_file, record(1))
    assert [c.epoch for c in watcher.poll_once()] == [1]
    assert watcher.poll_once() == []
    for epoch in (2, 3, 4):
        (folder / f"epoch_{epoch:04d}.pt").write_bytes(b"w")
        write_epoch(run_file, record(epoch))
    update_provenance(run_file, finished="2026-12-01T12:00:00+00:00")
    assert [c.epoch for c in watcher] == [2, 3, 4]  # and then it ends by itself
    assert watcher.state.finished and watcher.state.trained == 4 and watcher.state.planned == 4


def test_watcher_returns_when_stopped(tmp_path):
    stop = threading.Event()
    watcher = CheckpointWatcher(tmp_path, (".pt",), EpochSelection(None), set(), None,
                                idle=None, stop=stop, poll=0.05)
    threading.Timer(0.2, stop.set).start()
    assert list(watcher) == []


# ---- the sink -------------------------------------------------------------------------------

def test_sink_stores_a_whole_checkpoint_in_place(tmp_path):
    path = tmp_path / "results.h5"
    results = sink(path, [1, 2, 3])
    assert not path.exists()  # opening a sink writes nothing
    results.store(checkpoint_results(2))  # the file, its groups and this row: one replacement
    size = path.stat().st_size
    inode = path.stat().st_ino
    results.store(checkpoint_results(3))
    assert path.stat().st_ino == inode and path.stat().st_size == size  # rewritten in place
    for split in IMAGES:
        stored = read_split_results(path, split)
        assert stored["epoch"].tolist() == [2, 3]
        np.testing.assert_array_equal(stored["image_reaction"][0],
                                      np.arange(len(IMAGES[split].ids)) * 2)
        assert stored["settings"] == SETTINGS
    results.close()
    with sink(path, [1, 2, 3]) as reopened:
        assert reopened.done == {split: {2: f"{2:064x}", 3: f"{3:064x}"} for split in IMAGES}
        assert reopened.axis == [1, 2, 3]


def test_a_sink_that_stores_nothing_leaves_the_file_byte_for_byte(tmp_path):
    path = tmp_path / "results.h5"
    with sink(path, [1]) as results:
        results.store(checkpoint_results(1))
    before = path.read_bytes()
    with pytest.raises(RuntimeError), sink(path, [1, 2, 3, 4], planned=[1, 2, 3, 4]):
        raise RuntimeError("a bad checkpoint, before any result")
    assert path.read_bytes() == before
    assert not sink(tmp_path / "never.h5", [1]).path.exists()


def test_a_failed_pass_keeps_its_whole_results_and_takes_back_the_rows_it_grew(tmp_path):
    path = tmp_path / "results.h5"
    with sink(path, [1, 2]) as results:
        results.store(checkpoint_results(1))  # epoch 2: a row, not computed (as before)
    with pytest.raises(RuntimeError), sink(path, [1, 2, 3, 4, 5, 6]) as results:
        results.store(checkpoint_results(3))
        assert results.axis == [1, 2, 3, 4, 5, 6]
        raise RuntimeError("epoch 4 is a bad checkpoint")
    for split in IMAGES:
        with h5py.File(path, "r") as handle:
            assert handle[f"reaction/{split}/epoch"][()].tolist() == [1, 2, 3]
        stored = read_split_results(path, split)
        assert stored["epoch"].tolist() == [1, 3]
        np.testing.assert_array_equal(stored["model_reaction"], [0.1 * 1, 0.1 * 3])


def test_a_second_sink_on_the_same_file_is_refused_while_the_first_is_open(tmp_path):
    path = tmp_path / "results.h5"
    with sink(path, [1]) as first:
        with pytest.raises(InputError, match="another analyzer is writing results into"):
            sink(path, [1])
        first.store(checkpoint_results(1))
    with sink(path, [1]) as second:  # the first one has ended
        assert set(second.done["train"]) == {1}


def test_sink_grows_geometrically_and_trims_what_it_grew(tmp_path):
    path = tmp_path / "results.h5"
    results = sink(path, [10, 20])
    results.store(checkpoint_results(20))
    copies = 0
    for epoch in range(30, 1010, 10):
        before = path.stat().st_ino
        results.store(checkpoint_results(epoch))
        copies += path.stat().st_ino != before
    assert copies <= 7  # 98 new epochs: a copy when the axis doubles, not one per epoch
    assert results.axis[:3] == [10, 20, 30] and len(results.axis) >= 100
    results.trim(keep=[10, 20])
    assert results.axis == list(range(10, 1010, 10))
    stored = read_split_results(path, "train")
    assert stored["epoch"].tolist() == list(range(20, 1010, 10))
    np.testing.assert_array_equal(stored["model_reaction"], 0.1 * stored["epoch"])


def test_sink_grows_a_run_files_axis_to_the_planned_epochs(tmp_path):
    path = tmp_path / "results.h5"
    results = sink(path, [1, 2], planned=[1, 2])
    results.planned = [1, 2, 3, 4, 5, 6]  # a run lengthened with --resume --epochs 6
    results.store(checkpoint_results(3))
    assert results.axis == [1, 2, 3, 4, 5, 6]


def test_sink_refuses_other_settings_naming_the_stored_value(tmp_path):
    path = tmp_path / "results.h5"
    with sink(path, [1]) as first:
        first.store(checkpoint_results(1))
    other = {**SETTINGS, "score": "softmax"}
    with pytest.raises(InputError, match="score='logit', not 'softmax'"):
        ResultsSink(path, class_names=CLASSES, images=IMAGES, settings=other, devices=["cpu"],
                    epochs=[1])


def test_a_checkpoint_is_flagged_only_once_all_its_splits_are_written(tmp_path):
    path = tmp_path / "results.h5"
    results = sink(path, [1, 2])
    results.store(checkpoint_results(2))
    broken = CheckpointResults(1, {"train": epoch_result(1, 3), "test": epoch_result(1, 5)})
    with pytest.raises(TypeError):  # the test row has the wrong length: written second
        results.store(broken)
    with h5py.File(path, "r") as handle:
        assert handle["reaction/train/computed"][()].tolist() == [0, 1]
        assert handle["reaction/test/computed"][()].tolist() == [0, 1]


# ---- signals --------------------------------------------------------------------------------

def test_a_signal_during_a_write_is_held_back_until_the_write_is_over():
    written = []
    with StopSignals() as signals:
        with pytest.raises(StopRequested), signals.writing():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            written.append("whole")
        assert signals.requested.is_set()
    assert written == ["whole"]
    with StopSignals(), pytest.raises(StopRequested):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)


def test_a_format_1_0_file_without_weighting_is_read_and_extended_as_gradcam(tmp_path):
    path = tmp_path / "results.h5"
    sink(path, [1, 2]).store(checkpoint_results(1))
    with h5py.File(path, "r+") as handle:  # as format 1.0 wrote it
        handle.attrs["format_version"] = "1.0"
        for split in IMAGES:
            del handle[f"reaction/{split}"].attrs["weighting"]
    reopened = sink(path, [1, 2, 3])  # same settings, one epoch more: accepted
    reopened.store(checkpoint_results(3))
    stored = read_split_results(path, "train")
    assert stored["settings"]["weighting"] == "gradcam"
    assert stored["epoch"].tolist() == [1, 3]
