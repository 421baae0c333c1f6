"""Per-class summaries and the cross-entropy against values worked out by hand (and, for the
cross-entropy, torch's own in float64)."""

from __future__ import annotations

import math

import numpy as np
import torch

from analyzer.aggregate import cross_entropy, summarise_classes


def test_class_and_model_reaction_accuracy_loss_and_empty_maps_by_hand():
    # class 0: images 0, 2 (Reaction 0.2, 0.0 → mean 0.1, one empty map; predictions 0, 1)
    # class 1: images 1, 3, 4 (Reaction 0.3, 0.6, 0.9 → 0.6; predictions 1, 1, 0)
    # class 2: no image → NaN, excluded from the model Reaction = (0.1 + 0.6) / 2
    reaction = np.array([0.2, 0.3, 0.0, 0.6, 0.9], dtype=np.float32)
    prediction = np.array([0, 1, 1, 1, 0])
    loss = np.array([1.0, 2.0, 3.0, 4.0, 6.0])
    labels = np.array([0, 1, 0, 1, 1])
    summary = summarise_classes(reaction, prediction, loss, labels, num_classes=3)
    np.testing.assert_allclose(summary.class_reaction[:2], [0.1, 0.6], rtol=1e-7)
    assert np.isnan(summary.class_reaction[2])
    np.testing.assert_allclose(summary.accuracy[:2], [0.5, 2 / 3])
    np.testing.assert_allclose(summary.loss[:2], [2.0, 4.0])
    assert summary.empty_maps.tolist() == [1, 0, 0]
    assert abs(summary.model_reaction - 0.35) < 1e-7


def test_tiny_reactions_keep_their_magnitude():
    reaction = np.array([1.5e-7, 2.5e-7], dtype=np.float32)
    summary = summarise_classes(reaction, np.array([0, 0]), np.zeros(2), np.array([0, 0]), 1)
    assert abs(summary.class_reaction[0] - 2e-7) < 1e-13
    assert summary.empty_maps.tolist() == [0]


def test_cross_entropy_by_hand_without_overflow_and_as_torch_computes_it():
    # two equal logits: log 2; a logit of 1000 against 0: 1000 for the other class, e^-1000
    # (0 in float32) for its own; the third row is log(1 + e + e^2) - 2
    logits = np.array([[0.0, 0.0, -np.inf], [1000.0, 0.0, 0.0], [0.0, 1.0, 2.0]],
                      dtype=np.float32)
    loss = cross_entropy(logits, np.array([0, 1, 2]))
    assert loss.dtype == np.float32
    np.testing.assert_allclose(loss, [math.log(2), 1000.0,
                                      math.log(1 + math.e + math.e ** 2) - 2], rtol=1e-7)
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 5, (64, 13)).astype(np.float32)
    labels = rng.integers(0, 13, 64)
    want = torch.nn.functional.cross_entropy(torch.from_numpy(logits).double(),
                                             torch.from_numpy(labels), reduction="none")
    np.testing.assert_allclose(cross_entropy(logits, labels), want.numpy(), rtol=1e-7)


def test_cross_entropy_of_a_row_with_nan_is_nan():
    loss = cross_entropy(np.array([[np.nan, 0.0], [1.0, 0.0]], dtype=np.float32),
                         np.array([0, 0]))
    assert np.isnan(loss[0]) and np.isfinite(loss[1])
