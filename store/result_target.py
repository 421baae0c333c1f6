"""Where an analysis of checkpoints stores its results: the run file, or ``--results FILE``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from store.errors import InputError
from store.h5io import open_for_reading
from store.results import create_results_file
from store.series import WRITABLE_FORMATS


def results_target(run_file: Path | None, results: Path | None,
                   class_names: Sequence[str] = ()) -> Path | None:
    """``results`` when given (created as a results file when it does not exist, else it
    must be a run or results file), else the run file; None when there is neither."""
    if results is None:
        return run_file
    results = Path(results)
    if not results.exists():
        results.parent.mkdir(parents=True, exist_ok=True)
        create_results_file(results, list(class_names))
        return results
    with open_for_reading(results) as handle:
        if handle.attrs.get("format") not in WRITABLE_FORMATS:
            raise InputError(f"{results} is not a reaction run or results file: refusing to "
                             "write it")
    return results
