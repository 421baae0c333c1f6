"""`analyzer features`: feature evolution during training (seed 003 fig. 4).

For each chosen channel of a layer, at each chosen epoch: the image of the split (training by
default) whose activation in that channel is the strongest, the position of that activation
and the patch of the image under its receptive field, and the activation projected into pixel
space with a deconvnet (or guided backpropagation; :mod:`analyzer.deconvnet`). Drawn as a
grid, channels × epochs, each cell the patch beside its projection; stored in
``/features/<layer>``. A sudden change of a row's picture means another image became the
strongest.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from analyzer.deconvnet import (
    layer_output,
    project_to_pixels,
    receptive_fields,
    strongest_activations,
)
from analyzer.figures import NamedFigure, RunData
from analyzer.pass_setup import PassRequest, set_up_pass
from analyzer.plan import parse_epochs
from analyzer.torch_backend import TorchBackend, _eval_mode, find_layer
from store.checkpoint_files import CheckpointFile
from store.errors import InputError
from store.feature_results import FeatureEvolution, read_feature_evolutions

logger = logging.getLogger(__name__)

MAX_CHANNELS = 64  # rows of the grid
MAX_EPOCHS = 20  # its columns
DEFAULT_CHANNELS = 16


@dataclass(frozen=True)
class FeatureOptions:
    """The options of `analyzer features` (see its ``--help``); None: as the run says."""

    ckpt_dir: Path
    epochs: str | None = None
    layer: str | None = None
    channels: str | None = None
    split: str = "train"
    run: Path | None = None
    model: str | None = None
    data: dict[str, Path] = field(default_factory=dict)
    image_size: tuple[int, int] | None = None
    input_channels: int | None = None
    device: str = "auto"
    batch_size: int = 256
    method: str = "deconvnet"


def feature_epochs(available: Sequence[int]) -> list[int]:
    """Default columns: the checkpoints nearest 1, 2, 5, 10, 20, 50, 100, … and the last
    (seed 003 fig. 4 shows epochs 1, 2, 5, 10, 20, 30, 40, 64)."""
    available = sorted(available)
    if not available:
        return []
    targets, scale = [], 1
    while scale <= available[-1]:
        targets += [scale, 2 * scale, 5 * scale]
        scale *= 10
    targets = [t for t in targets if t <= available[-1]] + [available[-1]]
    nearest = {min(available, key=lambda epoch, t=t: (abs(epoch - t), epoch)) for t in targets}
    return sorted(nearest)[-MAX_EPOCHS:]


def parse_channels(text: str | None, count: int) -> list[int]:
    """``--channels``: ``START:STOP[:STEP]`` (half-open, as a Python slice) or ``0,3,7``;
    None: the first :data:`DEFAULT_CHANNELS` (all when fewer)."""
    if text is None:
        return list(range(min(count, DEFAULT_CHANNELS)))
    try:
        if ":" in text:
            parts = [int(p) if p.strip() else None for p in text.split(":")]
            if len(parts) > 3 or parts[-1] == 0:
                raise ValueError(text)
            if any(p is not None and not 0 <= p <= count for p in parts[:2]):
                raise InputError(f"--channels {text}: the layer has channels 0–{count - 1}")
            chosen = list(range(count))[slice(*parts)]
        else:
            chosen = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise InputError(f"--channels takes START:STOP (e.g. 0:16) or a list (0,3,7), got "
                         f"{text!r}") from None
    wrong = [c for c in chosen if not 0 <= c < count]
    if wrong or not chosen:
        raise InputError(f"--channels {text}: the layer has channels 0–{count - 1}")
    if len(chosen) > MAX_CHANNELS:
        raise InputError(f"--channels {text} selects {len(chosen)} channels: the grid has at "
                         f"most {MAX_CHANNELS} rows")
    return chosen


@dataclass(frozen=True)
class _Cells:
    """One checkpoint's column: per chosen channel, what ``FeatureEvolution`` stores."""

    image: np.ndarray
    activation: np.ndarray
    position_row: np.ndarray
    position_col: np.ndarray
    patch: np.ndarray
    projection: np.ndarray
    rectifiers: int  # ReLU calls the projection rectified


@dataclass(frozen=True)
class FeatureRun:
    """What `analyzer features` computed, and where it came from.

    Attributes:
        evolution: the results, as stored in ``/features/<layer>``.
        run_file: the run file beside the checkpoints (or ``--run``); None when there is none.
        class_names: class index ``i`` is ``class_names[i]``.
    """

    evolution: FeatureEvolution
    run_file: Path | None
    class_names: list[str]


def compute_features(options: FeatureOptions) -> FeatureRun:
    """Search, project and measure each chosen channel at each chosen epoch."""
    analysis = set_up_pass(PassRequest(
        ckpt_dir=options.ckpt_dir, run=options.run, model=options.model, layer=options.layer,
        data=options.data, image_size=options.image_size, channels=options.input_channels,
        splits=[options.split], device=options.device, backend="torch", onnx_weights=True))
    chosen = _chosen_checkpoints(analysis.checkpoints, options.epochs)
    if not analysis.inputs.splits:
        raise InputError(f"the {options.split} split has no images")
    split, layer = analysis.inputs.splits[0], analysis.spec.layer
    images = torch.as_tensor(split.images, device=analysis.kind.setup.device)
    channels: list[int] | None = None
    columns, hashes = [], []
    for checkpoint in chosen:
        loaded = analysis.kind.load(checkpoint)
        backend = analysis.kind.backend(loaded)
        module = find_layer(backend.model, layer)
        if channels is None:
            channels = parse_channels(options.channels, _channel_count(
                backend.model, module, layer, images[:1]))
        columns.append(_column(backend, module, layer, images, channels, options))
        hashes.append(loaded.sha256)
    if columns[0].rectifiers == 0:
        logger.warning(f"no ReLU before layer {layer}: the projection is the plain gradient")
    image = np.stack([c.image for c in columns])
    evolution = FeatureEvolution(
        layer=layer, split=split.name, method=options.method,
        epochs=np.asarray([c.epoch for c in chosen]), channels=np.asarray(channels),
        image=image, image_id=[[split.identity.ids[i] for i in row] for row in image],
        label=np.asarray(split.identity.labels)[image],
        **{name: np.stack([getattr(c, name) for c in columns]) for name in (
            "activation", "position_row", "position_col", "patch", "projection")},
        input=split.images[image], checkpoint_files=[c.path.name for c in chosen],
        checkpoint_sha256=hashes)
    return FeatureRun(evolution, analysis.run_file, analysis.inputs.class_names)


def _chosen_checkpoints(checkpoints: list[CheckpointFile], epochs: str | None
                        ) -> list[CheckpointFile]:
    """The columns: ``--epochs``, or :func:`feature_epochs`; at most :data:`MAX_EPOCHS`."""
    available = [c.epoch for c in checkpoints]
    wanted = parse_epochs(epochs, available) if epochs else feature_epochs(available)
    chosen = [c for c in checkpoints if c.epoch in wanted]
    if len(chosen) > MAX_EPOCHS:
        raise InputError(f"--epochs {epochs} selects {len(chosen)} checkpoints: the grid "
                         f"has at most {MAX_EPOCHS} columns (e.g. --epochs 1,2,5,10,20,50,100)")
    return chosen


def _column(backend: TorchBackend, module: nn.Module, layer: str, images: torch.Tensor,
            channels: list[int], options: FeatureOptions) -> _Cells:
    """Strongest activation, projection and receptive field of each channel, one checkpoint."""
    model = backend.model
    picked = torch.as_tensor(channels, device=images.device)
    # as the Reaction pass does on a CPU: activations under glibc's mmap threshold, and the
    # zoo's channels-last layout (docs/BENCHMARKS.md)
    batch = backend._sub_batch_size(images[:options.batch_size])
    searched = images.contiguous(memory_format=torch.channels_last) \
        if backend.channels_last else images
    best = strongest_activations(model, module, layer, searched, picked, batch)
    projection = project_to_pixels(model, module, layer, images[best.image], picked, best.row,
                                   best.col, options.method)
    patch = receptive_fields(model, module, layer, tuple(images.shape[1:]), picked, best.row,
                             best.col)
    return _Cells(best.image.cpu().numpy(), best.value.cpu().numpy(), best.row.cpu().numpy(),
                  best.col.cpu().numpy(), patch.numpy(), projection.pixels.cpu().numpy(),
                  projection.rectifiers)


def _channel_count(model, module, layer: str, image: torch.Tensor) -> int:
    with _eval_mode(model), torch.no_grad():
        return int(layer_output(model, module, layer, image).shape[1])


def format_features(result: FeatureEvolution) -> str:
    """Per epoch and channel: the strongest image, its class, position and activation."""
    lines = [f"layer {result.layer}, strongest activation over the {result.split} split "
             f"(projection: {result.method})",
             f"{'epoch':>6}  {'channel':>7}  {'image':>24}  {'label':>5}  {'position':>9}  "
             f"{'activation':>10}"]
    for k, epoch in enumerate(result.epochs):
        for c, channel in enumerate(result.channels):
            position = f"{result.position_row[k, c]},{result.position_col[k, c]}"
            lines.append(f"{epoch:>6}  {channel:>7}  {result.image_id[k][c]:>24}  "
                         f"{result.label[k, c]:>5}  {position:>9}  "
                         f"{result.activation[k, c]:>10.5g}")
    return "\n".join(lines)


def feature_rows(result: FeatureEvolution) -> list[dict]:
    """JSON rows, one per epoch and channel: ``epoch``, ``channel``, ``image`` (row in the
    split), ``image_id``, ``label``, ``row``, ``col`` (in the feature map), ``activation``,
    ``patch`` ([row start, row stop, column start, column stop] in the input)."""
    return [{"epoch": int(epoch), "channel": int(channel), "image": int(result.image[k, c]),
             "image_id": result.image_id[k][c], "label": int(result.label[k, c]),
             "row": int(result.position_row[k, c]), "col": int(result.position_col[k, c]),
             "activation": float(result.activation[k, c]),
             "patch": [int(v) for v in result.patch[k, c]]}
            for k, epoch in enumerate(result.epochs) for c, channel in enumerate(result.channels)]


def features_figure(result: FeatureEvolution, class_names: Sequence[str] | None = None
                    ) -> Figure:
    """Rows: channels; columns: epochs, each a pair: the image patch under the receptive
    field, and the projection there (grey 0.5 = zero, each cell to its own largest |value|,
    as seed 003 enhances the contrast)."""
    rows, epochs = len(result.channels), len(result.epochs)
    top, stop, left, right = (result.patch[..., k] for k in range(4))
    aspect = float(np.median((right - left) / np.maximum(stop - top, 1)))
    cell = float(np.clip(1.1 * aspect, 0.9, 4.0))
    figure = Figure(figsize=(2 * cell * epochs + 0.8, 1.15 * rows + 0.9), layout="constrained")
    axes = figure.subplots(rows, 2 * epochs, squeeze=False)
    for c in range(rows):
        for k in range(epochs):
            box = (slice(None), slice(top[k, c], stop[k, c]), slice(left[k, c], right[k, c]))
            _show(axes[c, 2 * k], result.input[k, c][box], centred=False)
            _show(axes[c, 2 * k + 1], result.projection[k, c][box], centred=True)
            label = int(result.label[k, c])
            name = class_names[label] if class_names and label < len(class_names) else label
            axes[c, 2 * k].set_title(f"{_short(result.image_id[k][c])} ({name})", fontsize=6)
            axes[c, 2 * k + 1].set_title(f"a = {result.activation[k, c]:.3g}", fontsize=6)
        axes[c, 0].set_ylabel(f"channel {result.channels[c]}", fontsize=7)
    for k, epoch in enumerate(result.epochs):
        axes[0, 2 * k].annotate(f"epoch {epoch}", (1.0, 1.35), xycoords="axes fraction",
                                ha="center", fontsize=8, weight="bold")
    figure.suptitle(f"Feature evolution, layer {result.layer}: strongest activation over the "
                    f"{result.split} images (patch, {result.method} projection)", fontsize=9)
    return figure


def _show(axes, pixels: np.ndarray, centred: bool) -> None:
    if centred:
        scale = float(np.abs(pixels).max()) or 1.0
        pixels = 0.5 + 0.5 * pixels / scale
    pixels = np.clip(pixels, 0.0, 1.0)
    if pixels.shape[0] == 1:
        axes.imshow(pixels[0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        axes.imshow(np.moveaxis(pixels[:3], 0, -1), interpolation="nearest")
    axes.set_xticks([])
    axes.set_yticks([])


def _short(image_id: str, most: int = 14) -> str:
    return image_id if len(image_id) <= most else "…" + image_id[-(most - 1):]


def report_figures(runs: Sequence[RunData]) -> list[NamedFigure]:
    """The stored ``/features`` grids of every run, for `analyzer report` (none: no figure)."""
    named = []
    for run in runs:
        for evolution in read_feature_evolutions(run.path):
            named.append(NamedFigure(
                f"features_{len(named) + 1}",
                f"Feature evolution (seed 003 fig. 4), {run.label}, layer {evolution.layer}, "
                f"{evolution.split} images, epochs {', '.join(map(str, evolution.epochs))}",
                features_figure(evolution, run.class_names)))
    return named
