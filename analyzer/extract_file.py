"""`analyzer extract`: the criteria of :mod:`analyzer.extract` on the series of one file.

Reads the series and the test accuracy through :mod:`store.series`, applies the criteria,
and stores the rows in ``/extract`` of a run or results file (not of a CSV).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from analyzer.extract import (
    DEFAULT_WINDOW,
    SWEEP_THRESHOLDS,
    Extraction,
    analysed,
    best_accuracy,
    extract,
)
from store.errors import InputError
from store.series import (
    Series,
    StoredExtraction,
    default_series,
    is_csv,
    read_series,
    read_test_accuracy,
    write_extract,
)

AUTO = "auto"


@dataclass(frozen=True)
class ExtractRequest:
    """The options of `analyzer extract` (see its ``--help``).

    ``threshold``: T in (0, 1] or ``"auto"``; ``sweep`` replaces a numeric T by
    0.01 … 1.00; ``series`` None: :func:`store.series.default_series`. ``window``: a number
    of values for every criterion, ``"auto"`` (the auto criterion's window by
    :func:`analyzer.extract.auto_window`; needs ``threshold="auto"``) or None (the default:
    100 for the threshold criterion, ``"auto"`` for the auto criterion).
    """

    path: Path
    series: list[str] | None = None
    threshold: float | str = 0.3
    window: int | str | None = None
    sweep: bool = False
    after_peak: bool = False
    test_series: str | None = None
    save: bool = True


@dataclass(frozen=True)
class ExtractResult:
    """The rows, the best test accuracy of any epoch (epoch, fraction), and where it is from."""

    rows: list[Extraction]
    best: tuple[int, float] | None
    test_source: str | None
    saved: bool


def parse_threshold(text: str) -> float | str:
    """``"auto"`` or a number 0 < T ≤ 1."""
    if text.strip().lower() == AUTO:
        return AUTO
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"--threshold must be a number in (0, 1] or 'auto', not {text!r}") \
            from None
    if not 0 < value <= 1:
        raise InputError(f"--threshold must be in (0, 1], not {text}")
    return value


def parse_window(text: str | None) -> int | str | None:
    """``--window``: None (not given), ``"auto"`` or a whole number of at least 2."""
    if text is None or text.strip().lower() == AUTO:
        return None if text is None else AUTO
    try:
        value = int(text)
    except ValueError:
        raise InputError(f"--window must be a whole number or 'auto', not {text!r}") from None
    if value < 2:
        raise InputError(f"--window must be at least 2, not {value}")
    return value


def criterion_windows(window: int | str | None, auto: bool) -> tuple[int, int | None]:
    """The threshold criterion's window and the auto criterion's (None: the auto rule)."""
    if window == AUTO and not auto:
        raise InputError("--window auto chooses the auto criterion's window: give "
                         "--threshold auto too (the threshold criterion's window is a number, "
                         f"default {DEFAULT_WINDOW})")
    if window is None or window == AUTO:
        return DEFAULT_WINDOW, None
    return int(window), int(window)


def uses_peak_rule(name: str) -> bool:
    """Model Reaction series get the Reaction rule (minimum after the peak) by themselves."""
    return name.startswith("reaction:") or name.rstrip("/").endswith("model_reaction")


def extract_file(request: ExtractRequest) -> ExtractResult:
    """Apply the requested criteria to every requested series of ``request.path``."""
    windows = criterion_windows(request.window, request.threshold == AUTO)
    names = request.series or default_series(request.path, request.test_series)
    if not names:
        raise InputError(f"{request.path} holds none of the default series "
                         "(reaction:train, loss:val): name one with --series")
    test = read_test_accuracy(request.path, request.test_series)
    best = None if test is None else best_accuracy(test.epochs, test.values)
    stored: list[StoredExtraction] = []
    rows: list[Extraction] = []
    for name in names:
        series = read_series(request.path, name)
        found = _extract_series(series, request, windows, test)
        rows += found
        stored += [_stored(row, series, windows[1] is None, best, test) for row in found]
    saved = request.save and not is_csv(request.path)
    if saved:
        write_extract(request.path, stored)
    return ExtractResult(rows, best, None if test is None else test.source, saved)


def _extract_series(series: Series, request: ExtractRequest, windows: tuple[int, int | None],
                    test: Series | None) -> list[Extraction]:
    if request.sweep:
        thresholds = list(SWEEP_THRESHOLDS)
    elif request.threshold == AUTO:
        thresholds = []
    else:
        thresholds = [float(request.threshold)]
    return extract(series.name, series.epochs, series.values, thresholds=thresholds,
                   auto=request.threshold == AUTO, after_peak=request.after_peak
                   or uses_peak_rule(series.name), window=windows[0],
                   auto_window=windows[1],
                   test_epochs=None if test is None else test.epochs,
                   test_accuracy=None if test is None else test.values)


def _stored(row: Extraction, series: Series, auto_rule: bool, best: tuple[int, float] | None,
            test: Series | None) -> StoredExtraction:
    if row.criterion == "minimum":
        rule = ""
    else:
        rule = AUTO if row.criterion == AUTO and auto_rule else "fixed"
    return StoredExtraction(
        series=row.series, source=series.source, criterion=row.criterion,
        threshold=row.threshold, window=row.window or 0, window_rule=rule,
        epoch=row.epoch, reason=row.reason or "", test_accuracy=row.test_accuracy,
        best_test_epoch=None if best is None else best[0],
        best_test_accuracy=None if best is None else best[1],
        test_source="" if test is None else test.source,
        analysed_epochs=int(analysed(series.epochs, series.values)[0].size))
