"""Picking "the best epoch" from a per-epoch series (METHOD.md §4, thesis §4.3.2, §5.2). Pure numpy.

A series is two arrays: the epochs and one value per epoch (model Reaction of the training
images, validation loss, ...). Missing values (NaN, epochs that were not analysed) are dropped
first: every criterion works on the analysed epochs in epoch order, counts its window in
analysed values, and answers with a real epoch number. ``None`` means no epoch satisfies the
criterion.

Criteria:

* threshold (thesis): the first epoch where the series falls by less than T standard
  deviations of its recent window (:func:`threshold_epoch`);
* minimum (thesis): the minimum, or for Reaction the minimum after the peak
  (:func:`minimum_epoch`);
* auto (ours, no hand-set threshold): the first epoch after the peak where a Mann–Kendall
  trend test no longer finds the window decreasing, the window fitted to the run by
  :func:`auto_window` unless fixed (:func:`auto_criterion`).

Every criterion without an epoch has a one-line reason (:class:`Extraction` ``reason``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

SWEEP_THRESHOLDS = np.round(np.arange(1, 101) / 100, 2)
"""T = 0.01, 0.02, …, 1.00: the sweep of thesis fig. 5.10."""

DEFAULT_WINDOW = 100
AUTO_SIGNIFICANCE = 0.05
"""Significance level of the auto criterion's trend test (a convention, not a tuned value)."""

AUTO_WINDOW_FLOOR = 10
"""The smallest window ``--window auto`` chooses (see :func:`auto_window`)."""
AUTO_RUN_SHARE = 10
"""``--window auto`` takes a tenth of the run: the thesis's window of 100 on 1000 epochs."""

CRITERIA = ("threshold", "auto", "minimum")
NO_VALUES = "the series has no analysed values"


@dataclass(frozen=True)
class Extraction:
    """One chosen epoch: which series, which criterion, and the test accuracy there.

    ``threshold`` is T for the threshold criterion and None otherwise; ``window`` the window
    in analysed values (threshold: of S_i; auto: of the trend test, None when none could be
    chosen; minimum: None); ``epoch`` is None when no epoch satisfies the criterion, and then
    ``reason`` says why in one line; ``test_accuracy`` is a fraction (0…1), None when unknown.
    """

    series: str
    criterion: str
    threshold: float | None
    epoch: int | None
    test_accuracy: float | None
    window: int | None = None
    reason: str | None = None

    def to_json(self) -> dict:
        """The object printed by ``analyzer extract --json``."""
        return {"series": self.series, "criterion": self.criterion,
                "threshold": self.threshold, "window": self.window, "epoch": self.epoch,
                "reason": self.reason, "test_accuracy": self.test_accuracy}


def analysed(epochs: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The epochs with a value (NaN dropped), in epoch order, as int64 and float64 arrays."""
    epochs = np.asarray(epochs, dtype=np.int64).reshape(-1)
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if epochs.shape != values.shape:
        raise ValueError(f"{epochs.size} epochs but {values.size} values")
    order = np.argsort(epochs, kind="stable")
    epochs, values = epochs[order], values[order]
    if np.any(np.diff(epochs) == 0):
        raise ValueError("an epoch appears twice in the series")
    keep = ~np.isnan(values)
    return epochs[keep], values[keep]


def _check_window(window: int) -> None:
    if window < 2:
        raise ValueError(f"the window must hold at least 2 values, not {window}")


def step_ratios(values: np.ndarray, window: int = DEFAULT_WINDOW) -> np.ndarray:
    """|V_i − V_{i−1}| / S_i at every position where the series decreases, else +inf.

    S_i is the population standard deviation (ddof = 0) of V_{max(1, i−window+1)} … V_i, the
    last ``window`` values up to and including V_i (fewer near the start). Position 0 (i = 1)
    has no predecessor and is +inf; so is every position where V_{i−1} ≤ V_i or S_i = 0.
    """
    _check_window(window)
    values = np.asarray(values, dtype=np.float64)
    ratios = np.full(values.size, np.inf)
    for i in range(1, values.size):
        if not values[i - 1] > values[i]:
            continue
        spread = float(np.std(values[max(0, i - window + 1):i + 1]))
        if spread > 0:
            ratios[i] = abs(values[i] - values[i - 1]) / spread
    return ratios


def _first_below(epochs: np.ndarray, ratios: np.ndarray, threshold: float) -> int | None:
    if not threshold > 0:
        raise ValueError(f"the threshold must be positive, not {threshold}")
    hits = np.flatnonzero(ratios < threshold)
    return int(epochs[hits[0]]) if hits.size else None


def threshold_epoch(epochs: np.ndarray, values: np.ndarray, threshold: float,
                    window: int = DEFAULT_WINDOW) -> int | None:
    """Threshold criterion (docs/METHOD.md §4): the first epoch i = 2, 3, … with

        S_i > 0  and  |V_i − V_{i−1}| / S_i < T  and  V_{i−1} > V_i,

    S_i the population standard deviation of the last ``window`` analysed values up to V_i
    (all of them while fewer are available). None when no epoch qualifies.
    """
    epochs, values = analysed(epochs, values)
    return _first_below(epochs, step_ratios(values, window), threshold)


def sweep(epochs: np.ndarray, values: np.ndarray,
          thresholds: Sequence[float] | np.ndarray = SWEEP_THRESHOLDS,
          window: int = DEFAULT_WINDOW) -> list[int | None]:
    """:func:`threshold_epoch` for every threshold (thesis fig. 5.10), in the given order."""
    epochs, values = analysed(epochs, values)
    ratios = step_ratios(values, window)
    return [_first_below(epochs, ratios, float(t)) for t in thresholds]


def minimum_epoch(epochs: np.ndarray, values: np.ndarray, after_peak: bool) -> int | None:
    """Minimum criterion (docs/METHOD.md §4): the epoch of the smallest value.

    With ``after_peak`` (the rule for Reaction), only the epochs strictly after the epoch of
    the largest value count; None when the peak is the last analysed epoch. Ties go to the
    earliest epoch. None for a series without values.
    """
    epochs, values = analysed(epochs, values)
    start = int(np.argmax(values)) + 1 if after_peak and values.size else 0
    if start >= values.size:
        return None
    return int(epochs[start + int(np.argmin(values[start:]))])


def minimum_reason(epochs: np.ndarray, values: np.ndarray) -> str:
    """Why :func:`minimum_epoch` has no answer: no values, or (Reaction) the peak is last."""
    epochs, _ = analysed(epochs, values)
    return _still_rising(epochs) if epochs.size else NO_VALUES


def threshold_reason(epochs: np.ndarray, values: np.ndarray) -> str:
    """Why :func:`threshold_epoch` has no answer (the same words for every T)."""
    count = analysed(epochs, values)[0].size
    if count < 2:
        return NO_VALUES if not count else "one analysed value: no step to test"
    return (f"no step down smaller than T times its window's standard deviation in {count} "
            "analysed epochs")


def _decrease_p_value(window_values: np.ndarray) -> float:
    """One-sided Mann–Kendall p-value for a decreasing trend (Kendall's tau against order)."""
    result = stats.kendalltau(np.arange(window_values.size), window_values,
                              alternative="less")
    return float(result.pvalue)


@functools.cache
def _smallest_testable_window(alpha: float) -> int:
    """The fewest values for which a strictly decreasing window is significant at ``alpha``."""
    size = 3
    while _decrease_p_value(-np.arange(size, dtype=np.float64)) >= alpha:
        size += 1
    return size


def auto_window(analysed_count: int, from_start: int) -> int | None:
    """The trend test's window chosen from the run (``--window auto``).

        w = min(100, max(10, ⌊n / 10⌋), ⌊m / 2⌋),

    n = ``analysed_count`` (analysed values of the series), m = ``from_start`` (values from the
    start of the criterion, the peak for Reaction, to the last one, both included). A tenth of
    the run is the thesis's ratio (a window of 100 on 1000 epochs), 100 its largest value;
    10 values is the floor below which the test only sees near-monotone falls; ⌊m / 2⌋ keeps
    at least half of the values after the start as candidate answers, so the answer is not
    forced to the last epoch. None when that leaves fewer than 10 (m < 20).
    """
    window = min(DEFAULT_WINDOW, max(AUTO_WINDOW_FLOOR, analysed_count // AUTO_RUN_SHARE),
                 from_start // 2)
    return window if window >= AUTO_WINDOW_FLOOR else None


@dataclass(frozen=True)
class AutoAnswer:
    """The auto criterion's answer: the epoch, or None and a one-line reason.

    ``window`` is the trend test's window in analysed values (None when none could be chosen).
    """

    epoch: int | None
    window: int | None
    reason: str | None


def auto_criterion(epochs: np.ndarray, values: np.ndarray, window: int | None = None, *,
                   after_peak: bool = True,
                   alpha: float = AUTO_SIGNIFICANCE) -> AutoAnswer:
    """Auto criterion (ours): the first epoch after the peak where the fall has stopped.

    Start at the largest value (``after_peak``; else at the first value). For every later
    position i whose window — the last w analysed values up to V_i, all at or after the
    start — is full, test for a decreasing trend with the Mann–Kendall test (Kendall's tau of
    the values against their order, one-sided). Accept the first i where the test no longer
    finds a decrease (p ≥ ``alpha``, or the window is constant). Rank-based, so it is blind to
    the scale of the series (Reaction ~1e-7 or loss ~1) and robust to single spikes.

    ``window`` None: w from :func:`auto_window`. A number w: when fewer than w values follow
    the start, the window is what is available; if that is too few for a strictly decreasing
    window to be significant at ``alpha`` (4 values at 0.05), the test cannot decide. Every
    None comes with the reason: no values, still rising (the peak is the last value), too few
    values after the peak, or still decreasing at the last epoch (with p and the window).
    """
    if window is not None:
        _check_window(window)
    epochs, values = analysed(epochs, values)
    if not values.size:
        return AutoAnswer(None, None, NO_VALUES)
    start = int(np.argmax(values)) if after_peak else 0
    from_start = values.size - start
    if after_peak and from_start == 1:
        return AutoAnswer(None, None, _still_rising(epochs))
    if window is None:
        size = auto_window(values.size, from_start)
        needed = 2 * AUTO_WINDOW_FLOOR
    else:
        size = min(window, from_start)
        needed = _smallest_testable_window(alpha)
        size = size if size >= needed else None
    if size is None:
        where = f"from the peak at epoch {epochs[start]} to the end" if after_peak \
            else "in the series"
        return AutoAnswer(None, None, f"only {from_start} analysed epochs {where}; "
                          f"the trend test {'of --window auto ' if window is None else ''}"
                          f"needs at least {needed}")
    p_value = math.nan
    for i in range(start + size - 1, values.size):
        p_value = _decrease_p_value(values[i - size + 1:i + 1])
        if not p_value < alpha:  # NaN (a constant window) counts as "not decreasing"
            return AutoAnswer(int(epochs[i]), size, None)
    return AutoAnswer(None, size, f"still decreasing at the last epoch {epochs[-1]}: trend "
                      f"test p = {p_value:.2g} < {alpha:g} over the last {size} analysed "
                      f"epochs ({epochs[-size]}–{epochs[-1]})")


def auto_threshold_epoch(epochs: np.ndarray, values: np.ndarray, window: int | None = None,
                         *, after_peak: bool = True,
                         alpha: float = AUTO_SIGNIFICANCE) -> int | None:
    """The epoch of :func:`auto_criterion` (None: no answer; the reason is there)."""
    return auto_criterion(epochs, values, window, after_peak=after_peak, alpha=alpha).epoch


def _still_rising(epochs: np.ndarray) -> str:
    return f"still rising: the maximum is at the last analysed epoch ({epochs[-1]})"


def accuracy_at(epochs: np.ndarray, accuracy: np.ndarray, epoch: int | None) -> float | None:
    """The accuracy at ``epoch``; None when the epoch is None or has no (finite) accuracy."""
    if epoch is None:
        return None
    rows = np.flatnonzero(np.asarray(epochs) == epoch)
    if not rows.size:
        return None
    value = float(np.asarray(accuracy, dtype=np.float64)[rows[0]])
    return None if math.isnan(value) else value


def best_accuracy(epochs: np.ndarray, accuracy: np.ndarray) -> tuple[int, float] | None:
    """The highest accuracy of any epoch and its (earliest) epoch; None without values."""
    epochs, accuracy = analysed(epochs, accuracy)
    if not accuracy.size:
        return None
    row = int(np.argmax(accuracy))
    return int(epochs[row]), float(accuracy[row])


def extract(series: str, epochs: np.ndarray, values: np.ndarray, *,
            thresholds: Sequence[float] = (), auto: bool = False, minimum: bool = True,
            after_peak: bool = False, window: int = DEFAULT_WINDOW,
            auto_window: int | None = None,
            test_epochs: np.ndarray | None = None,
            test_accuracy: np.ndarray | None = None) -> list[Extraction]:
    """Every requested criterion on one series, with the test accuracy at each chosen epoch.

    Rows come in this order: one per threshold, then auto, then minimum; a row without an
    epoch carries its reason. ``after_peak`` selects the Reaction rule for the minimum and the
    start of the auto criterion. ``window`` is the threshold criterion's, ``auto_window`` the
    auto criterion's (None: :func:`auto_window`'s rule).
    """
    rows: list[tuple[str, float | None, int | None, int | None, str | None]] = []
    if len(thresholds):
        ts = [float(t) for t in thresholds]
        rows += [("threshold", t, window, e,
                  None if e is not None else threshold_reason(epochs, values))
                 for t, e in zip(ts, sweep(epochs, values, ts, window), strict=True)]
    if auto:
        answer = auto_criterion(epochs, values, auto_window, after_peak=after_peak)
        rows.append(("auto", None, answer.window, answer.epoch, answer.reason))
    if minimum:
        epoch = minimum_epoch(epochs, values, after_peak)
        rows.append(("minimum", None, None, epoch,
                     None if epoch is not None else minimum_reason(epochs, values)))

    def test_at(epoch: int | None) -> float | None:
        if test_epochs is None or test_accuracy is None:
            return None
        return accuracy_at(test_epochs, test_accuracy, epoch)

    return [Extraction(series, criterion, t, e, test_at(e), w, reason)
            for criterion, t, w, e, reason in rows]


def format_table(rows: Sequence[Extraction], best: tuple[int, float] | None) -> str:
    """A plain-text table in the style of thesis table 5.1, then a note per unanswered row.

    Columns: series, criterion, threshold, window (analysed values), epoch ("none" when no
    epoch qualifies), the test accuracy there in %, and for reference the best test accuracy
    of any epoch in % with its epoch (``best``, from :func:`best_accuracy`; "-" when unknown).
    Below the table, :func:`none_notes`.
    """
    header = ("series", "criterion", "threshold", "window", "epoch", "test acc %",
              "best test acc % (epoch)")
    lines = [header]
    reference = "-" if best is None else f"{100 * best[1]:.2f} ({best[0]})"
    for row in rows:
        lines.append((
            row.series, row.criterion,
            "-" if row.threshold is None else f"{row.threshold:.2f}",
            "-" if row.window is None else str(row.window),
            "none" if row.epoch is None else str(row.epoch),
            "-" if row.test_accuracy is None else f"{100 * row.test_accuracy:.2f}",
            reference,
        ))
    widths = [max(len(line[k]) for line in lines) for k in range(len(header))]
    left = {0, 1}
    table = ["  ".join(cell.ljust(widths[k]) if k in left else cell.rjust(widths[k])
                       for k, cell in enumerate(line)).rstrip() for line in lines]
    return "\n".join(table + none_notes(rows))


def none_notes(rows: Sequence[Extraction]) -> list[str]:
    """One line per series and criterion without an epoch: ``none: SERIES CRITERION: reason``.

    The threshold rows of a sweep give one line, with how many of the thresholds have none.
    """
    unanswered: dict[tuple[str, str], list[Extraction]] = {}
    counts: dict[tuple[str, str], int] = {}
    for row in rows:
        key = (row.series, row.criterion)
        counts[key] = counts.get(key, 0) + 1
        if row.epoch is None:
            unanswered.setdefault(key, []).append(row)
    notes = []
    for (series, criterion), missed in unanswered.items():
        first = missed[0]
        if len(missed) == 1:
            what = criterion if first.threshold is None else f"{criterion} T={first.threshold:.2f}"
            notes.append(f"none: {series} {what}: {first.reason}")
        else:
            notes.append(f"none: {series} {criterion} at {len(missed)} of "
                         f"{counts[(series, criterion)]} T ({first.threshold:.2f}"
                         f"…{missed[-1].threshold:.2f}): {first.reason}")
    return notes
