"""`analyzer report`: one self-contained page with every figure and table, shown by Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from analyzer.figures import load_runs
from analyzer.report import (
    ReportContent,
    ReportOptions,
    cam_figures,
    checkpoint_folders,
    render_html,
)
from cli import analyzer
from store.errors import InputError
from tests.conftest import ROOT
from tests.test_figures import EPOCHS, analysed_runs

CHROMIUM = Path("/usr/bin/chromium")
CHECK_SCRIPT = ROOT / "scripts" / "check_report_in_chromium.sh"
FIGURES = ("reaction_per_class", "loss_per_class", "train_accuracy_per_class",
           "test_accuracy_per_class", f"scatter_epoch_{EPOCHS}", "model_reaction",
           "threshold_sweep", "cam_1", "cam_2")


@pytest.fixture(scope="module")
def run_files(tmp_path_factory) -> list[Path]:
    return analysed_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def report(run_files, tmp_path_factory) -> Path:
    """The report of both runs, written by the `analyzer report` command (in this process)."""
    out = tmp_path_factory.mktemp("report")
    result = CliRunner().invoke(analyzer, ["report", *map(str, run_files), "--out", str(out),
                                           "--cam-images", "3", "--smooth", "2",
                                           "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"report: {out / 'index.html'}"
    return out / "index.html"


def test_the_report_embeds_every_figure_as_a_png(report):
    page = report.read_text(encoding="utf-8")
    ids = re.findall(r'<figure id="([^"]+)"><img alt="[^"]*" src="data:image/png;base64,', page)
    assert ids == list(FIGURES)
    assert page.count("<img ") == len(FIGURES)


def test_the_report_is_self_contained(report):
    page = report.read_text(encoding="utf-8")
    assert "<script" not in page and "<link" not in page and "url(" not in page
    assert re.findall(r'src="(?!data:image/png;base64,)', page) == []
    assert re.findall(r'href="(?!#)', page) == []


def test_the_report_has_provenance_settings_and_extract_tables_for_each_run(report, run_files):
    page = report.read_text(encoding="utf-8")
    captions = re.findall(r"<caption>([^<]*)</caption>", page)
    assert captions.count("Provenance") == 2
    assert captions.count("Training configuration") == 2
    assert captions.count("Reaction results") == 2
    assert any(c.startswith("Picked epochs") for c in captions)
    assert "<h3>small (a)</h3>" in page and "<h3>small (b)</h3>" in page
    assert f"trainer run --out {run_files[0].parent}" in page
    for split in ("train", "val", "test"):
        assert f"<td>{split}</td><td>features.5</td><td>logit</td><td>label</td>" in page


def test_the_report_renders_in_headless_chromium(report):
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium); "
                    "CI installs it and runs this check")
    result = subprocess.run([str(CHECK_SCRIPT), str(report), str(len(FIGURES))],
                            capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(FIGURES)} images, all decoded, no console message" in result.stdout


def test_the_chromium_check_fails_on_a_broken_image_and_a_script_error(tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><body><img src="data:image/png;base64,AAAA">'
                    "<script>notDefined();</script></body></html>", encoding="utf-8")
    result = subprocess.run([str(CHECK_SCRIPT), str(page)], capture_output=True, text=True,
                            timeout=240, check=False)
    assert result.returncode == 1
    assert "only 0 of 1 images decoded" in result.stderr
    assert "notDefined is not defined" in result.stderr


def test_heat_maps_are_skipped_with_a_note_without_checkpoints(run_files, tmp_path):
    run = tmp_path / "bare" / "run.h5"
    run.parent.mkdir()
    shutil.copy(run_files[0], run)
    (named,) = cam_figures(load_runs([run]), ReportOptions(runs=[run], out=tmp_path))
    assert named.figure is None
    assert named.note == "no checkpoint folder for small (bare): heat maps skipped"
    page = render_html(ReportContent(load_runs([run]), [], cam_figures=[named]))
    assert "heat maps skipped" in page and "<img" not in page


def test_checkpoint_folders_default_to_the_run_folder_and_must_match_the_runs(run_files):
    runs = load_runs(run_files)
    assert checkpoint_folders(runs, []) == [p.parent.resolve() / "checkpoints"
                                            for p in run_files]
    with pytest.raises(InputError, match="once per run file"):
        checkpoint_folders(runs, [Path("x")])


def test_every_criterion_without_an_epoch_says_why_in_the_report(report):
    page = report.read_text(encoding="utf-8")
    assert "<th>why none</th>" in page
    rows = re.findall(r"<tr>((?:<td[^>]*>[^<]*</td>){6})</tr>", page)
    cells = [re.findall(r"<td[^>]*>([^<]*)</td>", row) for row in rows]
    unanswered = [row for row in cells if row[3] == "none"]
    assert unanswered, "the short runs leave the auto criterion without an epoch"
    assert all(row[5] for row in unanswered), unanswered
    assert all(not row[5] for row in cells if row[3] != "none")
