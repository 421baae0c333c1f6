"""Grad-CAM heat maps over the input images, a grid of images × epochs (docs/METHOD.md §3 item 5).

The maps are the backend's own (``Backend.compute`` with ``keep_maps=True``): the
same raw map, at the layer's resolution, whose Reaction ``analyzer reaction`` stores. Each
cell's title therefore carries exactly the Reaction of that image at that epoch. Only for
display is the map upsampled (bilinear) to the input size and laid over the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure

from analyzer.inputs import find_run_file
from analyzer.pass_setup import PassRequest, set_up_pass
from analyzer.plan import parse_epochs
from store.errors import InputError
from store.results import read_split_results, result_splits

SCALES = ("cell", "shared")
MAX_IMAGES = 64  # rows of the grid: beyond this the figure is unreadable and slow to draw
MAX_EPOCHS = 20  # its columns


@dataclass(frozen=True)
class CamOptions:
    """The options of `analyzer cam` (see its ``--help``); None means "as the run says"."""

    ckpt_dir: Path
    epochs: str | None = None  # None: :func:`cam_epochs` of the checkpoints
    images: int = 8
    split: str = "train"
    run: Path | None = None
    model: str | None = None
    layer: str | None = None
    data: dict[str, Path] = field(default_factory=dict)
    image_size: tuple[int, int] | None = None
    channels: int | None = None
    score: str | None = None
    target: str | None = None
    device: str = "auto"
    backend: str = "auto"


@dataclass(frozen=True)
class CamGrid:
    """Grad-CAM maps of chosen images at chosen epochs.

    Attributes:
        pixels: ``[image, channel, H, W]`` the model's inputs, in [0, 1].
        labels: ``[image]`` true class indices.
        image_ids: the images' ids in the split.
        image_index: their rows in the split (and in ``/reaction/<split>/image``).
        class_names: class index ``i`` is ``class_names[i]``.
        epochs: the columns.
        maps: ``[image, epoch, h, w]`` raw maps at the layer's resolution (float32).
        reaction: ``[image, epoch]`` Reaction of each map (thesis eq. 3.3).
        split, layer: where the images and the maps come from.
    """

    pixels: np.ndarray
    labels: np.ndarray
    image_ids: list[str]
    image_index: np.ndarray
    class_names: list[str]
    epochs: list[int]
    maps: np.ndarray
    reaction: np.ndarray
    split: str
    layer: str


def pick_images(labels: np.ndarray, count: int) -> np.ndarray:
    """The first ``count`` images spread over the classes: the first of each class in class
    order, then the second of each, and so on. Deterministic; indices into ``labels``."""
    labels = np.asarray(labels)
    per_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    chosen: list[int] = []
    depth = 0
    while len(chosen) < count and any(depth < len(rows) for rows in per_class):
        chosen += [int(rows[depth]) for rows in per_class if depth < len(rows)]
        depth += 1
    return np.asarray(chosen[:count], dtype=np.int64)


def cam_epochs(available: Sequence[int], most: int = 5) -> list[int]:
    """Epochs for the heat-map grid: the first, the checkpoints nearest 10, 100, 1000…, the
    last; at most ``most`` of them, in order."""
    available = sorted(available)
    if not available:
        return []
    targets = [available[0]]
    power = 10
    while power < available[-1]:
        targets.append(power)
        power *= 10
    targets.append(available[-1])
    nearest = [min(available, key=lambda epoch, t=t: abs(epoch - t)) for t in targets]
    chosen = sorted(set(nearest))
    if len(chosen) > most:
        chosen = [*chosen[:most - 1], chosen[-1]]
    return chosen


def compute_cam_grid(options: CamOptions) -> CamGrid:
    """Load each chosen checkpoint and compute the maps of the chosen images.

    The checkpoints, backend and settings are chosen as by ``analyzer reaction``
    (:func:`analyzer.pass_setup.set_up_pass`), with the stored results' settings as defaults,
    so each title shows the Reaction stored for that image and epoch. ONNX checkpoints need
    their maps (``analyzer export-onnx --with-maps``).
    """
    if not 1 <= options.images <= MAX_IMAGES:
        raise InputError(f"--images must be 1 to {MAX_IMAGES} (one row of the figure each), "
                         f"got {options.images}")
    run_file = find_run_file(options.ckpt_dir, options.run)
    stored = _stored_settings(run_file, options.split)
    if options.model is not None:  # the stored layer belongs to the run's own model
        stored.pop("layer", None)
    analysis = set_up_pass(PassRequest(
        ckpt_dir=options.ckpt_dir, run=options.run, model=options.model, layer=options.layer,
        data=options.data, image_size=options.image_size, channels=options.channels,
        splits=[options.split], score=options.score, target=options.target,
        device=options.device, backend=options.backend), defaults=stored)
    available = [c.epoch for c in analysis.checkpoints]
    wanted = parse_epochs(options.epochs, available) if options.epochs else \
        cam_epochs(available)
    chosen = [c for c in analysis.checkpoints if c.epoch in wanted]
    if len(chosen) > MAX_EPOCHS:
        raise InputError(f"--epochs {options.epochs} selects {len(chosen)} checkpoints: the grid "
                         f"has at most {MAX_EPOCHS} columns (e.g. --epochs 1:1000:100)")
    inputs = analysis.inputs
    if not inputs.splits:
        raise InputError(f"the {options.split} split has no images")
    split, device = inputs.splits[0], analysis.kind.setup.device
    rows = pick_images(split.identity.labels, options.images)
    images = torch.as_tensor(split.images[rows], device=device)
    labels = torch.as_tensor(split.identity.labels[rows], device=device)
    maps, reaction = [], []
    for checkpoint in chosen:
        backend = analysis.kind.backend(analysis.kind.load(checkpoint))
        result = backend.compute(images, labels, keep_maps=True)
        maps.append(result.cam.detach().cpu().numpy())
        reaction.append(result.reaction.detach().cpu().numpy())
    return CamGrid(split.images[rows], split.identity.labels[rows],
                   [split.identity.ids[i] for i in rows], rows, inputs.class_names,
                   [c.epoch for c in chosen], np.stack(maps, axis=1), np.stack(reaction, axis=1),
                   split.name, analysis.spec.layer)


def _stored_settings(run_file: Path | None, split: str) -> dict[str, str]:
    """Layer, score and target of the stored Reaction results, so the titles match them."""
    if run_file is None or split not in result_splits(run_file):
        return {}
    return dict(read_split_results(run_file, split)["settings"])


def upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of maps ``[..., h, w]`` to ``size`` (display only, never for Reaction)."""
    maps = np.asarray(maps, dtype=np.float32)
    flat = torch.as_tensor(maps.reshape(-1, 1, *maps.shape[-2:]))
    resized = torch.nn.functional.interpolate(flat, size=tuple(size), mode="bilinear",
                                              align_corners=False)
    return resized.numpy().reshape(*maps.shape[:-2], *size)


def cell_title(class_name: str, epoch: int, reaction: float) -> str:
    """``"class 3 · epoch 10\\nReaction 0.01234"`` (four significant digits)."""
    empty = " (empty map)" if reaction == 0 else ""
    return f"class {class_name} · epoch {epoch}\nReaction {reaction:.4g}{empty}"


def cam_figure(grid: CamGrid, scale: str = "cell") -> Figure:
    """Rows: images; columns: epochs. Each map over its image, coloured from 0 to its own
    maximum (``scale="cell"``) or to the grid's maximum (``"shared"``)."""
    if scale not in SCALES:
        raise InputError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    height, width = grid.pixels.shape[-2:]
    heat = upsample(grid.maps, (height, width))
    cell_width = float(np.clip(1.8 * width / height, 1.8, 6.0))
    figure = Figure(figsize=(cell_width * len(grid.epochs), 2.1 * len(grid.labels) + 0.6),
                    layout="constrained")
    axes = figure.subplots(len(grid.labels), len(grid.epochs), squeeze=False)
    shared_top = float(heat.max()) if heat.size else 0.0
    jet = colormaps["jet"]
    for i, label in enumerate(grid.labels):
        for j, epoch in enumerate(grid.epochs):
            cell = axes[i, j]
            top = shared_top if scale == "shared" else float(heat[i, j].max())
            show_input(cell, grid.pixels[i])
            cell.imshow(heat[i, j], cmap=jet, alpha=0.45, vmin=0.0, vmax=top if top > 0 else 1.0,
                        interpolation="nearest")
            cell.set_title(cell_title(grid.class_names[int(label)], epoch,
                                      float(grid.reaction[i, j])), fontsize=8)
            cell.set_xticks([])
            cell.set_yticks([])
    colour_scale = "each map from 0 to its own maximum" if scale == "cell" else \
        "one colour scale for the whole grid"
    figure.suptitle(f"Grad-CAM at layer {grid.layer}, {grid.split} images ({colour_scale})",
                    fontsize=10)
    return figure


def show_input(axes, pixels: np.ndarray) -> None:
    """Draw an image ``[C, H, W]`` in [0, 1] on ``axes``: grey for one channel, else RGB."""
    if pixels.shape[0] == 1:
        axes.imshow(pixels[0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        axes.imshow(np.clip(np.moveaxis(pixels[:3], 0, -1), 0.0, 1.0), interpolation="nearest")
