"""`analyzer report --follow` and `analyzer plot --follow`: pages that stay current.

The run files are real: created and grown epoch by epoch with the store's own writers (the
functions the trainer and `analyzer reaction` call), in this process, while the follower
runs as the real `analyzer` command in a subprocess (or, for the Python entry point, in this
process while nothing writes).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from analyzer.live import RunState, follow_report, read_state
from analyzer.report import ReportOptions, write_report
from cli import analyzer
from store.results import SETTINGS, EpochResult, SplitImages, prepare_split, write_epoch_result
from store.runfile import (
    EpochRecord,
    create_run_file,
    read_run_progress,
    update_provenance,
    write_epoch,
)
from tests.conftest import ROOT, script

CLASSES = ["a", "b", "c"]
SIZES = {"train": 12, "test": 6}
_SETTINGS = {"layer": "features.5", "score": "logit", "target": "label", "backend": "torch",
             "weighting": "gradcam"}
REFRESH = re.compile(r'<meta http-equiv="refresh" content="(\d+)">')


def new_run(folder: Path, epochs: int) -> Path:
    """A run file planned for ``epochs`` epochs, with empty Reaction groups (none trained)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.h5"
    ids = {split: [str(i) for i in range(n)] for split, n in SIZES.items()}
    labels = {split: np.arange(n) % len(CLASSES) for split, n in SIZES.items()}
    create_run_file(path, config={"epochs": epochs, "model": "small"},
                    model_json=json.dumps({"name": "small", "in_channels": 1,
                                           "image_size": [8, 8], "num_classes": 3}),
                    class_names=CLASSES, split_ids=ids, split_labels=labels,
                    data_description="synthetic", provenance={"command": "test",
                                                              "finished": ""})
    for split in SIZES:
        prepare_split(path, split, epochs=range(1, epochs + 1), class_names=CLASSES,
                      images=SplitImages(ids[split], labels[split]),
                      settings={name: _SETTINGS.get(name, "") for name in SETTINGS},
                      device="cpu")
    return path


def train(path: Path, epoch: int) -> None:
    """Commit one training epoch, as the trainer does."""
    rng = np.random.default_rng(epoch)
    write_epoch(path, EpochRecord(epoch, 1 / epoch, 1 - 1 / (epoch + 1), 1 / epoch, 0.9,
                                  rng.random(3), rng.random(3), 0.1, 0.01, time.time(),
                                  f"epoch_{epoch:04d}.safetensors", "0" * 64))


def analyse(path: Path, epoch: int) -> None:
    """Store one checkpoint's Reaction results for every split, as `analyzer reaction` does."""
    rng = np.random.default_rng(epoch)
    for split, n in SIZES.items():
        write_epoch_result(path, split, EpochResult(
            epoch, rng.random(n).astype("f4"), (np.arange(n) % 3).astype("i2"), rng.random(3),
            rng.random(3), rng.random(3), np.zeros(3, "i4"), float(rng.random()), 0.1,
            f"epoch_{epoch:04d}.safetensors", "0" * 64))


def grow(path: Path, epochs: range) -> None:
    for epoch in epochs:
        train(path, epoch)
        analyse(path, epoch)


def finish(path: Path) -> None:
    update_provenance(path, finished="2026-12-01T21:50:03+00:00")


def follower(*args: str) -> subprocess.Popen:
    """The real `analyzer` command, running in the background."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*script("analyzer"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def page_says(page: Path, text: str) -> Callable[[], bool]:
    return lambda: page.exists() and text in page.read_text(encoding="utf-8")


def banner(page: Path) -> str:
    (text,) = re.findall(r'<p class="freshness" id="freshness">([^<]*)</p>',
                         page.read_text(encoding="utf-8"))
    return text


def no_temporary_files(folder: Path) -> bool:
    return not list(folder.glob("*.tmp"))


def test_the_state_says_how_far_training_and_analysis_are(tmp_path):
    run = new_run(tmp_path / "r", 4)
    assert read_state(run) == RunState(4, 0, False, (("test", 0, 0), ("train", 0, 0)), True)
    grow(run, range(1, 3))
    train(run, 3)
    state = read_state(run)
    assert (state.completed, state.analysed, state.analysed_all, state.done) == \
        (3, (("test", 2, 2), ("train", 2, 2)), False, False)
    assert state.describe() == "trained to epoch 3 of 4, Reaction to epoch 2 (test, train)"
    analyse(run, 3)
    finish(run)
    assert read_state(run).done


def test_the_page_follows_new_epochs_and_ends_final_when_the_run_is_done(tmp_path):
    run = new_run(tmp_path / "r", 4)
    grow(run, range(1, 3))
    page = tmp_path / "report" / "index.html"
    process = follower("report", str(run), "--out", str(page.parent), "--follow",
                       "--every", "0.3", "--no-cam")
    try:
        wait_for(page_says(page, "trained to epoch 2 of 4"))
        text = page.read_text(encoding="utf-8")
        assert REFRESH.findall(text) == ["1"] and "<script" not in text
        assert re.fullmatch(r"live: trained to epoch 2 of 4, Reaction to epoch 2 \(test, "
                            r"train\), rendered \S+; reloads every 1 s", banner(page))
        train(run, 3)
        wait_for(page_says(page, "trained to epoch 3 of 4, Reaction to epoch 2 (test, train)"))
        analyse(run, 3)
        wait_for(page_says(page, "Reaction to epoch 3"))
        assert '<td>torch</td><td class="number">3</td><td>1–3</td>' in \
            page.read_text(encoding="utf-8")  # the table of Reaction results, too
        grow(run, range(4, 5))
        finish(run)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert stdout == f"report: {page}\n"
    text = page.read_text(encoding="utf-8")
    assert REFRESH.findall(text) == [] and "2026-12-01T21:50:03+00:00" in text
    assert re.fullmatch(r"final: trained to epoch 4 of 4, Reaction to epoch 4 \(test, train\), "
                        r"rendered \S+", banner(page))
    assert no_temporary_files(page.parent)


def test_renders_are_rate_limited_and_the_page_is_always_whole(tmp_path):
    run = new_run(tmp_path / "r", 20)
    page = tmp_path / "report" / "index.html"
    every = 1.0
    process = follower("report", str(run), "--out", str(page.parent), "--follow",
                       "--every", str(every), "--no-cam")
    renders: list[tuple[int, float]] = []  # (inode, first seen): a render replaces the page
    torn: list[str] = []  # pages seen half-written (none expected)

    def watch() -> None:
        while process.poll() is None:
            try:
                inode = os.stat(page).st_ino
                text = page.read_text(encoding="utf-8")
            except FileNotFoundError:
                continue
            if not text.endswith("</html>\n"):
                torn.append(text)
            if not renders or renders[-1][0] != inode:
                renders.append((inode, time.monotonic()))
            time.sleep(0.005)

    try:
        wait_for(page.exists)
        watcher = threading.Thread(target=watch)
        watcher.start()
        for epoch in range(1, 21):  # an epoch every 0.1 s for 2 s
            grow(run, range(epoch, epoch + 1))
            time.sleep(0.1)
        finish(run)
        process.communicate(timeout=30)
        watcher.join(timeout=10)
    finally:
        process.kill()
    assert process.returncode == 0
    assert torn == []
    gaps = np.diff([seen for _, seen in renders])
    assert 2 <= len(renders) <= 2 / every + 3, renders
    assert gaps.min() >= every - 0.05, gaps
    assert "final: trained to epoch 20 of 20, Reaction to epoch 20" in banner(page)


def test_idle_ends_the_follow_of_a_run_that_stopped_changing(tmp_path):
    run = new_run(tmp_path / "r", 4)
    grow(run, range(1, 3))
    started = time.monotonic()
    page = follow_report(ReportOptions([run], tmp_path / "report", cam=False), every=0.2,
                         idle=1.0)
    assert 1.0 <= time.monotonic() - started < 15
    text = page.read_text(encoding="utf-8")
    assert REFRESH.findall(text) == []
    assert banner(page).startswith("final (no change for 1 s): trained to epoch 2 of 4, "
                                   "Reaction to epoch 2 (test, train), rendered ")


def test_a_finished_run_is_rendered_once_and_final(tmp_path):
    run = new_run(tmp_path / "r", 2)
    grow(run, range(1, 3))
    finish(run)
    page = follow_report(ReportOptions([run], tmp_path / "report", cam=False), every=30)
    assert banner(page).startswith("final: trained to epoch 2 of 2")
    assert REFRESH.findall(page.read_text(encoding="utf-8")) == []


def test_a_plain_report_has_no_banner_and_no_refresh(tmp_path):
    run = new_run(tmp_path / "r", 4)
    grow(run, range(1, 2))
    text = write_report(ReportOptions([run], tmp_path / "report", cam=False)).read_text()
    assert "http-equiv" not in text and 'class="freshness"' not in text


def test_the_stop_event_ends_the_follow_and_leaves_the_live_page(tmp_path):
    run = new_run(tmp_path / "r", 4)
    grow(run, range(1, 2))
    stop = threading.Event()
    options = ReportOptions([run], tmp_path / "report", cam=False)
    thread = threading.Thread(target=follow_report, args=(options,),
                              kwargs={"every": 0.2, "stop": stop})
    thread.start()
    page = tmp_path / "report" / "index.html"
    wait_for(page.exists)
    stop.set()
    thread.join(timeout=15)
    assert not thread.is_alive()
    assert REFRESH.findall(page.read_text(encoding="utf-8")) == ["1"]
    assert no_temporary_files(page.parent)


def test_sigterm_stops_the_follower_with_exit_code_0(tmp_path):
    run = new_run(tmp_path / "r", 4)
    grow(run, range(1, 2))
    page = tmp_path / "report" / "index.html"
    process = follower("report", str(run), "--out", str(page.parent), "--follow", "--no-cam")
    try:
        wait_for(page.exists)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=15)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert stdout == f"report: {page}\n"
    assert page.read_text(encoding="utf-8").endswith("</html>\n")
    assert no_temporary_files(page.parent)


def test_the_figures_follow_too_and_stale_scatter_plots_go(tmp_path):
    run = new_run(tmp_path / "r", 3)
    grow(run, range(1, 2))
    figures = tmp_path / "figs"
    process = follower("plot", str(run), "--out", str(figures), "--follow", "--every", "0.3",
                       "--dpi", "30")
    try:
        wait_for(lambda: (figures / "threshold_sweep.png").exists())  # the last one
        first = os.stat(figures / "model_reaction.png").st_ino
        grow(run, range(2, 4))
        finish(run)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert os.stat(figures / "model_reaction.png").st_ino != first
    assert sorted(p.name for p in figures.iterdir()) == sorted(
        f"{name}.png" for name in ("reaction_per_class", "loss_per_class",
                                   "train_accuracy_per_class", "test_accuracy_per_class",
                                   "scatter_epoch_3", "model_reaction", "threshold_sweep"))
    assert stdout.count("wrote ") == 7


@pytest.mark.parametrize("command", ["report", "plot"])
@pytest.mark.parametrize(("options", "message"), [
    (["--every", "5"], "Error: --every applies to --follow only"),
    (["--idle", "60"], "Error: --idle applies to --follow only"),
    (["--follow", "--every", "0"], "Error: --every must be more than 0 seconds, not 0"),
    (["--follow", "--idle", "-1"], "Error: --idle must be more than 0 seconds, not -1"),
])
def test_follow_option_errors_are_one_line(command, options, message, tmp_path):
    run = new_run(tmp_path / "r", 2)
    grow(run, range(1, 2))
    result = CliRunner().invoke(analyzer, [command, str(run), "--out", str(tmp_path / "out"),
                                           *options])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [message]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_page_follows_a_real_training_and_reaction_pass_to_the_end(tmp_path):
    out = tmp_path / "run"
    trainer = subprocess.Popen(
        [*script("trainer"), "run", "--out", str(out), "--epochs", "8", "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    page = tmp_path / "report" / "index.html"
    processes = [trainer]
    try:
        wait_for((out / "run.h5").exists, timeout=120)
        processes.append(follower("reaction", "--ckpt-dir", str(out / "checkpoints"),
                                  "--follow", "-q"))
        # Training alone may be over before the Reaction pass has started; a run finished
        # without /reaction groups is final at once, so the page follows from their creation.
        wait_for(lambda: read_state(out / "run.h5").analysed != (), timeout=120)
        processes.append(follower("report", str(out / "run.h5"), "--out", str(page.parent),
                                  "--follow", "--every", "1", "--no-cam"))
        for process in processes:
            _, stderr = process.communicate(timeout=240)
            assert process.returncode == 0, stderr
    finally:
        for process in processes:
            process.kill()
    assert REFRESH.findall(page.read_text(encoding="utf-8")) == []
    assert banner(page).startswith("final: trained to epoch 8 of 8, Reaction to epoch 8 "
                                   "(test, train, val), rendered ")


def test_a_poll_of_the_run_in_another_thread_never_fails_a_write(tmp_path: Path) -> None:
    # `analyzer reaction --follow` polls the run file in its loading thread while the main
    # thread writes results into it: HDF5 refuses a file for writing that the same process
    # has open for reading, so the two must take turns.
    path = new_run(tmp_path, epochs=3)
    grow(path, range(1, 2))
    stop, polls = threading.Event(), []

    def poll() -> None:
        while not stop.is_set():
            polls.append(read_run_progress(path))

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        for _ in range(100):
            analyse(path, 1)
    finally:
        stop.set()
        poller.join()
    assert len(polls) > 10 and {progress.completed_epochs for progress in polls} == {1}
