"""The engine's compute step: one complete result per checkpoint (all its splits).

The images of every split are put on the device once. While one checkpoint computes, the next
one is taken from the plan and loaded in a background thread (read, hashed and, for ONNX,
its inference session built), so the device waits for neither the disk nor a follower's
watcher.

A split's values stay on the device until the split is done, then come to the host in one
copy; the predicted class and the cross-entropy are taken there, in NumPy. So the engine
computes on whatever the backend kind takes (torch tensors, or NumPy arrays for ONNX Runtime
on the CPU, where a pass needs no torch at all).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from analyzer.aggregate import cross_entropy, summarise_classes
from analyzer.backends import Backend, BackendKind, LoadedCheckpoint
from analyzer.inputs import SplitData
from analyzer.plan import PendingCheckpoint
from store.checkpoint_files import CheckpointFile
from store.errors import InputError
from store.results import CheckpointResults, EpochResult

if TYPE_CHECKING:
    from analyzer.backends import Array

logger = logging.getLogger(__name__)


@dataclass
class PerImage:
    """A split's per-image results at one checkpoint."""

    reaction: np.ndarray
    prediction: np.ndarray
    loss: np.ndarray


class SplitsOnDevice:
    """Every split's images and labels, put once for the whole pass where ``kind``'s backends
    take them (:meth:`BackendKind.to_device`)."""

    def __init__(self, splits: Iterable[SplitData], kind: BackendKind) -> None:
        self.splits = {split.name: split for split in splits}
        self.tensors = {name: (kind.to_device(split.images),
                               kind.to_device(split.identity.labels))
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


def per_image_results(backend: Backend, images: Array, labels: Array, batch_size: int,
                      num_classes: int, checkpoint: CheckpointFile) -> PerImage:
    """Reaction, predicted class and cross-entropy of every image, batch by batch; the
    values come to the host once, at the end."""
    reactions, logits = [], []
    for start in range(0, len(images), batch_size):
        result = backend.compute(images[start:start + batch_size],
                                 labels[start:start + batch_size])
        if result.logits.shape[1] != num_classes:
            raise InputError(f"{checkpoint.path.name}: the model gives "
                             f"{result.logits.shape[1]} class scores but the data has "
                             f"{num_classes} classes")
        reactions.append(result.reaction)
        logits.append(result.logits)
    host_logits = _on_host(logits)
    return PerImage(_on_host(reactions), host_logits.argmax(axis=1),
                    cross_entropy(host_logits, _on_host([labels])))


def _on_host(parts: list[Array]) -> np.ndarray:
    """Batches joined on their device and copied to the host in one go (one wait for a
    GPU, not one per batch)."""
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    import torch  # the parts are torch tensors, so torch is loaded already

    return torch.cat(parts).cpu().numpy()


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
