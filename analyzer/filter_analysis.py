"""`analyzer filters`: seed 004's filter dissimilarity for two checkpoints, or over the epochs.

Two checkpoints A and B (any models the analyzer loads): S_i with A as the reference against
B, and with B against A, as heat maps (seed 004 figs. 4–5) and JSON rows. A checkpoint folder
with ``--against EPOCH``: every epoch's S_i against that epoch's filters (and the reverse), an
epoch × filter heat map that shows when the filters settle, stored in ``/filters/<layer>``.
The math is :mod:`analyzer.filters`; the weights come from :mod:`analyzer.filter_weights`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from analyzer.features import feature_epochs
from analyzer.figures import NamedFigure, RunData
from analyzer.filter_weights import ConvFilters, NetworkOptions, network_for, read_filters
from analyzer.filters import Dissimilarity, both_directions, check_same_kernels
from analyzer.plan import parse_epochs
from store.checkpoint_files import discover_checkpoints, sha256_file
from store.errors import InputError
from store.filter_results import FilterEvolution, read_filter_evolutions

_ANNOTATE_UP_TO = 32  # filters: beyond this the values printed in the cells are unreadable


@dataclass(frozen=True)
class PairComparison:
    """Two checkpoints' filters of one layer and S both ways."""

    a: ConvFilters
    b: ConvFilters
    a_against_b: Dissimilarity
    b_against_a: Dissimilarity


def compare_pair(a: Path, b: Path, layer: str | None = None,
                 network: NetworkOptions | None = None) -> PairComparison:
    """S_i of A's filters against B's and of B's against A's (seed 004 eq. 1); without
    ``layer``, each network's first conv layer (their names may differ)."""
    first = read_filters(a, layer, network_for(a, network))
    second = read_filters(b, layer, network_for(b, network))
    check_same_kernels(first.weights.shape, second.weights.shape,
                       (f"{Path(a).name}'s {first.layer}", f"{Path(b).name}'s {second.layer}"))
    forward, backward = both_directions(first.weights, second.weights)
    return PairComparison(first, second, forward, backward)


def pair_rows(comparison: PairComparison) -> list[dict]:
    """The JSON rows: one per filter and direction, keys ``reference``, ``compared``,
    ``layer``, ``filter`` (i), ``dissimilarity`` (S_i) and ``nearest`` (the j)."""
    rows = []
    for reference, compared, result in (
            (comparison.a, comparison.b, comparison.a_against_b),
            (comparison.b, comparison.a, comparison.b_against_a)):
        rows += [{"reference": str(reference.path), "compared": str(compared.path),
                  "layer": reference.layer, "filter": i,
                  "dissimilarity": float(result.dissimilarity[i]),
                  "nearest": int(result.nearest[i])} for i in range(len(result.nearest))]
    return rows


def format_pair(comparison: PairComparison) -> str:
    """A plain-text table: filter, S and nearest j, both ways."""
    lines = [f"A = {comparison.a.path}", f"B = {comparison.b.path}",
             f"layer {comparison.a.layer}"
             + ("" if comparison.b.layer == comparison.a.layer else
                f" (in B: {comparison.b.layer})") + f": {len(comparison.a.weights)} filters of "
             f"{'×'.join(map(str, comparison.a.weights.shape[1:]))} in A, "
             f"{len(comparison.b.weights)} in B",
             f"{'filter':>6}  {'S (A against B)':>15}  {'nearest in B':>12}  "
             f"{'S (B against A)':>15}  {'nearest in A':>12}"]
    forward, backward = comparison.a_against_b, comparison.b_against_a
    for i in range(max(len(forward.nearest), len(backward.nearest))):
        left = f"{forward.dissimilarity[i]:>15.6g}  {forward.nearest[i]:>12}" \
            if i < len(forward.nearest) else " " * 29
        right = f"{backward.dissimilarity[i]:>15.6g}  {backward.nearest[i]:>12}" \
            if i < len(backward.nearest) else ""
        lines.append(f"{i:>6}  {left}  {right}".rstrip())
    return "\n".join(lines)


def pair_figure(comparison: PairComparison) -> Figure:
    """E_ij as a heat map (each row's nearest j marked), and S of A against B and of B
    against A as one-row heat maps (seed 004 figs. 4–5)."""
    forward, backward = comparison.a_against_b, comparison.b_against_a
    count = len(forward.nearest)
    figure = Figure(figsize=(max(6.0, 0.35 * count + 3.0), max(6.0, 0.3 * count + 4.5)),
                    layout="constrained")
    top, middle, bottom = figure.subplots(3, 1, height_ratios=[max(count, 4), 1.2, 1.2])
    image = top.imshow(forward.distances, cmap="viridis", aspect="auto")
    top.plot(forward.nearest, np.arange(count), "w.", markersize=6, label="nearest j of row i")
    top.set_xlabel(f"filter j of B ({comparison.b.layer})")
    top.set_ylabel(f"filter i of A ({comparison.a.layer})")
    top.set_title("E_ij = ||F_i - G_j||_2", fontsize=10)
    top.legend(loc="upper right", fontsize=7)
    figure.colorbar(image, ax=top, label="E_ij")
    top_value = float(max(forward.dissimilarity.max(), backward.dissimilarity.max()))
    for axes, result, title in ((middle, forward, "S_i: A's filter i against B's filters"),
                                (bottom, backward, "S_j: B's filter j against A's filters")):
        strip = axes.imshow(result.dissimilarity[None, :], cmap="magma_r", aspect="auto",
                            vmin=0.0, vmax=top_value or 1.0)
        axes.set_yticks([])
        axes.set_title(title, fontsize=9)
        if len(result.dissimilarity) <= _ANNOTATE_UP_TO:
            for i, value in enumerate(result.dissimilarity):
                axes.text(i, 0, f"{value:.2g}", ha="center", va="center", fontsize=6,
                          color="white" if value > 0.5 * top_value else "black")
        figure.colorbar(strip, ax=axes, label="S")
    bottom.set_xlabel("filter of the reference")
    figure.suptitle(f"Filter dissimilarity (seed 004 eq. 1)\nA = {_label(comparison.a.path)}"
                    f"\nB = {_label(comparison.b.path)}", fontsize=9)
    return figure


def _label(path: Path) -> str:
    """The last three parts of a path: enough to tell two runs' checkpoints apart."""
    return "/".join(Path(path).parts[-3:])


def filter_evolution(ckpt_dir: Path, against: int, epochs: str | None = None,
                     layer: str | None = None, network: NetworkOptions | None = None
                     ) -> FilterEvolution:
    """Every chosen epoch's S_i against the filters of epoch ``against``, both ways.

    Args:
        ckpt_dir: a folder of checkpoints, one per epoch.
        against: the epoch whose filters every epoch is compared with (it must be there).
        epochs: ``--epochs`` selection; None: every checkpoint.
        layer: the conv layer; None: the first.
        network: which network the checkpoints hold (None: as the files say).
    """
    checkpoints, _ = discover_checkpoints(ckpt_dir)
    by_epoch = {c.epoch: c.path for c in checkpoints}
    if against not in by_epoch:
        raise InputError(f"--against {against}: no checkpoint of epoch {against} in {ckpt_dir} "
                         f"(epochs {min(by_epoch)}–{max(by_epoch)})")
    chosen = parse_epochs(epochs, sorted(by_epoch)) if epochs else sorted(by_epoch)
    model = network_for(by_epoch[against], network)
    reference = read_filters(by_epoch[against], layer, model)
    rows = {name: [] for name in ("dissimilarity", "nearest", "dissimilarity_against",
                                  "nearest_against")}
    for epoch in chosen:
        filters = read_filters(by_epoch[epoch], reference.layer, model)
        check_same_kernels(filters.weights.shape, reference.weights.shape,
                           (f"epoch {epoch}'s {filters.layer}", f"epoch {against}'s"))
        if len(filters.weights) != len(reference.weights):
            raise InputError(f"epoch {epoch} has {len(filters.weights)} filters in "
                             f"{reference.layer}, epoch {against} {len(reference.weights)}")
        forward, backward = both_directions(filters.weights, reference.weights)
        rows["dissimilarity"].append(forward.dissimilarity)
        rows["nearest"].append(forward.nearest)
        rows["dissimilarity_against"].append(backward.dissimilarity)
        rows["nearest_against"].append(backward.nearest)
    return FilterEvolution(
        layer=reference.layer, against=against, against_file=by_epoch[against].name,
        epochs=np.asarray(chosen, dtype=np.int64),
        **{name: np.stack(values) for name, values in rows.items()},
        checkpoint_files=[by_epoch[e].name for e in chosen],
        checkpoint_sha256=[sha256_file(by_epoch[e]) for e in chosen])


def evolution_rows(result: FilterEvolution) -> list[dict]:
    """The JSON rows of an evolution, as :func:`pair_rows` with an ``epoch`` key: epoch e's
    filters as reference against the against epoch's, then the reverse."""
    rows = []
    for k, epoch in enumerate(result.epochs):
        file = result.checkpoint_files[k]
        for reference, compared, values, nearest in (
                (file, result.against_file, result.dissimilarity, result.nearest),
                (result.against_file, file, result.dissimilarity_against,
                 result.nearest_against)):
            rows += [{"epoch": int(epoch), "reference": reference, "compared": compared,
                      "layer": result.layer, "filter": i,
                      "dissimilarity": float(values[k, i]), "nearest": int(nearest[k, i])}
                     for i in range(values.shape[1])]
    return rows


def format_evolution(result: FilterEvolution, most: int = 30) -> str:
    """Per epoch: the mean and largest S_i, each way; beyond ``most`` epochs only those
    nearest 1, 2, 5, 10, 20, 50, … and the last (``--json`` has all)."""
    epochs = [int(e) for e in result.epochs]
    shown = set(epochs) if len(epochs) <= most else set(feature_epochs(epochs))
    lines = [f"layer {result.layer}, against epoch {result.against} ({result.against_file})"
             + ("" if len(shown) == len(epochs) else
                f"; {len(shown)} of {len(epochs)} epochs shown, --json for all"),
             f"{'epoch':>6}  {'mean S':>10}  {'max S':>10}  {'mean S against':>14}  "
             f"{'max S against':>13}"]
    for k, epoch in enumerate(epochs):
        if epoch not in shown:
            continue
        lines.append(f"{epoch:>6}  {result.dissimilarity[k].mean():>10.5g}  "
                     f"{result.dissimilarity[k].max():>10.5g}  "
                     f"{result.dissimilarity_against[k].mean():>14.5g}  "
                     f"{result.dissimilarity_against[k].max():>13.5g}")
    return "\n".join(lines)


def evolution_figure(result: FilterEvolution) -> Figure:
    """Epoch × filter heat maps of S: each epoch's filters against epoch ``against``'s, and
    the against epoch's filters against each epoch's."""
    count = result.dissimilarity.shape[1]
    figure = Figure(figsize=(max(8.0, 0.5 * count + 4.0), 5.0), layout="constrained")
    panels = figure.subplots(1, 2, sharey=True)
    top = float(max(np.nanmax(result.dissimilarity), np.nanmax(result.dissimilarity_against)))
    epochs = np.asarray(result.epochs, dtype=float)
    for axes, values, title in (
            (panels[0], result.dissimilarity,
             f"S_i: epoch's filter i against epoch {result.against}'s filters"),
            (panels[1], result.dissimilarity_against,
             f"S_j: epoch {result.against}'s filter j against the epoch's filters")):
        mesh = axes.pcolormesh(np.arange(count), epochs, values, shading="nearest",
                               cmap="magma_r", vmin=0.0, vmax=top or 1.0)
        axes.set_title(title, fontsize=9)
        axes.set_xlabel("filter")
        figure.colorbar(mesh, ax=axes, label="S")
    if len(epochs) > 1 and epochs[0] > 0 and epochs[-1] / epochs[0] >= 100:
        panels[0].set_yscale("log")
    panels[0].set_ylabel("epoch")
    figure.suptitle(f"Filter dissimilarity over the epochs, layer {result.layer} "
                    "(seed 004 eq. 1)", fontsize=10)
    return figure


def to_json(rows: list[dict]) -> str:
    """The rows as an indented JSON list."""
    return json.dumps(rows, indent=1)


def report_figures(runs: Sequence[RunData]) -> list[NamedFigure]:
    """The stored ``/filters`` heat maps of every run, for `analyzer report`."""
    named = []
    for run in runs:
        for evolution in read_filter_evolutions(run.path):
            named.append(NamedFigure(
                f"filters_{len(named) + 1}",
                f"Filter dissimilarity over the epochs (seed 004 eq. 1), {run.label}, layer "
                f"{evolution.layer}, against epoch {evolution.against}",
                evolution_figure(evolution)))
    return named
