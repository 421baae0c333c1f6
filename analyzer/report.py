"""`analyzer report`: one self-contained static HTML page about one or several runs.

Everything is in the page: figures are PNG images embedded as base64 ``data:`` URIs, the
style sheet is inline, and there is no script, font, link or request of any kind, so the page
opens offline, from a mail attachment, in any browser. Sections: the runs (provenance,
configuration, Reaction settings), the curves and scatter plots of docs/METHOD.md §3 items 1–4, the
epochs each criterion of docs/METHOD.md §4 picks with the threshold sweep, and the Grad-CAM grids
(docs/METHOD.md §3 item 5) of the runs whose checkpoints are at hand.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from analyzer import features as feature_figures
from analyzer import filter_analysis as filter_figures
from analyzer.compare import COMPARE_SERIES, CompareRun, compare_rows, summarize
from analyzer.extract import Extraction, best_accuracy, extract
from analyzer.extract_file import uses_peak_rule
from analyzer.figures import (
    DEFAULT_SMOOTH,
    SWEEP_SERIES,
    NamedFigure,
    RunData,
    accuracy_by_epoch,
    load_runs,
    thesis_figures,
)
from analyzer.occlusion_figures import report_figures as occlusion_report_figures
from store.errors import InputError
from store.files import write_atomically
from store.runfile import CHECKPOINT_DIR
from store.series import HDF5_TEST_SERIES

logger = logging.getLogger(__name__)

REPORT_FILE = "index.html"
FIGURE_DPI = 90
REPORT_THRESHOLDS = (0.1, 0.3, 0.5)
_PROVENANCE_ORDER = ("command", "started", "finished", "host", "user", "seed", "python",
                     "platform", "packages", "resumes")
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222;
       padding: 0 1em; line-height: 1.4; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
caption { text-align: left; font-weight: 600; padding-bottom: 0.2em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left;
         vertical-align: top; }
th { background: #f3f3f3; } td.number { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; }
.note { color: #8a5300; } pre { background: #f7f7f7; padding: 0.5em; overflow-x: auto; }
.freshness { background: #f3f3f3; padding: 0.4em 0.6em; }
code { font-size: 0.95em; }
"""


@dataclass(frozen=True)
class ReportOptions:
    """The options of `analyzer report` (see its ``--help``)."""

    runs: Sequence[Path]
    out: Path
    ckpt_dirs: Sequence[Path] = ()
    cam: bool = True
    cam_images: int = 8
    smooth: int = DEFAULT_SMOOTH
    epoch: int | None = None
    split: str = "train"
    device: str = "auto"


@dataclass(frozen=True)
class Freshness:
    """How current a followed page is (``analyzer report --follow``, see :mod:`analyzer.live`).

    Attributes:
        text: the banner, e.g. ``live: trained to epoch 57 of 1000, ...; reloads every 30 s``.
        refresh: seconds after which the page reloads itself (a ``<meta http-equiv=refresh>``
            tag, no script); None for the final page.
    """

    text: str
    refresh: int | None = None


@dataclass(frozen=True)
class Table:
    """A table for the page: a caption, column headers and rows of cells (already text)."""

    caption: str
    header: Sequence[str]
    rows: Sequence[Sequence[str]]
    numeric: Sequence[bool] = ()


@dataclass
class ReportContent:
    """What the page shows, computed; :func:`render_html` only lays it out."""

    runs: list[RunData]
    figures: list[NamedFigure]
    extract_tables: list[Table] = field(default_factory=list)
    cam_figures: list[NamedFigure] = field(default_factory=list)
    features_figures: list[NamedFigure] = field(default_factory=list)
    filters_figures: list[NamedFigure] = field(default_factory=list)
    occlusion_figures: list[NamedFigure] = field(default_factory=list)


def write_report(options: ReportOptions, freshness: Freshness | None = None) -> Path:
    """Compute everything and write ``<out>/index.html`` (atomically: a reader sees the old
    page or the new one); return its path. ``freshness``: the banner of a followed page."""
    runs = load_runs(options.runs)
    content = ReportContent(runs, thesis_figures(runs, options.smooth, options.epoch,
                                                 options.split))
    content.extract_tables = extract_tables(runs)
    if options.cam:
        content.cam_figures = cam_figures(runs, options)
    content.features_figures = feature_figures.report_figures(runs)
    content.filters_figures = filter_figures.report_figures(runs)
    content.occlusion_figures = occlusion_report_figures(runs)
    for named in [*content.figures, *content.cam_figures, *content.occlusion_figures]:
        if named.figure is None:
            logger.warning(f"{named.caption}: skipped, {named.note}")
    page = render_html(content, freshness)
    out = Path(options.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_atomically(out / REPORT_FILE, page.encode("utf-8"))
    except OSError as error:
        raise InputError(f"cannot write {out / REPORT_FILE}: {error.strerror or error}") \
            from None
    return out / REPORT_FILE


def checkpoint_folders(runs: Sequence[RunData], given: Sequence[Path]) -> list[Path | None]:
    """The checkpoint folder of each run: ``given`` in run order, else ``checkpoints/``
    beside the run file when it exists."""
    if given and len(given) != len(runs):
        raise InputError(f"--ckpt-dir is given {len(given)} times for {len(runs)} run files: "
                         "give it once per run file, in the same order")
    if given:
        return [Path(folder) for folder in given]
    beside = [run.path.resolve().parent / CHECKPOINT_DIR for run in runs]
    return [folder if folder.is_dir() else None for folder in beside]


def cam_figures(runs: Sequence[RunData], options: ReportOptions) -> list[NamedFigure]:
    """The Grad-CAM grid of every run whose checkpoints are at hand (a note for the others)."""
    from analyzer.cam import CamOptions, cam_figure, compute_cam_grid

    named = []
    for run, folder in zip(runs, checkpoint_folders(runs, options.ckpt_dirs), strict=True):
        name = f"cam_{len(named) + 1}"
        caption = f"Grad-CAM heat maps, {run.label}"
        if folder is None:
            named.append(NamedFigure(name, caption, None,
                                     f"no checkpoint folder for {run.label}: heat maps skipped"))
            continue
        try:
            grid = compute_cam_grid(CamOptions(
                ckpt_dir=folder, images=options.cam_images, split=options.split,
                run=run.path if run.config else None, device=options.device))
        except InputError as error:  # e.g. the run's image folder is gone: the rest stands
            named.append(NamedFigure(name, caption, None, f"heat maps skipped: {error}"))
            continue
        named.append(NamedFigure(name, f"{caption}, epochs {', '.join(map(str, grid.epochs))}",
                                 cam_figure(grid)))
    return named


def extract_tables(runs: Sequence[RunData]) -> list[Table]:
    """The epochs each criterion of docs/METHOD.md §4 picks, with the test accuracy there: a summary
    in the layout of thesis table 5.1 (minimum and auto criteria), with several runs the
    comparison of `analyzer compare`, then every criterion of every run (thresholds of
    :data:`REPORT_THRESHOLDS`)."""
    picked = {run.label: _extractions(run) for run in runs}
    tables = [_summary_table(runs, picked)]
    if len(runs) > 1:
        tables.append(comparison_table(runs))
    for run in runs:
        if not picked[run.label]:
            continue
        best = _best_test_accuracy(run)
        reference = "" if best is None else \
            f" (best test accuracy of any epoch: {100 * best[1]:.2f} % at epoch {best[0]})"
        rows = [(row.series, row.criterion, _cell(row.threshold, "{:.2f}"),
                 _cell(row.epoch, "{}", "none"), _percent(row.test_accuracy),
                 row.reason or "")
                for row in picked[run.label]]
        tables.append(Table(f"Picked epochs, {run.label}: every criterion{reference}",
                            ("series", "criterion", "threshold T", "epoch", "test accuracy %",
                             "why none"),
                            rows, (False, False, True, True, True, False)))
    return tables


def comparison_table(runs: Sequence[RunData]) -> Table:
    """`analyzer compare` over the runs (minimum criterion): each pick's test accuracy, the
    best of any epoch and the shortfall, with the summary of Reaction against the loss in
    the caption."""
    compared = [CompareRun(run.path, run.label, str(run.config.get("model", "results")),
                           {name: run.series[name] for name in COMPARE_SERIES
                            if name in run.series}, run.series.get(HDF5_TEST_SERIES))
                for run in runs]
    rows = compare_rows(compared)
    summary = " ".join(s.text() for s in summarize(rows, "reaction:train", "loss:val"))
    body = [(row.run, row.series, _cell(row.epoch, "{}", "none"), _percent(row.test_accuracy),
             _percent(row.best_test_accuracy), _percent(row.shortfall), row.note)
            for row in rows]
    return Table(f"Across runs (analyzer compare), minimum criterion. {summary}",
                 ("run", "series", "epoch", "test acc %", "best test acc %", "shortfall pts",
                  "note"), body, (False, False, True, True, True, True, False))


def _extractions(run: RunData) -> list[Extraction]:
    accuracy = accuracy_by_epoch(run)
    test_epochs = np.array(sorted(accuracy), dtype=np.int64)
    test_values = np.array([accuracy[e] for e in test_epochs], dtype=np.float64)
    rows = []
    for name in SWEEP_SERIES:
        series = run.series.get(name)
        if series is None:
            continue
        rows += extract(name, series.epochs, series.values, thresholds=REPORT_THRESHOLDS,
                        auto=True, after_peak=uses_peak_rule(name), test_epochs=test_epochs,
                        test_accuracy=test_values)
    return rows


def _best_test_accuracy(run: RunData) -> tuple[int, float] | None:
    test = run.series.get(HDF5_TEST_SERIES)
    return None if test is None else best_accuracy(test.epochs, test.values)


def _summary_table(runs: Sequence[RunData], picked: dict[str, list[Extraction]]) -> Table:
    columns = [("loss:val", "minimum", "min val loss"),
               ("reaction:train", "minimum", "min Reaction after peak"),
               ("loss:val", "auto", "auto, val loss"),
               ("reaction:train", "auto", "auto, Reaction")]
    header = ["run"]
    for _, _, title in columns:
        header += [f"{title}: epoch", "acc %"]
    rows = []
    for run in runs:
        found = {(r.series, r.criterion): r for r in picked[run.label]}
        row = [run.label]
        for series, criterion, _ in columns:
            chosen = found.get((series, criterion))
            row += ["-", "-"] if chosen is None else [
                _cell(chosen.epoch, "{}", "none"), _percent(chosen.test_accuracy)]
        rows.append(row)
    return Table("Picked epochs by the minimum criterion (thesis table 5.1) and by the auto "
                 "criterion, test accuracy there", header, rows,
                 (False,) + (True,) * (len(header) - 1))


def _cell(value: object, template: str, missing: str = "-") -> str:
    return missing if value is None else template.format(value)


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.2f}"


def figure_png(figure: Figure, dpi: int = FIGURE_DPI) -> bytes:
    """The figure as PNG bytes (rendered by Agg)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def render_html(content: ReportContent, freshness: Freshness | None = None) -> str:
    """The whole page as one string; with ``freshness``, its banner under the title and,
    while it is live, the tag that reloads it."""
    labels = ", ".join(run.label for run in content.runs)
    created = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    body = [f"<h1>Reaction report</h1><p>{_e(labels)} · written {_e(created)} by "
            "<code>analyzer report</code></p>"]
    if freshness is not None:
        body.append(f'<p class="freshness" id="freshness">{_e(freshness.text)}</p>')
    body.append(_contents_list(content))
    body.append('<h2 id="runs">Runs</h2>')
    body += [_run_section(run) for run in content.runs]
    body.append('<h2 id="curves">Curves and scatter plots (thesis figs. 5.1–5.3, 5.9)</h2>')
    body += [_figure_html(named) for named in content.figures
             if named.name != "threshold_sweep"]
    body.append('<h2 id="extract">Picking the epoch (thesis §4.3.2, table 5.1, '
                'figs. 5.10–5.11)</h2>')
    body += [_table_html(table) for table in content.extract_tables] or \
        ['<p class="note">no series to pick an epoch from</p>']
    body += [_figure_html(named) for named in content.figures if named.name == "threshold_sweep"]
    body.append('<h2 id="cam">Grad-CAM heat maps</h2>')
    body += [_figure_html(named) for named in content.cam_figures] or \
        ['<p class="note">heat maps not drawn (no checkpoints at hand, or --no-cam)</p>']
    body += _stored_sections(content)
    refresh = "" if freshness is None or freshness.refresh is None else \
        f'<meta http-equiv="refresh" content="{int(freshness.refresh)}">\n'
    return ('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"{refresh}<title>Reaction report: {_e(labels)}</title>\n<style>{_STYLE}</style>\n"
            "</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


def _stored_sections(content: ReportContent) -> list[str]:
    """The sections of `analyzer occlusion`, `analyzer features` and `analyzer filters`
    results in the run files (only when some file holds them)."""
    body = []
    if content.occlusion_figures:
        body.append('<h2 id="occlusion">Occlusion sensitivity (Zeiler &amp; Fergus §4.2)</h2>')
        body += [_figure_html(named) for named in content.occlusion_figures]
    if content.features_figures:
        body.append('<h2 id="features">Feature evolution (seed 003 fig. 4)</h2>')
        body += [_figure_html(named) for named in content.features_figures]
    if content.filters_figures:
        body.append('<h2 id="filters">Filter dissimilarity (seed 004 eq. 1)</h2>')
        body += [_figure_html(named) for named in content.filters_figures]
    return body


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _contents_list(content: ReportContent) -> str:
    items = [("runs", "Runs"), ("curves", "Curves and scatter plots"),
             ("extract", "Picking the epoch"), ("cam", "Grad-CAM heat maps")]
    items += [(anchor, title) for anchor, title, figures in (
        ("occlusion", "Occlusion sensitivity", content.occlusion_figures),
        ("features", "Feature evolution", content.features_figures),
        ("filters", "Filter dissimilarity", content.filters_figures)) if figures]
    return "<nav><ul>" + "".join(f'<li><a href="#{anchor}">{_e(title)}</a></li>'
                                 for anchor, title in items) + "</ul></nav>"


def _run_section(run: RunData) -> str:
    parts = [f"<h3>{_e(run.label)}</h3><p>file <code>{_e(run.path)}</code></p>"]
    if run.provenance:
        rows = [(key, _provenance_value(key, run.provenance[key])) for key in _PROVENANCE_ORDER
                if key in run.provenance]
        rows += [(key, value) for key, value in sorted(run.provenance.items())
                 if key not in _PROVENANCE_ORDER]
        parts.append(_table_html(Table("Provenance", ("attribute", "value"), rows)))
    else:
        parts.append('<p class="note">results-only file: no provenance, no training curves</p>')
    if run.config:
        parts.append(_table_html(Table("Training configuration", ("setting", "value"),
                                       [(k, json.dumps(v)) for k, v in
                                        sorted(run.config.items())])))
    settings = [(split, results["settings"].get("layer", ""),
                 results["settings"].get("score", ""), results["settings"].get("target", ""),
                 results["settings"].get("backend", ""), str(len(results["epoch"])),
                 _epoch_span(results["epoch"]), str(len(results["label"])))
                for split, results in sorted(run.reaction.items())]
    if settings:
        parts.append(_table_html(Table(
            "Reaction results", ("split", "layer", "score", "target", "backend",
                                 "epochs analysed", "epochs", "images"), settings,
            (False,) * 5 + (True, False, True))))
    else:
        parts.append('<p class="note">no Reaction results yet (run analyzer reaction)</p>')
    return "\n".join(parts)


def _provenance_value(key: str, value: str) -> str:
    if key == "packages":
        try:
            return ", ".join(f"{name} {version}" for name, version in json.loads(value).items())
        except (ValueError, AttributeError):
            return value
    return value


def _epoch_span(epochs: np.ndarray) -> str:
    return f"{int(epochs[0])}–{int(epochs[-1])}" if len(epochs) else "none"


def _table_html(table: Table) -> str:
    numeric = list(table.numeric) + [False] * (len(table.header) - len(table.numeric))
    head = "".join(f"<th>{_e(cell)}</th>" for cell in table.header)
    rows = "".join("<tr>" + "".join(
        f'<td class="number">{_e(cell)}</td>' if numeric[i] else f"<td>{_e(cell)}</td>"
        for i, cell in enumerate(row)) + "</tr>" for row in table.rows)
    return (f"<table><caption>{_e(table.caption)}</caption><thead><tr>{head}</tr></thead>"
            f"<tbody>{rows}</tbody></table>")


def _figure_html(named: NamedFigure) -> str:
    if named.figure is None:
        return f'<p class="note">{_e(named.caption)}: skipped, {_e(named.note)}</p>'
    data = base64.b64encode(figure_png(named.figure)).decode("ascii")
    return (f'<figure id="{_e(named.name)}"><img alt="{_e(named.caption)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{_e(named.caption)}'
            "</figcaption></figure>")
