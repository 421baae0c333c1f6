"""The engine's compute step: one complete result per checkpoint (all its splits).

The images of every split are put on the device once. While one checkpoint computes, the next
one is taken from the plan and loaded in a background thread (read, hashed and, for ONNX,
its inference session built), so the device waits for neither the disk nor a follower's
watcher.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from analyzer.aggregate import summarise_classes
from analyzer.backends import Backend, BackendKind, LoadedCheckpoint
from analyzer.inputs import SplitData
from analyzer.plan import PendingCheckpoint
from store.errors import InputError
from store.model_files import CheckpointFile
from store.results import CheckpointResults, EpochResult

logger = logging.getLogger(__name__)


@dataclass
class PerImage:
    """A split's per-image results at one checkpoint."""

    reaction: np.ndarray
    prediction: np.ndarray
    loss: np.ndarray


class SplitsOnDevice:
    """Every split's images and labels, moved to the device once for the whole pass."""

    def __init__(self, splits: Iterable[SplitData], device: torch.device) -> None:
        self.splits = {split.name: split for split in splits}
        self.tensors = {name: (torch.as_tensor(split.images, device=device),
                               torch.as_tensor(split.identity.labels, device=device))
                        for name, split in self.splits.items()}


def compute_results(plan: Iterable[PendingCheckpoint], kind: BackendKind,
                    data: SplitsOnDevice, num_classes: int, batch_size: int,
                    preloaded: LoadedCheckpoint | None = None) -> Iterator[CheckpointResults]:
    """Yield the results of each planned checkpoint, for all its pending splits.

    ``plan`` may be a follower's endless iterator: it is advanced in the background thread.
    ``preloaded`` (the preflight's checkpoint) is used instead of loading that checkpoint
    again when it comes up first.
    """
    for loaded, pending in _prefetched(plan, kind, preloaded):
        backend = kind.backend(loaded)
        results = {}
        for name in pending.splits:
            began = time.perf_counter()
            images, labels = data.tensors[name]
            per_image = per_image_results(backend, images, labels, batch_size, num_classes,
                                          loaded.checkpoint)
            if not np.isfinite(per_image.loss).all():
                logger.warning(f"{loaded.checkpoint.path.name}: the network's outputs are not "
                               f"finite on {name} images (diverged training?): its Reaction "
                               "and loss are stored as NaN")
            results[name] = _epoch_result(loaded, data.splits[name], per_image, num_classes,
                                          time.perf_counter() - began)
        yield CheckpointResults(loaded.checkpoint.epoch, results)


def _prefetched(plan: Iterable[PendingCheckpoint], kind: BackendKind,
                preloaded: LoadedCheckpoint | None = None
                ) -> Iterator[tuple[LoadedCheckpoint, PendingCheckpoint]]:
    """Each planned checkpoint loaded; the next is taken and loaded in the background."""
    items = iter(plan)
    kept = [preloaded] if preloaded is not None else []

    def next_loaded() -> tuple[LoadedCheckpoint, PendingCheckpoint] | None:
        pending = next(items, None)
        if pending is None:
            return None
        first = kept.pop() if kept else None  # only ever the first checkpoint of the plan
        if first is not None and first.checkpoint == pending.checkpoint:
            return first, pending
        return kind.load(pending.checkpoint), pending

    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(next_loaded)
        while True:
            item = future.result()
            if item is None:
                return
            future = pool.submit(next_loaded)
            yield item


def per_image_results(backend: Backend, images: torch.Tensor, labels: torch.Tensor,
                      batch_size: int, num_classes: int, checkpoint: CheckpointFile) -> PerImage:
    """Reaction, predicted class and cross-entropy of every image, batch by batch."""
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
    return PerImage(torch.cat(reactions).cpu().numpy(), torch.cat(predictions).cpu().numpy(),
                    torch.cat(losses).cpu().numpy())


def _epoch_result(loaded: LoadedCheckpoint, split: SplitData, per_image: PerImage,
                  num_classes: int, seconds: float) -> EpochResult:
    summary = summarise_classes(per_image.reaction, per_image.prediction, per_image.loss,
                                split.identity.labels, num_classes)
    return EpochResult(
        epoch=loaded.checkpoint.epoch, image_reaction=per_image.reaction,
        prediction=per_image.prediction.astype(np.int16),
        class_reaction=summary.class_reaction, accuracy=summary.accuracy, loss=summary.loss,
        empty_maps=summary.empty_maps, model_reaction=summary.model_reaction, seconds=seconds,
        checkpoint_file=loaded.checkpoint.path.name, checkpoint_sha256=loaded.sha256)
