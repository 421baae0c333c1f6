"""Library notes go through `logging`; the commands show them as ``note: ...`` on stderr."""

from __future__ import annotations

import logging

import pytest

import cli


@pytest.fixture
def notes():
    """Our packages' loggers as the commands set them up, restored afterwards."""
    loggers = [logging.getLogger(name) for name in ("store", "trainer", "analyzer")]
    levels = [logger.level for logger in loggers]
    yield cli._configure_notes
    for logger, level in zip(loggers, levels, strict=True):
        logger.removeHandler(cli._NOTES)
        logger.setLevel(level)


@pytest.mark.parametrize("module", ["store.h5io", "trainer.train", "analyzer.inputs"])
def test_a_library_warning_is_one_note_line_on_stderr(notes, capsys, module):
    notes(quiet=False)
    logging.getLogger(module).warning("the val split has no images, skipped")
    assert capsys.readouterr().err == "note: the val split has no images, skipped\n"


def test_quiet_silences_the_notes_and_configuring_twice_adds_no_second_handler(notes, capsys):
    notes(quiet=False)
    notes(quiet=True)
    logging.getLogger("analyzer.onnx_export").warning("ignoring notes.txt")
    assert capsys.readouterr().err == ""
    notes(quiet=False)
    logging.getLogger("analyzer.onnx_export").warning("ignoring notes.txt")
    assert capsys.readouterr().err == "note: ignoring notes.txt\n"


def test_other_libraries_warnings_are_not_our_notes(notes, capsys):
    notes(quiet=False)
    logging.getLogger("torch.onnx").warning("exporter chatter")
    assert "note:" not in capsys.readouterr().err
