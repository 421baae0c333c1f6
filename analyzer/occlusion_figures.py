"""Occlusion figures: the grid of probability maps (images × epochs, as seed 003 fig. 7 (d)
draws one) and the sensitivity of each image against the epoch, drawn like Reaction.

Both are drawn from what ``/occlusion/<split>`` stores (:class:`store.occlusion.StoredOcclusion`),
so the report needs neither the checkpoints nor the data set.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from analyzer.cam import MAX_EPOCHS, cam_epochs, show_input
from analyzer.figures import NamedFigure, RunData
from store.occlusion import StoredOcclusion, occlusion_splits, read_occlusion

PROBABILITY_COLOURS = "RdYlGn"  # red where covering the square kills the target's probability


def map_extent(stored: StoredOcclusion) -> tuple[float, float, float, float]:
    """Where the map lies over the image, in imshow's pixel coordinates (left, right,
    bottom, top): value (r, c) is drawn as a stride-wide cell centred on its patch's centre."""
    patch, stride = stored.settings.patch, stored.settings.stride
    centre = (patch - 1) / 2
    return (stored.cols[0] + centre - stride / 2, stored.cols[-1] + centre + stride / 2,
            stored.rows[-1] + centre + stride / 2, stored.rows[0] + centre - stride / 2)


def cell_title(class_name: str, epoch: int, unoccluded: float, sensitivity: float) -> str:
    """``"class 3 · epoch 10\\np 0.981, sensitivity 0.862"`` (three significant digits)."""
    return f"class {class_name} · epoch {epoch}\np {unoccluded:.3g}, sensitivity {sensitivity:.3g}"


def occlusion_figure(stored: StoredOcclusion, class_names: Sequence[str]) -> Figure:
    """Rows: images; columns: epochs. Each cell is the image with, over it, the target class's
    probability at each patch position, on one colour scale from 0 to 1 for the whole grid."""
    images, epochs = stored.images, stored.epochs
    height, width = images.pixels.shape[-2:]
    cell_width = float(np.clip(1.8 * width / height, 1.8, 6.0))
    figure = Figure(figsize=(cell_width * len(epochs) + 0.8, 2.1 * len(images.ids) + 0.7),
                    layout="constrained")
    axes = figure.subplots(len(images.ids), len(epochs), squeeze=False)
    extent = map_extent(stored)
    shown = None
    for i, label in enumerate(images.labels):
        for j, epoch in enumerate(epochs):
            cell = axes[i, j]
            show_input(cell, images.pixels[i])
            shown = cell.imshow(stored.arrays["probability"][j, i], cmap=PROBABILITY_COLOURS,
                                vmin=0.0, vmax=1.0, alpha=0.55, extent=extent,
                                interpolation="nearest")
            cell.set_xlim(-0.5, width - 0.5)
            cell.set_ylim(height - 0.5, -0.5)
            cell.set_title(cell_title(class_names[int(label)], int(epoch),
                                      float(stored.arrays["unoccluded_probability"][j, i]),
                                      float(stored.arrays["sensitivity"][j, i])), fontsize=8)
            cell.set_xticks([])
            cell.set_yticks([])
    if shown is not None:
        figure.colorbar(shown, ax=axes, shrink=0.6, label="probability of the true class")
    settings = stored.settings
    figure.suptitle(f"Occlusion, {stored.split} images: probability of the true class\n"
                    f"with a {settings.patch}×{settings.patch} square (fill "
                    f"{settings.fill:.3g}) at each position (stride {settings.stride})",
                    fontsize=9)
    return figure


def sensitivity_figure(stored: StoredOcclusion, class_names: Sequence[str]) -> Figure:
    """Each image's sensitivity (unoccluded probability minus the minimum over positions)
    against the epoch, one line per image."""
    figure = Figure(figsize=(8.0, 4.5), layout="constrained")
    axes = figure.subplots()
    colours = colormaps["tab10"]
    for i, (image_id, label) in enumerate(zip(stored.images.ids, stored.images.labels,
                                              strict=True)):
        axes.plot(stored.epochs, stored.arrays["sensitivity"][:, i], marker="o", markersize=3,
                  linewidth=1.2, color=colours(i % 10),
                  label=f"class {class_names[int(label)]} (image {image_id})")
    axes.set_xlabel("epoch")
    axes.set_ylabel("sensitivity (probability)")
    axes.set_title(f"Occlusion sensitivity, {stored.split} images: unoccluded probability "
                   "minus its minimum over the square's positions", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, ncol=2)
    return figure


def grid_epochs(epochs: Sequence[int]) -> list[int]:
    """The stored epochs the report's grid shows: all of them, or at most
    :data:`~analyzer.cam.MAX_EPOCHS` chosen as ``analyzer cam`` chooses."""
    epochs = sorted(int(e) for e in epochs)
    return epochs if len(epochs) <= MAX_EPOCHS else cam_epochs(epochs, most=MAX_EPOCHS)


def report_figures(runs: Sequence[RunData]) -> list[NamedFigure]:
    """The occlusion grid and sensitivity curves of every split of every run that holds
    ``/occlusion`` maps (none: an empty list)."""
    named = []
    for run in runs:
        for split in occlusion_splits(Path(run.path)):
            stored = read_occlusion(run.path, split)
            name = f"occlusion_{sum(1 for n in named if n.name.endswith('_grid')) + 1}"
            caption = f"Occlusion, {run.label}, {split} images"
            if not len(stored.epochs):
                named.append(NamedFigure(f"{name}_grid", caption, None, "no epoch computed yet"))
                continue
            shown = stored.only_epochs(grid_epochs(stored.epochs))
            named.append(NamedFigure(f"{name}_grid", f"{caption}, epochs "
                                     f"{', '.join(map(str, shown.epochs))}",
                                     occlusion_figure(shown, run.class_names)))
            named.append(NamedFigure(f"{name}_sensitivity", f"{caption}: sensitivity over "
                                     "the epochs", sensitivity_figure(stored, run.class_names)))
    return named
