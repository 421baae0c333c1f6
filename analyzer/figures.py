"""The thesis's figures (METHOD.md §3 items 1–4) as matplotlib Figures, from one or several runs.

Every drawing function takes data (:class:`RunData`, arrays) and returns a
:class:`matplotlib.figure.Figure` built without pyplot, so nothing depends on a display or a
global backend (rendering uses Agg). Several runs are overlaid, one colour per run, each
labelled ``"<model name> (<run folder>)"``. Data a run lacks (no ``/reaction/test``, no
training curves in a results-only file) leaves that run out of a figure; a figure no run can
feed is skipped with a note, never an error.

Curves are smoothed by :func:`moving_average` over the *analysed* epochs: with ``smooth=N``
each point is the mean of the N analysed epochs centred on it (fewer at both ends).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from analyzer.extract import DEFAULT_WINDOW, SWEEP_THRESHOLDS, sweep
from store.errors import InputError
from store.files import write_atomically
from store.results import read_results_classes, read_split_results, result_splits
from store.runfile import read_provenance, read_run_info, read_training_curves
from store.series import DEFAULT_SERIES, HDF5_TEST_SERIES, Series, read_series, series_names

logger = logging.getLogger(__name__)

DEFAULT_SMOOTH = 10
SWEEP_SERIES = DEFAULT_SERIES  # model Reaction of the training images, validation loss
REACTION_LABEL = "Reaction (a.u.)"
# Per-class quantities of fig. 5.2a–d: (split, /reaction/<split> variable, y label, scale).
PER_CLASS = {
    "reaction": ("{split}", "class_reaction", f"class {REACTION_LABEL}", 1.0),
    "loss": ("{split}", "loss", "loss (nat, cross-entropy)", 1.0),
    "train_accuracy": ("train", "accuracy", "training accuracy (%)", 100.0),
    "test_accuracy": ("test", "accuracy", "test accuracy (%)", 100.0),
}
_TITLES = {
    "reaction": "Reaction per class, {split} images",
    "loss": "Loss per class, {split} images (eval mode)",
    "train_accuracy": "Training accuracy per class (eval mode)",
    "test_accuracy": "Test accuracy per class",
}


@dataclass(frozen=True)
class RunData:
    """What the figures read from one run or results file.

    Attributes:
        path: the file.
        label: ``"<model name> (<run folder>)"``, the run's name in legends.
        class_names: class index ``i`` is ``class_names[i]``.
        reaction: ``read_split_results`` of every split with results (computed epochs only).
        training: ``read_training_curves``, or None for a results-only file.
        provenance: ``/provenance`` attributes (empty for a results-only file).
        config: the trainer's configuration (empty for a results-only file).
        series: the series of :data:`SWEEP_SERIES` and the test accuracy (``accuracy:test``)
            that the file holds, read by :mod:`store.series`.
    """

    path: Path
    label: str
    class_names: list[str]
    reaction: dict[str, dict] = field(default_factory=dict)
    training: dict[str, np.ndarray] | None = None
    provenance: dict[str, str] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    series: dict[str, Series] = field(default_factory=dict)


def load_run(path: Path) -> RunData:
    """Read a run file (or a stand-alone results file) for the figures."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"run file not found: {path}")
    reaction = {split: read_split_results(path, split) for split in result_splits(path)}
    names = set(series_names(path))
    series = {name: read_series(path, name) for name in (*SWEEP_SERIES, HDF5_TEST_SERIES)
              if name in names}
    try:
        info = read_run_info(path)
    except InputError:
        classes = [str(name) for name in next(iter(reaction.values()))["class"]] if reaction \
            else read_results_classes(path)  # only occlusion, features or filters, maybe
        if classes is None:
            raise InputError(f"{path} is neither a run file nor a file with Reaction results") \
                from None
        return RunData(path, _run_label("results", path), classes, reaction, series=series)
    model_name = json.loads(info.model).get("name", "model")
    curves = read_training_curves(path)
    return RunData(path, _run_label(model_name, path), info.class_names, reaction,
                   curves if len(curves["epoch"]) else None, read_provenance(path), info.config,
                   series)


def _run_label(model_name: str, path: Path) -> str:
    folder = path.resolve().parent.name
    return f"{model_name} ({folder})" if folder else model_name


def load_runs(paths: Sequence[Path]) -> list[RunData]:
    """:func:`load_run` for each path; labels made unique by the file's path when they clash."""
    runs = [load_run(p) for p in paths]
    labels = [r.label for r in runs]
    return [replace(r, label=f"{r.label} [{r.path}]") if labels.count(r.label) > 1 else r
            for r in runs]


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average: the mean of the ``window`` values around each point.

    Point i averages indices ``i - window // 2`` … ``i + (window - 1) // 2``, clipped to the
    series, ignoring NaN; a window of 1 (or less) returns the values unchanged.
    """
    values = np.asarray(values, dtype=np.float64)
    if window <= 1 or values.size == 0:
        return values.copy()
    finite = np.isfinite(values)
    sums = np.concatenate([[0.0], np.cumsum(np.where(finite, values, 0.0))])
    counts = np.concatenate([[0], np.cumsum(finite)])
    index = np.arange(values.size)
    start = np.clip(index - window // 2, 0, values.size)
    stop = np.clip(index + (window - 1) // 2 + 1, 0, values.size)
    n = counts[stop] - counts[start]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (sums[stop] - sums[start]) / n, np.nan)


def run_colour(index: int) -> tuple[float, float, float, float]:
    """The colour of the ``index``-th run in every figure."""
    return colormaps["tab10"](index % 10)


def _smoothing_note(smooth: int) -> str:
    return f"moving average of {smooth} analysed epochs" if smooth > 1 else "not smoothed"


def _grid(count: int, columns: int = 5) -> tuple[int, int]:
    columns = max(1, min(columns, count))
    return -(-count // columns), columns


def per_class_figure(runs: Sequence[RunData], quantity: str, smooth: int = DEFAULT_SMOOTH,
                     split: str = "train") -> Figure | None:
    """Fig. 5.2a–d: one subplot per class, ``quantity`` against the epoch, runs overlaid.

    ``quantity`` is ``reaction`` or ``loss`` (of ``split``), ``train_accuracy`` or
    ``test_accuracy``; all come from ``/reaction/<split>`` (eval mode, analysed epochs).
    None when no run has that split's results.
    """
    split_template, variable, y_label, scale = PER_CLASS[quantity]
    source = split_template.format(split=split)
    feeding = [(i, r) for i, r in enumerate(runs) if source in r.reaction]
    if not feeding:
        return None
    classes = feeding[0][1].class_names
    rows, columns = _grid(len(classes))
    figure = Figure(figsize=(3.2 * columns, 2.4 * rows + 0.9), layout="constrained")
    axes = figure.subplots(rows, columns, sharex=True, squeeze=False).ravel()
    for index, run in feeding:
        results = run.reaction[source]
        for c, name in enumerate(classes):
            if name not in run.class_names:  # runs are matched class by class, by name
                continue
            values = results[variable][:, run.class_names.index(name)]
            axes[c].plot(results["epoch"], scale * moving_average(values, smooth),
                         color=run_colour(index), linewidth=1.0, label=run.label)
    for c, name in enumerate(classes):
        axes[c].set_title(f"class {name}", fontsize=10)
        axes[c].grid(alpha=0.3)
        if c % columns == 0:
            axes[c].set_ylabel(y_label)
        if c + columns >= len(classes):
            axes[c].set_xlabel("epoch")
            axes[c].xaxis.set_tick_params(labelbottom=True)
    for extra in axes[len(classes):]:
        extra.set_visible(False)
    figure.suptitle(f"{_TITLES[quantity].format(split=split)}; {_smoothing_note(smooth)}")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4))
    return figure


def default_epoch(runs: Sequence[RunData], splits: Sequence[str] = ("train", "test")
                  ) -> int | None:
    """The last epoch analysed on every one of ``splits`` in every run that has them; if they
    share none, the last epoch analysed on the first split (the earliest over the runs)."""
    analysed = [set(r.reaction[s]["epoch"].tolist()) for r in runs for s in splits
                if s in r.reaction and len(r.reaction[s]["epoch"])]
    common = set.intersection(*analysed) if analysed else set()
    if common:
        return max(common)
    last = [int(r.reaction[splits[0]]["epoch"][-1]) for r in runs
            if splits[0] in r.reaction and len(r.reaction[splits[0]]["epoch"])]
    return min(last) if last else None


def scatter_figure(runs: Sequence[RunData], epoch: int,
                   splits: Sequence[str] = ("train", "test")) -> Figure | None:
    """Fig. 5.1 and 5.3: class Reaction against class accuracy at ``epoch``, one point per class.

    One row per run, one column per split; a panel whose run lacks the split or the epoch
    says so. None when no run has any of the splits at ``epoch``.
    """
    if not any(_epoch_row(r, s, epoch) is not None for r in runs for s in splits):
        return None
    figure = Figure(figsize=(5.0 * len(splits), 4.0 * len(runs) + 0.5), layout="constrained")
    axes = figure.subplots(len(runs), len(splits), squeeze=False)
    for r, run in enumerate(runs):
        for s, split in enumerate(splits):
            _scatter_panel(axes[r, s], run, split, epoch, run_colour(r))
    figure.suptitle(f"Class Reaction against class accuracy at epoch {epoch}")
    return figure


def _epoch_row(run: RunData, split: str, epoch: int) -> int | None:
    if split not in run.reaction:
        return None
    rows = np.flatnonzero(run.reaction[split]["epoch"] == epoch)
    return int(rows[0]) if len(rows) else None


def _scatter_panel(axes, run: RunData, split: str, epoch: int, colour) -> None:
    axes.set_title(f"{run.label}: {split} images", fontsize=10)
    row = _epoch_row(run, split, epoch)
    if row is None:
        axes.text(0.5, 0.5, f"no {split} results at epoch {epoch}", ha="center",
                  va="center", transform=axes.transAxes)
        axes.set_axis_off()
        return
    results = run.reaction[split]
    accuracy = 100.0 * results["accuracy"][row]
    reaction = results["class_reaction"][row]
    axes.scatter(accuracy, reaction, color=colour, label=run.label)
    for name, x, y in zip(run.class_names, accuracy, reaction, strict=False):
        axes.annotate(name, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=8)
    axes.set_xlim(min(float(np.nanmin(accuracy)) - 2.0, 95.0), 101.0)
    axes.set_xlabel(f"{split} accuracy of the class (%)")
    axes.set_ylabel(f"class {REACTION_LABEL}", fontsize=9)
    axes.grid(alpha=0.3)


def model_reaction_figure(runs: Sequence[RunData], smooth: int = DEFAULT_SMOOTH,
                          split: str = "train") -> Figure | None:
    """Fig. 5.9: model Reaction (mean of the class Reactions) against the epoch, runs overlaid."""
    feeding = [(i, r) for i, r in enumerate(runs) if split in r.reaction]
    if not feeding:
        return None
    figure = Figure(figsize=(8.0, 4.5), layout="constrained")
    axes = figure.subplots()
    for index, run in feeding:
        results = run.reaction[split]
        axes.plot(results["epoch"], moving_average(results["model_reaction"], smooth),
                  color=run_colour(index), linewidth=1.2, label=run.label)
    axes.set_xlabel("epoch")
    axes.set_ylabel(f"model {REACTION_LABEL}")
    axes.set_title(f"Model Reaction, {split} images; {_smoothing_note(smooth)}")
    axes.grid(alpha=0.3)
    axes.legend()
    return figure


@dataclass(frozen=True)
class SweepCurve:
    """One criterion swept over thresholds for one run (fig. 5.10, 5.11).

    ``epochs[k]`` is the epoch the threshold criterion picks at ``thresholds[k]`` (NaN when
    none), ``test_accuracy[k]`` the test accuracy there (fraction, NaN when unknown).
    """

    run_label: str
    series: str
    thresholds: np.ndarray
    epochs: np.ndarray
    test_accuracy: np.ndarray


_SERIES_STYLE = {"reaction:train": "-", "loss:val": "--"}


def sweep_figure(curves: Sequence[SweepCurve], run_labels: Sequence[str]) -> Figure | None:
    """Fig. 5.10 and 5.11: the picked epoch, and the test accuracy there, against threshold T.

    Top: the epoch; bottom: the test accuracy (%). One colour per run (in ``run_labels``
    order), one line style per series (Reaction solid, validation loss dashed).
    """
    if not curves:
        return None
    figure = Figure(figsize=(8.0, 7.0), layout="constrained")
    top, bottom = figure.subplots(2, 1, sharex=True)
    for curve in curves:
        colour = run_colour(list(run_labels).index(curve.run_label))
        style = _SERIES_STYLE.get(curve.series, ":")
        label = f"{curve.run_label}, {curve.series}"
        top.plot(curve.thresholds, curve.epochs, style, color=colour, label=label)
        bottom.plot(curve.thresholds, 100.0 * curve.test_accuracy, style, color=colour,
                    label=label)
    top.set_ylabel("extracted epoch")
    top.set_title("Threshold criterion: extracted epoch against the threshold (fig. 5.10)")
    bottom.set_ylabel("test accuracy at the extracted epoch (%)")
    bottom.set_title("Test accuracy at the extracted epoch (fig. 5.11)")
    bottom.set_xlabel("threshold T")
    for axes in (top, bottom):
        axes.grid(alpha=0.3)
    top.legend(fontsize=8)
    return figure


def accuracy_by_epoch(run: RunData) -> dict[int, float]:
    """The test accuracy (share of test images predicted right) at every epoch that has it."""
    test = run.series.get(HDF5_TEST_SERIES)
    if test is None:
        return {}
    return {int(e): float(v) for e, v in zip(test.epochs, test.values, strict=True)
            if np.isfinite(v)}


def sweep_curves(runs: Sequence[RunData], thresholds: np.ndarray = SWEEP_THRESHOLDS,
                 window: int = DEFAULT_WINDOW) -> list[SweepCurve]:
    """The threshold criterion (docs/METHOD.md §4) over ``thresholds`` for every run and series."""
    curves = []
    for run in runs:
        accuracy = accuracy_by_epoch(run)
        for name in SWEEP_SERIES:
            series = run.series.get(name)
            if series is None:
                continue
            picked = sweep(series.epochs, series.values, list(thresholds), window=window)
            epochs = np.array([np.nan if e is None else e for e in picked], dtype=np.float64)
            at = np.array([accuracy.get(e, np.nan) if e is not None else np.nan
                           for e in picked], dtype=np.float64)
            curves.append(SweepCurve(run.label, name, np.asarray(thresholds), epochs, at))
    return curves


@dataclass(frozen=True)
class NamedFigure:
    """A figure with its file stem and caption; ``figure`` None when skipped (see ``note``)."""

    name: str
    caption: str
    figure: Figure | None
    note: str = ""


def thesis_figures(runs: Sequence[RunData], smooth: int = DEFAULT_SMOOTH,
                   epoch: int | None = None, split: str = "train") -> list[NamedFigure]:
    """Every figure of docs/METHOD.md §3 items 1–4 for ``runs``, in the thesis's order."""
    named = []
    for quantity in PER_CLASS:
        source = PER_CLASS[quantity][0].format(split=split)
        named.append(_named(f"{quantity}_per_class", _TITLES[quantity].format(split=split),
                            per_class_figure(runs, quantity, smooth, split),
                            f"no run has Reaction results for the {source} split"))
    epoch = default_epoch(runs, (split, "test")) if epoch is None else epoch
    if epoch is None:
        named.append(_named("scatter", "Class Reaction against class accuracy", None,
                            f"no run has Reaction results for the {split} or test split"))
    else:
        named.append(_named(
            f"scatter_epoch_{epoch}", f"Class Reaction against class accuracy at epoch {epoch}",
            scatter_figure(runs, epoch, (split, "test")),
            f"no run has {split} or test results at epoch {epoch}"))
    named.append(_named("model_reaction", f"Model Reaction, {split} images",
                        model_reaction_figure(runs, smooth, split),
                        f"no run has Reaction results for the {split} split"))
    named.append(_named("threshold_sweep", "Threshold sweep: extracted epoch and test accuracy",
                        sweep_figure(sweep_curves(runs), [r.label for r in runs]),
                        "no run has a model Reaction or validation loss series"))
    return named


def _named(name: str, caption: str, figure: Figure | None, note: str) -> NamedFigure:
    return NamedFigure(name, caption, figure, "" if figure is not None else note)


@dataclass(frozen=True)
class PlotOptions:
    """The options of `analyzer plot` (see its ``--help``)."""

    runs: Sequence[Path]
    out: Path
    smooth: int = DEFAULT_SMOOTH
    image_format: str = "png"
    epoch: int | None = None
    split: str = "train"
    dpi: int = 100


def write_figures(options: PlotOptions, required: bool = True) -> list[Path]:
    """Draw :func:`thesis_figures` and write each to ``<out>/<name>.<format>`` atomically (a
    reader sees the old file or the new one); return the files written.

    A figure the files cannot feed is skipped with a logged note. Refuses (InputError) a
    ``split`` that no file has results for, and, when ``required``, files with nothing to draw
    (a followed run may have nothing yet: then nothing is written).
    """
    runs = load_runs(options.runs)
    analysed = sorted({name for run in runs for name in run.reaction})
    if analysed and options.split not in analysed:
        raise InputError(f"--split {options.split}: no file has Reaction results for it "
                         f"(they have: {', '.join(analysed)})")
    figures = thesis_figures(runs, options.smooth, options.epoch, options.split)
    if required and all(named.figure is None for named in figures):
        raise InputError("nothing to draw: no file has Reaction results or training curves "
                         "(run 'analyzer reaction' first)")
    out = Path(options.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create {out}: {error.strerror or error}") from None
    written = []
    for named in figures:
        if named.figure is None:
            logger.warning(f"{named.name} skipped: {named.note}")
            continue
        path = out / f"{named.name}.{options.image_format}"
        buffer = io.BytesIO()
        named.figure.savefig(buffer, format=options.image_format, dpi=options.dpi)
        try:
            write_atomically(path, buffer.getvalue())
        except OSError as error:
            raise InputError(f"cannot write {path}: {error.strerror or error}") from None
        written.append(path)
    return written
