"""Per-class summaries of per-image results (METHOD.md §2: class and model Reaction). Pure numpy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClassSummary:
    """Per-class means of one split at one epoch, and the model Reaction."""

    class_reaction: np.ndarray
    accuracy: np.ndarray
    loss: np.ndarray
    empty_maps: np.ndarray
    model_reaction: float


def summarise_classes(image_reaction: np.ndarray, prediction: np.ndarray, loss: np.ndarray,
                      labels: np.ndarray, num_classes: int) -> ClassSummary:
    """Class Reaction, accuracy, loss and empty-map count; model Reaction (thesis fig. 5.9).

    class Reaction = mean of Reaction(x) over the class's images; model Reaction = mean of
    the class Reactions over the classes that have images. An empty map has Reaction 0
    exactly (and a non-empty one a positive Reaction), so the empty maps are the zeros.
    Means are taken in float64; a class without images gets NaN (and 0 empty maps).
    """
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)

    def class_mean(values: np.ndarray) -> np.ndarray:
        sums = np.bincount(labels, weights=np.asarray(values, np.float64), minlength=num_classes)
        with np.errstate(invalid="ignore", divide="ignore"):
            return sums / counts

    class_reaction = class_mean(image_reaction)
    empty = np.bincount(labels, weights=(np.asarray(image_reaction) == 0),
                        minlength=num_classes).astype(np.int32)
    present = counts > 0
    model_reaction = float(class_reaction[present].mean()) if present.any() else float("nan")
    return ClassSummary(class_reaction, class_mean(prediction == labels), class_mean(loss),
                        empty, model_reaction)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each image's cross-entropy loss, ``logsumexp(logits) - logits[label]``, taken in
    float64 (shifted by the row's maximum, so large logits do not overflow) and returned as
    float32; a row with a non-finite logit gives NaN or inf, as torch's does."""
    values = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    top = values.max(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", over="ignore"):
        log_total = np.log(np.exp(values - top).sum(axis=1)) + top[:, 0]
    return (log_total - values[np.arange(len(values)), labels]).astype(np.float32)
