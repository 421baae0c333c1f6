"""`analyzer occlusion`: occlusion maps of chosen images at chosen epochs, into the run file.

The checkpoints, backend, images and epochs are chosen as for ``analyzer cam``
(:func:`analyzer.pass_setup.set_up_pass`, :func:`analyzer.cam.pick_images`), so the two grids
show the same images. Each checkpoint's maps are stored whole in ``/occlusion/<split>``
(:mod:`store.occlusion`) before the next is computed; epochs stored before with the same
settings are read back instead of computed again, after checking that their checkpoint file
is unchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from analyzer.cam import MAX_EPOCHS, MAX_IMAGES, cam_epochs, pick_images
from analyzer.inputs import SplitData
from analyzer.occlusion import occlusion_maps, patch_positions
from analyzer.pass_setup import Pass, PassRequest, set_up_pass
from analyzer.plan import parse_epochs
from store.checkpoint_files import CheckpointFile, sha256_file
from store.errors import InputError
from store.h5io import remove_stale_copies
from store.occlusion import (
    OcclusionEpoch,
    OcclusionImages,
    OcclusionSettings,
    StoredOcclusion,
    prepare_occlusion,
    read_occlusion,
    stored_image_ids,
    write_occlusion_epoch,
)
from store.results import check_results_target, create_results_file


@dataclass(frozen=True)
class OcclusionOptions:
    """The options of `analyzer occlusion` (see its ``--help``).

    Attributes:
        source: the checkpoints, network, split (exactly one), device and backend, as for
            every pass.
        epochs: the columns; None: :func:`analyzer.cam.cam_epochs` of the checkpoints.
        images: the rows: the first N images of the split (:func:`analyzer.cam.pick_images`).
        patch: the square's side; None: :func:`default_patch`.
        stride: the step between positions; None: half the patch.
        fill: the value under the square; None: the split's mean pixel value.
        results: the file for the maps; None: the run file.
        batch_size: occluded copies per forward pass.
    """

    source: PassRequest
    epochs: str | None = None
    images: int = 8
    patch: int | None = None
    stride: int | None = None
    fill: float | None = None
    results: Path | None = None
    batch_size: int = 256


@dataclass(frozen=True)
class OcclusionRun:
    """What a call computed: the stored maps of its epochs, and where they are.

    Attributes:
        stored: ``/occlusion/<split>`` read back, restricted to the chosen epochs.
        class_names: class index ``i`` is ``class_names[i]``.
        path: the run or results file.
        computed: the epochs computed now (the others were read back).
    """

    stored: StoredOcclusion
    class_names: list[str]
    path: Path
    computed: list[int]


def default_patch(height: int, width: int) -> int:
    """A fifth of the shorter side, rounded, at least 1 (10 for 50×200 images)."""
    return max(1, round(min(height, width) / 5))


def compute_occlusion(options: OcclusionOptions, progress: bool = False) -> OcclusionRun:
    """Compute (or read back) the maps of the chosen images at the chosen epochs and store
    them; see the module docstring."""
    if not 1 <= options.images <= MAX_IMAGES:
        raise InputError(f"--images must be 1 to {MAX_IMAGES} (one row of the figure each), "
                         f"got {options.images}")
    if not options.source.splits or len(options.source.splits) != 1:
        raise InputError("occlusion maps the images of one split")
    analysis = set_up_pass(options.source)
    chosen = _chosen_checkpoints(analysis, options.epochs)
    if not analysis.inputs.splits:
        raise InputError(f"the {options.source.splits[0]} split has no images")
    split = analysis.inputs.splits[0]
    settings = _settings(options, split.images, analysis.backend_name)
    path = _results_path(options, analysis)
    wanted = [split.identity.ids[i] for i in pick_images(split.identity.labels, options.images)]
    images = _images_to_map(split, wanted, stored_image_ids(path, split.name))
    height, width = split.images.shape[-2:]
    done = prepare_occlusion(
        path, split.name, epochs=[c.epoch for c in chosen], images=images,
        rows=patch_positions(height, settings.patch, settings.stride),
        cols=patch_positions(width, settings.patch, settings.stride), settings=settings,
        device=str(analysis.kind.setup.device))
    computed = []
    for checkpoint in tqdm(chosen, disable=not progress, unit="ckpt", dynamic_ncols=True):
        if checkpoint.epoch in done:
            _check_unchanged(checkpoint, done[checkpoint.epoch], path)
            continue
        write_occlusion_epoch(path, split.name, _compute_epoch(analysis, checkpoint, images,
                                                               settings, options.batch_size))
        computed.append(checkpoint.epoch)
    stored = read_occlusion(path, split.name).only_epochs([c.epoch for c in chosen])
    return OcclusionRun(stored.only_images(wanted), analysis.inputs.class_names, path, computed)


def _images_to_map(split: SplitData, wanted: list[str], stored: list[str] | None
                   ) -> OcclusionImages:
    """The images whose maps are computed: the wanted ones, or all those the group already
    maps when it maps the wanted ones among others (fewer rows of the same grid)."""
    position = {image_id: row for row, image_id in enumerate(split.identity.ids)}
    ids = stored if stored is not None and set(wanted) <= set(stored) <= set(position) \
        else wanted
    rows = np.asarray([position[image_id] for image_id in ids], dtype=np.int64)
    return OcclusionImages(list(ids), split.identity.labels[rows], split.images[rows])


def _chosen_checkpoints(analysis: Pass, epochs: str | None) -> list[CheckpointFile]:
    available = [c.epoch for c in analysis.checkpoints]
    wanted = parse_epochs(epochs, available) if epochs else cam_epochs(available)
    chosen = [c for c in analysis.checkpoints if c.epoch in wanted]
    if len(chosen) > MAX_EPOCHS:
        raise InputError(f"--epochs {epochs} selects {len(chosen)} checkpoints: the grid has "
                         f"at most {MAX_EPOCHS} columns (e.g. --epochs 1:1000:100)")
    return chosen


def _settings(options: OcclusionOptions, pixels: np.ndarray, backend: str) -> OcclusionSettings:
    """Patch, stride and fill: as given, else the defaults; InputError if they do not fit."""
    height, width = pixels.shape[-2:]
    patch = options.patch if options.patch is not None else default_patch(height, width)
    stride = options.stride if options.stride is not None else max(1, patch // 2)
    if not 1 <= patch <= min(height, width):
        raise InputError(f"--patch {patch} does not fit in the {height}x{width} images "
                         f"(at most {min(height, width)})")
    if stride < 1:
        raise InputError(f"--stride must be at least 1, got {stride}")
    if options.fill is None:
        return OcclusionSettings(patch, stride, float(np.mean(pixels, dtype=np.float64)),
                                 "mean", backend)
    return OcclusionSettings(patch, stride, float(options.fill), "given", backend)


def _results_path(options: OcclusionOptions, analysis: Pass) -> Path:
    """``--results``, else the run file; created (as a results file) when it does not exist,
    else checked to belong to these classes and images."""
    path = options.results or analysis.run_file
    if path is None:
        raise InputError("no run file to store the maps in: give --results FILE.h5")
    path = Path(path)
    inputs = analysis.inputs
    if path.exists():
        remove_stale_copies(path)
        check_results_target(path, inputs.class_names,
                             {split.name: split.identity for split in inputs.splits})
    else:
        try:
            create_results_file(path, inputs.class_names)
        except OSError as error:
            raise InputError(f"cannot write {path}: {error.strerror or error}") from None
    return path


def _check_unchanged(checkpoint: CheckpointFile, stored_sha256: str, path: Path) -> None:
    if sha256_file(checkpoint.path) != stored_sha256:
        raise InputError(f"{checkpoint.path} changed since its occlusion maps were stored in "
                         f"{path} (another SHA-256): write the maps of the new checkpoints to "
                         "another file with --results")


def _compute_epoch(analysis: Pass, checkpoint: CheckpointFile, images: OcclusionImages,
                   settings: OcclusionSettings, batch_size: int) -> OcclusionEpoch:
    began = time.perf_counter()
    loaded = analysis.kind.load(checkpoint)
    backend = analysis.kind.backend(loaded)
    device = analysis.kind.setup.device
    maps = occlusion_maps(backend.logits, torch.as_tensor(images.pixels, device=device),
                          torch.as_tensor(images.labels, device=device), settings.patch,
                          settings.stride, settings.fill, batch_size)
    host = {name: getattr(maps, name).detach().cpu().numpy() for name in (
        "probability", "logit", "prediction", "unoccluded_probability", "unoccluded_logit",
        "sensitivity")}
    return OcclusionEpoch(checkpoint.epoch, seconds=time.perf_counter() - began,
                          checkpoint_file=checkpoint.path.name, checkpoint_sha256=loaded.sha256,
                          **host)



def parse_fill(text: str) -> float | None:
    """``--fill``: ``mean`` (None: the split's mean pixel value) or a finite number."""
    if text.strip().lower() == "mean":
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not np.isfinite(value):
        raise InputError(f"--fill takes 'mean' or a number (a pixel value, e.g. 0.5), "
                         f"got {text!r}")
    return value


def format_summary(run: OcclusionRun) -> str:
    """The table `analyzer occlusion` prints: one line per image, each epoch's unoccluded
    probability and sensitivity, under a line that names the settings."""
    stored, settings = run.stored, run.stored.settings
    fill = f"{settings.fill:.4g}" + (f" (the {stored.split} split's mean pixel value)"
                                     if settings.fill_source == "mean" else "")
    read_back = len(stored.epochs) - len(run.computed)
    lines = [f"occlusion of {len(stored.images.ids)} {stored.split} images: patch "
             f"{settings.patch}, stride {settings.stride}, fill {fill}, {len(stored.rows)}x"
             f"{len(stored.cols)} positions; {len(run.computed)} epochs computed, {read_back} "
             "read back",
             "each cell: probability of the true class without the square / sensitivity "
             "(that minus its minimum over the positions)"]
    rows = [["image", "class", *(f"epoch {int(e)}" for e in stored.epochs)]]
    for i, (image_id, label) in enumerate(zip(stored.images.ids, stored.images.labels,
                                              strict=True)):
        rows.append([image_id, run.class_names[int(label)],
                     *(f"{stored.arrays['unoccluded_probability'][j, i]:.3f} / "
                       f"{stored.arrays['sensitivity'][j, i]:.3f}"
                       for j in range(len(stored.epochs)))])
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    lines += ["  ".join(cell.ljust(width) if k < 2 else cell.rjust(width)
                        for k, (cell, width) in enumerate(zip(row, widths, strict=True)))
              for row in rows]
    return "\n".join(lines)
