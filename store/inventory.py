"""`analyzer info`: what a run file or a results file holds, as a JSON-ready dict or text."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import h5py
import numpy as np

from store.errors import InputError
from store.feature_results import describe_features
from store.filter_results import describe_filters
from store.h5io import open_for_reading
from store.occlusion import GROUP as OCCLUSION_GROUP
from store.occlusion import describe_occlusion
from store.results import DATASETS, stored_settings
from store.series import WRITABLE_FORMATS, read_extract


def describe_file(path: Path) -> dict:
    """Format, model, classes, splits, training progress, Reaction groups, /extract rows, and
    the /features and /filters groups."""
    path = Path(path)
    with open_for_reading(path) as handle:
        kind = handle.attrs.get("format")
        if kind not in WRITABLE_FORMATS:
            raise InputError(f"{path} is not a reaction run or results file")
        summary = {
            "path": str(path),
            "format": str(kind),
            "format_version": str(handle.attrs.get("format_version", "")),
            "model": _json_attribute(handle, "model"),
            "config": _json_attribute(handle, "config"),
            "classes": _json_attribute(handle, "classes") or [],
            "splits": {name: {"images": int(group["label"].shape[0]),
                              "source": str(group.attrs.get("source", ""))}
                       for name, group in handle.get("splits", {}).items()},
            "training": _training(handle),
            "reaction": {name: _reaction(group)
                         for name, group in handle.get("reaction", {}).items()},
        }
        summary["features"] = describe_features(handle)
        summary["filters"] = describe_filters(handle)
        summary["occlusion"] = {name: describe_occlusion(group) for name, group
                                in handle.get(OCCLUSION_GROUP, {}).items()}
        provenance = handle.get("provenance")
        if provenance is not None:
            summary["provenance"] = {key: str(value) for key, value in provenance.attrs.items()}
    summary["extract"] = [asdict(row) for row in read_extract(path)]
    return summary


def _json_attribute(handle: h5py.File, name: str) -> object:
    text = handle.attrs.get(name)
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return str(text)


def _training(handle: h5py.File) -> dict | None:
    group = handle.get("training")
    if group is None:
        return None
    return {"epochs": int(group["epoch"].shape[0]),
            "completed_epochs": int(group["completed_epochs"][()])}


def _reaction(group: h5py.Group) -> dict:
    missing = [name for name in DATASETS if not isinstance(group.get(name), h5py.Dataset)]
    if missing:
        return {"damaged": f"no {', '.join(missing)}", "settings": stored_settings(group)}
    epochs = group["epoch"][()]
    done = epochs[group["computed"][()].astype(bool)]
    return {
        "epochs": int(epochs.size),
        "computed_epochs": int(done.size),
        "first_epoch": int(done.min()) if done.size else None,
        "last_epoch": int(done.max()) if done.size else None,
        "images": int(group["image"].shape[0]),
        "settings": stored_settings(group),
        "devices": json.loads(group.attrs.get("devices", "[]")),
        "empty_maps": int(np.clip(group["empty_maps"][()], 0, None).sum()),
    }


def format_summary(summary: dict) -> str:
    """The text that `analyzer info` prints."""
    lines = [f"{summary['path']}: {summary['format']} {summary['format_version']}"]
    model = summary.get("model")
    if isinstance(model, dict):
        size = "x".join(str(s) for s in model.get("image_size", []))
        lines.append(f"model: {model.get('name')}, input {model.get('in_channels')}x{size}, "
                     f"{model.get('num_classes')} classes")
    classes = summary["classes"]
    lines.append(f"classes ({len(classes)}): {', '.join(map(str, classes))}")
    if summary["splits"]:
        lines.append("splits: " + ", ".join(f"{name} {split['images']} images"
                                            for name, split in summary["splits"].items()))
    training = summary["training"]
    if training is not None:
        finished = summary.get("provenance", {}).get("finished") or "not finished"
        lines.append(f"training: {training['completed_epochs']} of {training['epochs']} "
                     f"epochs completed ({finished})")
    for split, group in summary["reaction"].items():
        if "damaged" in group:
            lines.append(f"reaction/{split}: damaged ({group['damaged']}): unreadable; "
                         "recompute it into another file with 'analyzer reaction --out'")
            continue
        span = "" if group["first_epoch"] is None else \
            f", epochs {group['first_epoch']}–{group['last_epoch']}"
        settings = ", ".join(f"{k} {v}" for k, v in group["settings"].items())
        lines.append(f"reaction/{split}: {group['computed_epochs']} of {group['epochs']} epochs "
                     f"computed{span}, {group['images']} images, {group['empty_maps']} empty "
                     f"maps over all epochs; {settings}, devices {', '.join(group['devices'])}")
    if not summary["reaction"]:
        lines.append("reaction: none computed yet")
    lines += _occlusion_lines(summary["occlusion"])
    lines.append(f"extract: {len(summary['extract'])} rows" if summary["extract"]
                 else "extract: none")
    lines += _extract_lines(summary["extract"])
    lines += _analysis_lines(summary)
    return "\n".join(lines)


def _analysis_lines(summary: dict) -> list[str]:
    """One line per /features and /filters group (none when the file has none)."""
    lines = []
    for layer, group in summary.get("features", {}).items():
        epochs, channels = group["epochs"], group["channels"]
        lines.append(f"features/{layer}: {len(epochs)} epochs ({', '.join(map(str, epochs))}), "
                     f"{len(channels)} channels, strongest over the {group['split']} images, "
                     f"{group['method']} projection")
    for layer, group in summary.get("filters", {}).items():
        lines.append(f"filters/{layer}: {group['epochs']} epochs "
                     f"{group['first_epoch']}–{group['last_epoch']}, {group['filters']} "
                     f"filters, against epoch {group['against']}")
    return lines


def _occlusion_lines(groups: dict[str, dict]) -> list[str]:
    """One line per ``/occlusion/<split>`` group (none when the file has no occlusion maps)."""
    lines = []
    for split, group in groups.items():
        settings = group["settings"]
        epochs = ", ".join(map(str, group["computed_epochs"])) or "none"
        rows, cols = group["positions"]
        lines.append(f"occlusion/{split}: epochs {epochs}, {group['images']} images, patch "
                     f"{settings['patch']}, stride {settings['stride']}, fill "
                     f"{settings['fill']:.4g} ({settings['fill_source']}), {rows}x{cols} "
                     f"positions; backend {settings['backend']}, devices "
                     f"{', '.join(group['devices'])}")
    return lines


_SWEEP_LINES = 3  # more threshold rows of one series than this read as a sweep: one line


def _extract_lines(rows: list[dict]) -> list[str]:
    """One line per row, except one summary line per threshold sweep (e.g. ``--sweep``)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (row["series"], row["window"]) if row["criterion"] == "threshold" else id(row)
        groups.setdefault(key, []).append(row)
    lines = []
    for group in groups.values():
        if len(group) <= _SWEEP_LINES:
            lines += [_extract_line(row) for row in group]
            continue
        epochs = [row["epoch"] for row in group if row["epoch"] is not None]
        chosen = f"epochs {min(epochs)}–{max(epochs)}" if epochs else "no epoch"
        unanswered = len(group) - len(epochs)
        lines.append(f"  {group[0]['series']}: threshold sweep, {len(group)} values "
                     f"T={group[0]['threshold']:.2f}…{group[-1]['threshold']:.2f} window "
                     f"{group[0]['window']} → {chosen}"
                     + (f" ({unanswered} with none)" if epochs and unanswered else "")
                     + " (all rows: analyzer info --json)")
    return lines


def _extract_line(row: dict) -> str:
    threshold = "" if row["threshold"] is None else f" T={row['threshold']:.2f}"
    window = f" window {row['window']}" if row["window"] else ""
    if row.get("window_rule") == "auto":
        window = f" window auto ({row['window']})" if row["window"] else " window auto"
    epoch = "none" if row["epoch"] is None else str(row["epoch"])
    accuracy = "" if row["test_accuracy"] is None else \
        f", test acc {100 * row['test_accuracy']:.2f}%"
    reason = f" ({row['reason']})" if row["epoch"] is None and row.get("reason") else ""
    return (f"  {row['series']}: {row['criterion']}{threshold}{window} → epoch {epoch}"
            f"{accuracy}{reason}")
