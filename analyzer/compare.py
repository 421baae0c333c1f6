"""`analyzer compare`: the epochs the criteria pick, run by run (thesis table 5.1, fig. 5.11).

The question (docs/METHOD.md §4): does picking the epoch by Reaction beat picking it by the
validation loss? For every run, series and criterion :func:`compare_rows` gives the chosen
epoch, the test accuracy there and the best test accuracy of any epoch; :func:`summarize`
counts how often the Reaction pick's test accuracy is higher than, equal to or lower than the
baseline's (the loss) and the mean difference in points. Both are pure functions of series;
the criteria are those of :mod:`analyzer.extract`. :func:`load_compare_runs` reads the runs
through :mod:`store.series`; accuracy is per run, so runs of different class sets compare.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from analyzer.extract import DEFAULT_WINDOW, SWEEP_THRESHOLDS, best_accuracy, extract
from analyzer.extract_file import AUTO, uses_peak_rule
from analyzer.figures import run_colour
from store.errors import InputError
from store.files import write_atomically
from store.runfile import read_run_info
from store.series import Series, is_csv, read_series, read_test_accuracy, series_names

COMPARE_SERIES = ("loss:val", "reaction:train")
"""Default series, in table 5.1's order: the validation loss, then the training Reaction."""
FIGURE_FORMATS = ("png", "pdf", "svg")

Criterion = tuple[str, float | None]
"""``("minimum", None)``, ``("auto", None)`` or ``("threshold", T)``."""


@dataclass(frozen=True)
class CompareRun:
    """One run: its label (``"<model> (<folder>)"``, unique among the runs), model name, the
    requested series the file holds (by name) and its test accuracy (None: no test results)."""

    path: Path
    label: str
    model: str
    series: dict[str, Series]
    test: Series | None


@dataclass(frozen=True)
class CompareRow:
    """One run × series × criterion: the chosen epoch (None: none qualifies) and the test
    accuracy there, the best of any epoch (fractions, None: unknown), and a note saying why
    something is missing (empty when nothing is)."""

    run: str
    model: str
    series: str
    criterion: str
    threshold: float | None
    epoch: int | None
    test_accuracy: float | None
    best_test_epoch: int | None
    best_test_accuracy: float | None
    note: str = ""

    @property
    def shortfall(self) -> float | None:
        """How far the pick falls short of the best test accuracy (a fraction), or None."""
        if self.test_accuracy is None or self.best_test_accuracy is None:
            return None
        return self.best_test_accuracy - self.test_accuracy

    def to_json(self) -> dict:
        """The object printed by ``analyzer compare --json``."""
        return {"run": self.run, "model": self.model, "series": self.series,
                "criterion": self.criterion, "threshold": self.threshold, "epoch": self.epoch,
                "test_accuracy": self.test_accuracy,
                "best_test_accuracy": self.best_test_accuracy}


@dataclass(frozen=True)
class Summary:
    """Reaction's picks against the baseline's over runs (and thresholds) for one criterion.

    ``pairs`` counts the (run, threshold) pairs, ``compared`` those where both picks have a
    test accuracy; ``mean_difference`` is in percentage points, Reaction − baseline (None when
    nothing compared).
    """

    criterion: str
    thresholds: tuple[float, ...]
    reaction: str
    baseline: str
    pairs: int
    higher: int
    equal: int
    lower: int
    mean_difference: float | None

    @property
    def compared(self) -> int:
        """Pairs where both picks have a test accuracy."""
        return self.higher + self.equal + self.lower

    def text(self) -> str:
        """One line, e.g. ``minimum: reaction:train pick vs loss:val pick over 3 of 6 runs:
        higher in 1, equal in 1, lower in 1; mean difference +8.33 points``."""
        what = self.criterion
        if len(self.thresholds) == 1:
            what += f" T={self.thresholds[0]:.2f}"
        elif self.thresholds:
            what += f" T={self.thresholds[0]:.2f}…{self.thresholds[-1]:.2f}"
        unit = "run × threshold pairs" if len(self.thresholds) > 1 else "runs"
        mean = "no mean difference" if self.mean_difference is None else \
            f"mean difference {self.mean_difference:+.2f} points"
        return (f"{what}: {self.reaction} pick vs {self.baseline} pick, test accuracy over "
                f"{self.compared} of {self.pairs} {unit}: higher in {self.higher}, equal in "
                f"{self.equal}, lower in {self.lower}; {mean}")


def parse_criteria(criterion: str | None, threshold: float | str | None, sweep: bool,
                   window: int) -> list[Criterion]:
    """The criteria of the command's options: minimum by default; ``threshold`` T (or
    ``"auto"``, from :func:`analyzer.extract_file.parse_threshold`) for the threshold
    criterion (T = 0.3 when not given); ``sweep``: every T = 0.01 … 1.00."""
    if window < 2:
        raise InputError(f"--window must be at least 2, not {window}")
    if sweep:
        if threshold is not None or criterion == "minimum":
            raise InputError("--sweep covers every threshold T = 0.01 … 1.00: drop "
                             + ("--threshold" if threshold is not None else "--criterion"))
        return [("threshold", float(t)) for t in SWEEP_THRESHOLDS]
    if criterion == "minimum" and threshold is not None:
        raise InputError("--threshold applies to --criterion threshold only")
    if criterion is None:
        criterion = "minimum" if threshold is None else "threshold"
    if criterion == "minimum":
        return [("minimum", None)]
    if threshold == AUTO:
        return [("auto", None)]
    return [("threshold", 0.3 if threshold is None else float(threshold))]


def compare_rows(runs: Sequence[CompareRun], series: Sequence[str] = COMPARE_SERIES,
                 criteria: Sequence[Criterion] = (("minimum", None),),
                 window: int = DEFAULT_WINDOW,
                 auto_window: int | None = None) -> list[CompareRow]:
    """Rows run by run, then series by series, then criterion (thresholds, auto, minimum).

    ``window``: the threshold criterion's; ``auto_window``: the auto criterion's (None: the
    rule of :func:`analyzer.extract.auto_window`).

    The minimum is taken after the peak for Reaction series (:func:`uses_peak_rule`). A run
    without a series or without test results still has its rows, with a note.
    """
    thresholds = [t for c, t in criteria if c == "threshold" and t is not None]
    auto = any(c == "auto" for c, _ in criteria)
    minimum = any(c == "minimum" for c, _ in criteria)
    ordered = [("threshold", t) for t in thresholds] + [("auto", None)] * auto \
        + [("minimum", None)] * minimum
    rows = []
    for run in runs:
        best = None if run.test is None else best_accuracy(run.test.epochs, run.test.values)
        best_epoch, best_value = (None, None) if best is None else best
        no_test = "no test results (accuracy:test): run analyzer reaction on the test split"
        for name in series:
            found = run.series.get(name)
            if found is None:
                note = f"no {name} in this file"
                if name.startswith("reaction:"):
                    note += " (run analyzer reaction)"
                if run.test is None:
                    note += "; " + no_test
                rows += [CompareRow(run.label, run.model, name, c, t, None, None, best_epoch,
                                    best_value, note) for c, t in ordered]
                continue
            picked = extract(name, found.epochs, found.values, thresholds=thresholds,
                             auto=auto, minimum=minimum, after_peak=uses_peak_rule(name),
                             window=window, auto_window=auto_window,
                             test_epochs=None if run.test is None else run.test.epochs,
                             test_accuracy=None if run.test is None else run.test.values)
            for row in picked:
                if run.test is None:
                    note = no_test
                elif row.epoch is None:
                    note = row.reason or "no epoch satisfies the criterion"
                elif row.test_accuracy is None:
                    note = f"no test result at epoch {row.epoch}"
                else:
                    note = ""
                rows.append(CompareRow(run.label, run.model, name, row.criterion,
                                       row.threshold, row.epoch, row.test_accuracy,
                                       best_epoch, best_value, note))
    return rows


def reaction_and_baseline(series: Sequence[str]) -> tuple[str, str] | None:
    """The pair the summary compares: the first Reaction series (minimum after the peak) and
    the first other series; None when the series lack either."""
    reaction = next((s for s in series if uses_peak_rule(s)), None)
    baseline = next((s for s in series if not uses_peak_rule(s)), None)
    return None if reaction is None or baseline is None else (reaction, baseline)


def summarize(rows: Sequence[CompareRow], reaction: str, baseline: str) -> list[Summary]:
    """One :class:`Summary` per criterion of ``rows`` (every threshold of a sweep together):
    the ``reaction`` series' pick against the ``baseline``'s, run by run and T by T. Equal
    means the same test accuracy, not necessarily the same epoch."""
    picks = {(r.run, r.series, r.criterion, r.threshold): r.test_accuracy for r in rows}
    summaries = []
    for criterion in dict.fromkeys(r.criterion for r in rows):
        keys = list(dict.fromkeys((r.run, r.threshold) for r in rows
                                  if r.criterion == criterion and r.series == reaction))
        differences = []
        for run, threshold in keys:
            ours = picks.get((run, reaction, criterion, threshold))
            theirs = picks.get((run, baseline, criterion, threshold))
            if ours is not None and theirs is not None:
                differences.append(100 * (ours - theirs))
        thresholds = tuple(dict.fromkeys(t for _, t in keys if t is not None))
        summaries.append(Summary(
            criterion, thresholds, reaction, baseline, len(keys),
            sum(d > 0 and not _same(d) for d in differences),
            sum(_same(d) for d in differences),
            sum(d < 0 and not _same(d) for d in differences),
            float(np.mean(differences)) if differences else None))
    return summaries


def _same(difference: float) -> bool:
    """Equal test accuracies (in points; float noise of k/n fractions ignored)."""
    return math.isclose(difference, 0.0, abs_tol=1e-9)


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.2f}"


def format_table(rows: Sequence[CompareRow]) -> str:
    """The table (thesis table 5.1, one line per run × series × criterion): run, series,
    criterion, T, epoch, test accuracy %, best test accuracy % (epoch), shortfall in
    points, note."""
    header = ("run", "series", "criterion", "threshold", "epoch", "test acc %",
              "best test acc % (epoch)", "shortfall pts", "note")
    lines = [header]
    for row in rows:
        best = "-" if row.best_test_accuracy is None else \
            f"{_percent(row.best_test_accuracy)} ({row.best_test_epoch})"
        lines.append((row.run, row.series, row.criterion,
                      "-" if row.threshold is None else f"{row.threshold:.2f}",
                      "none" if row.epoch is None else str(row.epoch),
                      _percent(row.test_accuracy), best, _percent(row.shortfall), row.note))
    return _columns(lines, left={0, 1, 2, 8})


def format_sweep_table(rows: Sequence[CompareRow], reaction: str, baseline: str) -> str:
    """With ``--sweep``: one line per run, the counts of :func:`summarize` over its
    thresholds (higher, equal, lower, mean difference in points)."""
    header = ("run", "compared T", "higher", "equal", "lower", "mean diff pts")
    lines = [header]
    for run in dict.fromkeys(r.run for r in rows):
        for summary in summarize([r for r in rows if r.run == run], reaction, baseline):
            mean = "-" if summary.mean_difference is None else f"{summary.mean_difference:+.2f}"
            lines.append((run, f"{summary.compared} of {summary.pairs}", str(summary.higher),
                          str(summary.equal), str(summary.lower), mean))
    return _columns(lines, left={0})


def _columns(lines: Sequence[Sequence[str]], left: set[int]) -> str:
    widths = [max(len(line[k]) for line in lines) for k in range(len(lines[0]))]
    return "\n".join(
        "  ".join(cell.ljust(widths[k]) if k in left else cell.rjust(widths[k])
                  for k, cell in enumerate(line)).rstrip()
        for line in lines)


def to_json(rows: Sequence[CompareRow]) -> str:
    """``--json``: a list of :meth:`CompareRow.to_json` objects."""
    return json.dumps([row.to_json() for row in rows], indent=1)


def to_csv(rows: Sequence[CompareRow]) -> str:
    """``--csv``: the JSON keys plus ``best_test_epoch``, ``shortfall`` and ``note``
    (fractions; an empty cell is unknown or none)."""
    columns = ("run", "model", "series", "criterion", "threshold", "epoch", "test_accuracy",
               "best_test_accuracy", "best_test_epoch", "shortfall", "note")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        values = {**row.to_json(), "best_test_epoch": row.best_test_epoch,
                  "shortfall": row.shortfall, "note": row.note}
        writer.writerow(["" if values[c] is None else values[c] for c in columns])
    return buffer.getvalue()


def load_compare_runs(paths: Sequence[Path],
                      series: Sequence[str] = COMPARE_SERIES) -> list[CompareRun]:
    """Read ``series`` (those each file holds) and the test accuracy of every file.

    The label is ``"<model> (<folder>)"`` (the model of a run file; ``results`` for a
    results file, ``csv`` for a CSV), with the file's path added when two labels clash.
    """
    runs = []
    for path in map(Path, paths):
        if not path.is_file():
            raise InputError(f"run file not found: {path}")
        names = set(series_names(path))
        found = {name: read_series(path, name) for name in series if name in names}
        model = "csv" if is_csv(path) else _model_name(path)
        folder = path.resolve().parent.name
        runs.append(CompareRun(path, f"{model} ({folder})" if folder else model, model,
                               found, read_test_accuracy(path)))
    labels = [run.label for run in runs]
    return [CompareRun(r.path, f"{r.label} [{r.path}]", r.model, r.series, r.test)
            if labels.count(r.label) > 1 else r for r in runs]


def _model_name(path: Path) -> str:
    try:
        return str(json.loads(read_run_info(path).model).get("name", "model"))
    except InputError:  # a stand-alone results file has no model
        return "results"


def sweep_figure(rows: Sequence[CompareRow]) -> Figure:
    """Fig. 5.10 and 5.11 per run, the runs side by side: the epoch each series' threshold
    criterion picks (top) and the test accuracy there (bottom) against T, the best test
    accuracy of any epoch dotted. ``rows``: those of a sweep, one run at least."""
    swept = [r for r in rows if r.criterion == "threshold"]
    runs = list(dict.fromkeys(r.run for r in swept))
    figure = Figure(figsize=(4.0 * len(runs) + 0.5, 6.5), layout="constrained")
    axes = figure.subplots(2, len(runs), sharex=True, squeeze=False)
    for column, run in enumerate(runs):
        top, bottom = axes[0, column], axes[1, column]
        mine = [r for r in swept if r.run == run]
        for index, name in enumerate(dict.fromkeys(r.series for r in mine)):
            curve = [r for r in mine if r.series == name]
            thresholds = [r.threshold for r in curve]
            style = "-" if uses_peak_rule(name) else "--"
            top.plot(thresholds, [math.nan if r.epoch is None else r.epoch for r in curve],
                     style, color=run_colour(index), label=name)
            bottom.plot(thresholds, [math.nan if r.test_accuracy is None
                                     else 100 * r.test_accuracy for r in curve],
                        style, color=run_colour(index), label=name)
        if mine[0].best_test_accuracy is not None:
            bottom.axhline(100 * mine[0].best_test_accuracy, color="grey", linestyle=":",
                           label=f"best, epoch {mine[0].best_test_epoch}")
        top.set_title(run, fontsize=10)
        bottom.set_xlabel("threshold T")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
        bottom.legend(fontsize=7)
    axes[0, 0].set_ylabel("extracted epoch")
    axes[1, 0].set_ylabel("test accuracy at the extracted epoch (%)")
    figure.suptitle("Threshold criterion against T, per run (figs. 5.10, 5.11)")
    return figure


def write_figure(figure: Figure, path: Path) -> None:
    """Save ``figure`` to ``path`` (format from its suffix: png, pdf or svg), atomically."""
    path = Path(path)
    image_format = path.suffix.lower().lstrip(".")
    if image_format not in FIGURE_FORMATS:
        raise InputError(f"--out {path}: the figure is written as .png, .pdf or .svg")
    buffer = io.BytesIO()
    figure.savefig(buffer, format=image_format, dpi=100)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, buffer.getvalue())
    except OSError as error:
        raise InputError(f"cannot write {path}: {error.strerror or error}") from None
