"""`analyzer reaction`: Reaction, accuracy and loss of every checkpoint over every split.

The images of every split are loaded and preprocessed once and stay on the device; the next
checkpoint is read (and hashed) in a background thread while the current one computes.
Results go into ``/reaction/<split>`` of the run file (or of ``--out``), one checkpoint at a
time, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from analyzer.aggregate import summarise_classes
from analyzer.inputs import AnalysisInputs, SplitData, find_run_file, resolve_inputs
from analyzer.torch_backend import TorchBackend
from store.checkpoints import sha256_file
from store.errors import InputError
from store.model_files import (
    CheckpointFile,
    LoadedWeights,
    discover_checkpoints,
    load_weights_file,
    strip_common_prefix,
)
from store.results import (
    EpochResult,
    check_results_target,
    computed_epochs,
    create_results_file,
    prepare_split,
    write_epoch_result,
)
from store.runfile import read_run_info
from trainer.train import resolve_device


@dataclass(frozen=True)
class ReactionOptions:
    """The options of `analyzer reaction` (see its ``--help``)."""

    ckpt_dir: Path
    run: Path | None = None
    out: Path | None = None
    model: str | None = None
    layer: str | None = None
    data: dict[str, Path] = field(default_factory=dict)
    image_size: tuple[int, int] | None = None
    channels: int | None = None
    splits: list[str] | None = None
    epochs: str | None = None
    score: str = "logit"
    target: str = "label"
    device: str = "auto"
    batch_size: int = 256


def parse_epochs(text: str, available: list[int]) -> list[int]:
    """Select epochs: ``"1:1000:10"`` (start:stop:step, stop included), ``"5"``, ``"1,10,100"``.

    Ranges keep the epochs that have a checkpoint; a single epoch without one is an error.
    """
    chosen: set[int] = set()
    have = set(available)
    for part in text.split(","):
        numbers = part.strip().split(":")
        try:
            values = [int(n) for n in numbers]
        except ValueError:
            raise InputError(f"--epochs: {part!r} is not N, START:STOP or START:STOP:STEP") \
                from None
        if len(values) == 1:
            if values[0] not in have:
                raise InputError(f"no checkpoint for epoch {values[0]}")
            chosen.add(values[0])
        elif len(values) in (2, 3) and (len(values) == 2 or values[2] > 0):
            step = values[2] if len(values) == 3 else 1
            chosen |= have & set(range(values[0], values[1] + 1, step))
        else:
            raise InputError(f"--epochs: {part!r} is not N, START:STOP or START:STOP:STEP")
    return sorted(chosen)


def compute_reaction(options: ReactionOptions, progress: bool = True) -> Path:
    """Compute and store Reaction for the selected checkpoints; return the results file."""
    checkpoints, ignored = discover_checkpoints(options.ckpt_dir)
    for path in ignored:
        print(f"note: ignoring {path.name} (not a checkpoint with an epoch number)",
              file=sys.stderr)
    axis = {c.epoch for c in checkpoints}
    if options.epochs:
        wanted = set(parse_epochs(options.epochs, [c.epoch for c in checkpoints]))
        checkpoints = [c for c in checkpoints if c.epoch in wanted]
    run_file = find_run_file(options.ckpt_dir, options.run)
    results_path = _results_path(options, run_file)
    device = resolve_device(options.device)
    inputs = resolve_inputs(first_checkpoint=checkpoints[0], run_file=run_file,
                            model=options.model, layer=options.layer, data=options.data,
                            image_size=options.image_size, channels=options.channels,
                            splits=options.splits)
    if not inputs.splits:
        raise InputError("no split with images to analyse")
    _preflight(checkpoints[0], inputs, options, device)
    if results_path == run_file:
        axis |= set(range(1, read_run_info(run_file).epochs + 1))
    _prepare_results(results_path, inputs, sorted(axis), options, str(device))
    pending = _pending(results_path, inputs.splits, checkpoints)
    if not pending:
        print(f"all {len(checkpoints)} checkpoints already analysed in {results_path}",
              file=sys.stderr)
        return results_path
    _run(pending, inputs, results_path, options, device, progress)
    return results_path


def _preflight(first: CheckpointFile, inputs: AnalysisInputs, options: ReactionOptions,
               device: torch.device) -> None:
    """Fail on a model, layer or class-count mismatch before any file is touched."""
    backend = None if inputs.model is None else TorchBackend(
        inputs.model, inputs.layer, device, options.score, options.target)
    backend = _backend_for(_load(first), backend, inputs, options, device)
    split = inputs.splits[0]
    images = torch.as_tensor(split.images[:2], device=device)
    labels = torch.as_tensor(split.identity.labels[:2], device=device)
    _per_image(backend, images, labels, 2, len(inputs.class_names), first)


def _results_path(options: ReactionOptions, run_file: Path | None) -> Path:
    if options.out is not None:
        return Path(options.out)
    if run_file is None:
        raise InputError(f"no run file beside {options.ckpt_dir}: give --run RUN.h5 or "
                         "--out RESULTS.h5")
    return run_file


def _prepare_results(path: Path, inputs: AnalysisInputs, epochs: list[int],
                     options: ReactionOptions, device: str) -> None:
    """Create or check the results groups, with rows for ``epochs`` (every checkpoint's)."""
    if path.exists():
        check_results_target(path)
    else:
        try:
            create_results_file(path, inputs.class_names)
        except OSError as error:
            raise InputError(f"cannot write {path}: {error.strerror or error}") from None
    settings = {"layer": inputs.layer, "score": options.score, "target": options.target,
                "backend": TorchBackend.name}
    for split in inputs.splits:
        prepare_split(path, split.name, epochs=epochs, class_names=inputs.class_names,
                      images=split.identity, settings=settings, device=device)


def _pending(path: Path, splits: list[SplitData],
             checkpoints: list[CheckpointFile]) -> list[tuple[CheckpointFile, list[SplitData]]]:
    """Each checkpoint with the splits whose results it still lacks."""
    done = {split.name: computed_epochs(path, split.name) for split in splits}
    pending = []
    for checkpoint in checkpoints:
        todo = [s for s in splits if checkpoint.epoch not in done[s.name]]
        if todo:
            pending.append((checkpoint, todo))
    return pending


@dataclass
class _Loaded:
    checkpoint: CheckpointFile
    weights: LoadedWeights
    sha256: str


def _load(checkpoint: CheckpointFile) -> _Loaded:
    return _Loaded(checkpoint, load_weights_file(checkpoint.path), sha256_file(checkpoint.path))


def _prefetched(pending: list[tuple[CheckpointFile, list[SplitData]]]
                ) -> Iterator[tuple[_Loaded, list[SplitData]]]:
    """Yield each checkpoint loaded, reading the next one in the background meanwhile."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(_load, pending[0][0])
        for index, (_, splits) in enumerate(pending):
            loaded = future.result()
            if index + 1 < len(pending):
                future = pool.submit(_load, pending[index + 1][0])
            yield loaded, splits


def _run(pending: list[tuple[CheckpointFile, list[SplitData]]], inputs: AnalysisInputs,
         results_path: Path, options: ReactionOptions, device: torch.device,
         progress: bool) -> None:
    on_device = {split.name: (torch.as_tensor(split.images, device=device),
                              torch.as_tensor(split.identity.labels, device=device))
                 for split in inputs.splits}
    backend = None if inputs.model is None else TorchBackend(
        inputs.model, inputs.layer, device, options.score, options.target)
    bar = tqdm(total=len(pending), disable=not progress, unit="ckpt", dynamic_ncols=True)
    images_done, started = 0, time.perf_counter()
    for loaded, splits in _prefetched(pending):
        backend = _backend_for(loaded, backend, inputs, options, device)
        for split in splits:
            began = time.perf_counter()
            images, labels = on_device[split.name]
            per_image = _per_image(backend, images, labels, options.batch_size,
                                   len(inputs.class_names), loaded.checkpoint)
            write_epoch_result(results_path, split.name, _epoch_result(
                loaded, split, per_image, len(inputs.class_names), time.perf_counter() - began))
            images_done += len(labels)
        bar.update()
        bar.set_postfix(epoch=loaded.checkpoint.epoch,
                        images_per_s=f"{images_done / (time.perf_counter() - started):.0f}")
    bar.close()


def _backend_for(loaded: _Loaded, backend: TorchBackend | None, inputs: AnalysisInputs,
                 options: ReactionOptions, device: torch.device) -> TorchBackend:
    """The backend with this checkpoint's weights (a new one for a self-contained program)."""
    weights = loaded.weights
    if weights.module is not None:
        return TorchBackend(weights.module, inputs.layer, device, options.score, options.target)
    if weights.state_dict is None or backend is None:
        raise InputError(f"{loaded.checkpoint.path.name}: cannot load it into the model: "
                         "give --model")
    expected = set(backend.model.state_dict())
    try:
        backend.load_weights(strip_common_prefix(weights.state_dict, expected))
    except InputError as error:
        raise InputError(f"{loaded.checkpoint.path.name}: {error}") from None
    return backend


@dataclass
class _PerImage:
    reaction: np.ndarray
    prediction: np.ndarray
    loss: np.ndarray


def _per_image(backend: TorchBackend, images: torch.Tensor, labels: torch.Tensor,
               batch_size: int, num_classes: int, checkpoint: CheckpointFile) -> _PerImage:
    reactions, predictions, losses = [], [], []
    for batch_images, batch_labels in zip(images.split(batch_size), labels.split(batch_size),
                                          strict=True):
        result = backend.compute(batch_images, batch_labels)
        if result.logits.shape[1] != num_classes:
            raise InputError(f"{checkpoint.path.name}: the model gives "
                             f"{result.logits.shape[1]} class scores but the data has "
                             f"{num_classes} classes")
        reactions.append(result.reaction)
        predictions.append(result.logits.argmax(dim=1))
        losses.append(nn.functional.cross_entropy(result.logits, batch_labels,
                                                  reduction="none"))
    return _PerImage(torch.cat(reactions).cpu().numpy(), torch.cat(predictions).cpu().numpy(),
                     torch.cat(losses).cpu().numpy())


def _epoch_result(loaded: _Loaded, split: SplitData, per_image: _PerImage, num_classes: int,
                  seconds: float) -> EpochResult:
    summary = summarise_classes(per_image.reaction, per_image.prediction, per_image.loss,
                                split.identity.labels, num_classes)
    return EpochResult(
        epoch=loaded.checkpoint.epoch, image_reaction=per_image.reaction,
        prediction=per_image.prediction.astype(np.int16),
        class_reaction=summary.class_reaction, accuracy=summary.accuracy, loss=summary.loss,
        empty_maps=summary.empty_maps, model_reaction=summary.model_reaction, seconds=seconds,
        checkpoint_file=loaded.checkpoint.path.name, checkpoint_sha256=loaded.sha256)
