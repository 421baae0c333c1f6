"""docs/EXTRACT.md's comparison table from the runs of scripts/extract_runs.sh (issue 16).

For every run ROOT/<data>-<model>-<epochs>/run.h5 with its Reaction pass done, and for both
default series (reaction:train, loss:val): the threshold sweep T = 0.01 … 1.00, the minimum
criterion, the auto criterion with today's fixed window 100 and with ``--window auto``, the
best test accuracy of any epoch; one Markdown row each, then the reasons of every "none".
The numbers are those of ``analyzer extract FILE --sweep --threshold auto --json --no-save``
(and ``--window 100``), through the same functions.

    .venv/bin/python scripts/extract_table.py /tmp/i16/runs > /tmp/i16/table.md
"""

from __future__ import annotations

import sys
from pathlib import Path

from analyzer.extract import Extraction
from analyzer.extract_file import ExtractRequest, extract_file

DATA_ORDER = ("digits", "shapes")
MODEL_ORDER = ("small", "mnist")


def run_key(path: Path) -> tuple:
    """Sort runs by data set, model, then epochs."""
    data, model, epochs = path.parent.name.split("-")
    return DATA_ORDER.index(data), MODEL_ORDER.index(model), int(epochs)


def percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def pick(row: Extraction, note: int | None = None) -> str:
    if row.epoch is None:
        return f"none [{note}]" if note is not None else "none"
    return f"{row.epoch} ({percent(row.test_accuracy)})"


def main() -> None:
    root = Path(sys.argv[1])
    runs = sorted((p for p in root.glob("*-*-*/run.h5")
                   if (p.parent / "reaction.done").exists()), key=run_key)
    print("| data | model | epochs | series | threshold T = 0.01…1.00: epochs | test acc % "
          "min–max (mean) | minimum: epoch (acc %) | auto, window 100: epoch (acc %) | "
          "**auto, --window auto**: w, epoch (acc %) | auto ≥ threshold | best test acc % "
          "(epoch) |")
    print("|---|---|---:|---|---|---|---|---|---|---|---|")
    notes: list[str] = []
    for path in runs:
        data, model, epochs = path.parent.name.split("-")
        new = extract_file(ExtractRequest(path, threshold="auto", sweep=True, save=False))
        old = extract_file(ExtractRequest(path, threshold="auto", window=100, save=False))
        best = "–" if new.best is None else f"{100 * new.best[1]:.2f} ({new.best[0]})"
        for series in ("reaction:train", "loss:val"):
            rows = [r for r in new.rows if r.series == series]
            swept = [r for r in rows if r.criterion == "threshold"]
            auto = next(r for r in rows if r.criterion == "auto")
            minimum = next(r for r in rows if r.criterion == "minimum")
            before = next(r for r in old.rows if r.series == series and r.criterion == "auto")
            answered = [r for r in swept if r.epoch is not None]
            accuracies = [r.test_accuracy for r in answered if r.test_accuracy is not None]
            sweep_epochs = (f"{min(r.epoch for r in answered)}–{max(r.epoch for r in answered)}"
                            if answered else "none")
            if len(answered) < len(swept):
                sweep_epochs += f" (none at {len(swept) - len(answered)} T)"
            sweep_acc = (f"{percent(min(accuracies))}–{percent(max(accuracies))} "
                         f"({percent(sum(accuracies) / len(accuracies))})" if accuracies
                         else "–")
            note = None
            if auto.epoch is None:
                notes.append(f"{data}-{model}-{epochs} {series}: {auto.reason}")
                note = len(notes)
            if auto.test_accuracy is None:
                versus = "–"
            else:
                worse = sum(1 for a in accuracies if a <= auto.test_accuracy)
                versus = f"{worse} of {len(swept)} T"
            window = "–" if auto.window is None else str(auto.window)
            print(f"| {data} | {model} | {epochs} | {series} | {sweep_epochs} | {sweep_acc} | "
                  f"{pick(minimum)} | {pick(before)} | {window}, {pick(auto, note)} | "
                  f"{versus} | {best} |")
    print()
    for number, note in enumerate(notes, start=1):
        print(f"[{number}] {note}  ")


if __name__ == "__main__":
    main()
