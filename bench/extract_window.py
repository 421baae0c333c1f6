"""Time of ``analyzer extract --threshold auto`` with ``--window auto`` against ``--window 100``.

Interleaved rounds on one run file, in-process (the functions the command calls, without
writing /extract), median seconds of each and their ratio. The trend test runs once per
window position, so its cost grows with the epochs after the peak.

    .venv/bin/python bench/extract_window.py RUN.h5 [ROUNDS]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

from analyzer.extract_file import ExtractRequest, extract_file


def main() -> None:
    path = Path(sys.argv[1])
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    times: dict[str, list[float]] = {"auto": [], "100": []}
    for _ in range(rounds):
        for label, window in (("auto", None), ("100", 100)):
            start = time.perf_counter()
            extract_file(ExtractRequest(path, threshold="auto", window=window, save=False))
            times[label].append(time.perf_counter() - start)
    auto, fixed = statistics.median(times["auto"]), statistics.median(times["100"])
    print(f"{path}: {rounds} rounds, median --window auto {auto:.3f} s, --window 100 "
          f"{fixed:.3f} s, ratio {auto / fixed:.2f}")


if __name__ == "__main__":
    main()
