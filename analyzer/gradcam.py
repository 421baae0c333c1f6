"""Grad-CAM and the Reaction value as pure tensor functions (docs/METHOD.md §2; thesis eq. 3.1–3.3).

No I/O, no device decisions: every function works on whatever device its inputs are on.
"""

from __future__ import annotations

import torch
from torch import Tensor

from store.spec import SCORES


def target_scores(logits: Tensor, targets: Tensor, score: str = "logit") -> Tensor:
    """The score y^c of each image's target class c (thesis eq. 3.1).

    Args:
        logits: ``[B, classes]`` pre-softmax outputs.
        targets: ``[B]`` class indices.
        score: ``"logit"`` (y^c itself, the default) or ``"softmax"`` (its probability,
            kept to reproduce seed 001's comparison: the gradient vanishes when confident).
    """
    if score == "softmax":
        logits = torch.softmax(logits, dim=1)
    elif score != "logit":
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    return logits.gather(1, targets.view(-1, 1)).squeeze(1)


def channel_weights(gradients: Tensor) -> Tensor:
    """alpha_k = (1 / (H·W)) · Σ_ij ∂y^c/∂A^k_ij: ``[B, K, H, W]`` → ``[B, K]``."""
    return gradients.mean(dim=(2, 3))


def channel_weights_after_pool(pooled_gradients: Tensor, height: int, width: int) -> Tensor:
    """alpha_k from ∂y^c/∂P^k at the output P of a max pool that alone takes A
    (:mod:`analyzer.pool_cut`): each pooled entry's gradient goes to one entry of A, so
    Σ_ij ∂y^c/∂A^k_ij = Σ_pq ∂y^c/∂P^k_pq. ``[B, K, H', W']`` → ``[B, K]``, over A's H·W."""
    return pooled_gradients.sum(dim=(2, 3)) / (height * width)


def channel_weights_from_dense(dense_gradients: Tensor, weight: Tensor, channels: int,
                               height: int, width: int) -> Tensor:
    """alpha_k from ∂y^c/∂z at the output z of the dense layer (weight ``[out, K·S]``) that
    alone takes the map T, flattened (:mod:`analyzer.dense_cut`): Σ_s ∂y^c/∂T^k_s =
    Σ_o ∂y^c/∂z_o · Σ_s W[o, k·S + s]. ``[B, out]`` → ``[B, K]``, over A's H·W."""
    channel_sums = weight.reshape(weight.shape[0], channels, -1).sum(dim=2)
    return dense_gradients @ channel_sums / (height * width)


def grad_cam_map(activations: Tensor, gradients: Tensor) -> Tensor:
    """L = ReLU(Σ_k alpha_k · A^k) at the layer's own resolution: ``[B, H, W]``."""
    return weighted_map(activations, channel_weights(gradients))


def weighted_map(activations: Tensor, weights: Tensor) -> Tensor:
    """L = ReLU(Σ_k alpha_k · A^k) for channel weights ``[B, K]``: ``[B, H, W]``."""
    return torch.relu(torch.einsum("bk,bkhw->bhw", weights, activations))


def reaction_from_map(cam: Tensor) -> tuple[Tensor, Tensor]:
    """Reaction = Σ_ij L_ij / pN with pN = #{L_ij > 0} (thesis eq. 3.3).

    Returns:
        ``(reaction [B], empty [B])``; an empty map (pN = 0) has Reaction 0.
    """
    flat = cam.flatten(1)
    positive = (flat > 0).sum(dim=1)
    empty = positive == 0
    reaction = flat.sum(dim=1) / positive.clamp(min=1).to(flat.dtype)
    return reaction, empty
