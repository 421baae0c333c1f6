"""The garbage collector paused while a pass starts (analyzer/start_up.py): paused, frozen and
given back as it was found, however the block ends."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

import analyzer.reaction as reaction
from analyzer.reaction import ReactionOptions, compute_reaction
from analyzer.start_up import start_up
from store.errors import InputError
from trainer.train import TrainConfig, train


@pytest.fixture(autouse=True)
def collector_as_found():
    """Every test starts with the collector on and nothing frozen, and leaves it so."""
    assert gc.isenabled() and gc.get_freeze_count() == 0
    yield
    gc.enable()
    gc.unfreeze()


class Cycle:
    """An object that refers to itself: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


def test_the_collector_waits_until_done_then_freezes_the_start_up_until_the_block_ends():
    with start_up() as started:
        assert not gc.isenabled()
        before = gc.get_count()[0]
        garbage = [Cycle() for _ in range(2000)]  # well past the young threshold of 700
        del garbage
        assert gc.get_count()[0] >= before + 2000  # no collection ran
        started.done()
        assert gc.isenabled()
        frozen = gc.get_freeze_count()
        assert frozen > 2000  # the start-up's garbage and everything else alive
        assert gc.collect() == 0  # frozen: no collection walks it
        started.done()  # a second call changes nothing
        assert gc.get_freeze_count() == frozen
    assert gc.isenabled() and gc.get_freeze_count() == 0
    assert gc.collect() >= 2000  # given back: the cycles are found again


def test_an_error_before_done_leaves_the_collector_on_and_nothing_frozen():
    with pytest.raises(ValueError), start_up():
        assert not gc.isenabled()
        raise ValueError("set-up failed")
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_a_collector_the_caller_disabled_stays_disabled_and_nothing_is_frozen():
    gc.disable()
    with start_up() as started:
        started.done()
        assert not gc.isenabled() and gc.get_freeze_count() == 0
    assert not gc.isenabled() and gc.get_freeze_count() == 0


def test_objects_the_process_froze_itself_stay_frozen_and_are_not_added_to():
    gc.freeze()
    theirs = gc.get_freeze_count()
    with start_up() as started:
        Cycle()
        started.done()
        assert gc.isenabled() and gc.get_freeze_count() == theirs
    assert gc.get_freeze_count() == theirs


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("start_up") / "run"
    train(TrainConfig(epochs=2), out, progress=False)
    return out


def test_a_pass_sets_up_without_collecting_and_computes_with_the_start_up_frozen(
        digits_run, tmp_path, monkeypatch):
    seen: dict[str, tuple[bool, int]] = {}

    def recorded(name, function):
        def wrapper(*args, **kwargs):
            seen[name] = (gc.isenabled(), gc.get_freeze_count())
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(reaction, "set_up_pass", recorded("set-up", reaction.set_up_pass))
    monkeypatch.setattr(reaction, "_preflight", recorded("preflight", reaction._preflight))
    monkeypatch.setattr(reaction, "compute_results",
                        recorded("checkpoints", reaction.compute_results))
    summary = compute_reaction(ReactionOptions(ckpt_dir=digits_run / "checkpoints",
                                               out=tmp_path / "r.h5", splits=["test"]),
                               progress=False)
    assert summary.analysed == 2
    assert seen["set-up"] == (False, 0) and seen["preflight"] == (False, 0)
    enabled, frozen = seen["checkpoints"]
    assert enabled and frozen > 100_000  # torch's modules among them
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_a_pass_that_fails_while_setting_up_leaves_the_collector_as_it_was(digits_run,
                                                                          tmp_path):
    with pytest.raises(InputError, match="does not exist in the model"):
        compute_reaction(ReactionOptions(ckpt_dir=digits_run / "checkpoints", layer="nope",
                                         out=tmp_path / "r.h5", splits=["test"]),
                         progress=False)
    assert gc.isenabled() and gc.get_freeze_count() == 0
