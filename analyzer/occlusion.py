"""Occlusion sensitivity (Zeiler & Fergus, seed 003 §4.2) as pure tensor functions.

A square of ``patch`` × ``patch`` pixels, every channel set to ``fill``, is slid over the
image with ``stride``; its top-left pixel takes the positions

    rows = 0, s, 2s, …, ≤ H − patch        cols = 0, s, 2s, …, ≤ W − patch

(the square always lies wholly inside the image, as captum's ``Occlusion`` slides it). At
each position (r, c) the network sees the occluded image x^(r,c) and the map records the
target class t's logit z_t(x^(r,c)) and probability p_t(x^(r,c)) = softmax(z(x^(r,c)))_t.
The occluded copies of many (image, position) pairs go through one forward together; which
pairs share a batch changes no value, since in eval mode every image's output depends on that
image alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Logits = Callable[[Tensor], Tensor]  # images [B, C, H, W] -> logits [B, classes]


@dataclass(frozen=True)
class OcclusionMaps:
    """The maps of a batch of images (tensors on the images' device).

    Attributes:
        probability: ``[image, row, col]`` p_t with the patch at each position.
        logit: ``[image, row, col]`` z_t with the patch at each position.
        prediction: ``[image, row, col]`` argmax_k z_k with the patch there (int64).
        unoccluded_probability: ``[image]`` p_t(x), no patch.
        unoccluded_logit: ``[image]`` z_t(x).
    """

    probability: Tensor
    logit: Tensor
    prediction: Tensor
    unoccluded_probability: Tensor
    unoccluded_logit: Tensor

    @property
    def sensitivity(self) -> Tensor:
        """``[image]`` p_t(x) − min_(r,c) p_t(x^(r,c)): how far the most harmful patch
        position lowers the target's probability (negative when no position lowers it)."""
        return self.unoccluded_probability - self.probability.flatten(1).amin(dim=1)


def patch_positions(size: int, patch: int, stride: int) -> list[int]:
    """The top-left coordinates 0, stride, 2·stride, … of a patch inside ``size`` pixels."""
    if not 1 <= patch <= size:
        raise ValueError(f"patch {patch} does not fit in {size} pixels")
    if stride < 1:
        raise ValueError(f"stride must be at least 1, got {stride}")
    return list(range(0, size - patch + 1, stride))


def patch_masks(height: int, width: int, rows: Tensor, cols: Tensor, patch: int) -> Tensor:
    """Boolean masks ``[P, H, W]``: mask p is True on the square whose top-left pixel is
    ``(rows[p], cols[p])``."""
    y = torch.arange(height, device=rows.device)
    x = torch.arange(width, device=cols.device)
    inside_rows = (y >= rows[:, None]) & (y < rows[:, None] + patch)
    inside_cols = (x >= cols[:, None]) & (x < cols[:, None] + patch)
    return inside_rows[:, :, None] & inside_cols[:, None, :]


def occlusion_maps(logits: Logits, images: Tensor, targets: Tensor, patch: int, stride: int,
                   fill: float, batch_size: int = 256) -> OcclusionMaps:
    """Occlusion maps of ``images`` ``[N, C, H, W]`` for their ``targets`` ``[N]``.

    The N·R·C occluded copies are made ``batch_size`` at a time, on the images' device, and
    each batch costs one call of ``logits`` (one forward); the unoccluded images cost one
    more. Nothing is copied to the host.

    Args:
        logits: the network, images to logits (a backend's :meth:`logits`).
        images: the images, pixels as the network takes them.
        targets: the class t of each image whose probability is mapped.
        patch, stride: the square's side and step, in pixels.
        fill: the value of every pixel and channel under the square.
        batch_size: occluded copies per forward.
    """
    count, _, height, width = images.shape
    rows = torch.tensor(patch_positions(height, patch, stride), device=images.device)
    cols = torch.tensor(patch_positions(width, patch, stride), device=images.device)
    position_rows = rows.repeat_interleave(len(cols))
    position_cols = cols.repeat(len(rows))
    positions = len(position_rows)
    fill_value = torch.tensor(fill, dtype=images.dtype, device=images.device)
    chosen, normalisers, predictions = [], [], []
    for start in range(0, count * positions, batch_size):
        pair = torch.arange(start, min(start + batch_size, count * positions),
                            device=images.device)
        image, position = pair // positions, pair % positions
        masks = patch_masks(height, width, position_rows[position], position_cols[position],
                            patch)
        batch_logits = logits(torch.where(masks[:, None], fill_value, images[image]))
        chosen.append(batch_logits.gather(1, targets[image][:, None])[:, 0])
        normalisers.append(torch.logsumexp(batch_logits, dim=1))  # p_t = exp(z_t - lse(z))
        predictions.append(batch_logits.argmax(dim=1))
    shape = (count, len(rows), len(cols))
    logit = torch.cat(chosen).reshape(shape)
    plain = logits(images)
    plain_logit = plain.gather(1, targets[:, None])[:, 0]
    return OcclusionMaps(
        probability=torch.exp(logit - torch.cat(normalisers).reshape(shape)), logit=logit,
        prediction=torch.cat(predictions).reshape(shape),
        unoccluded_probability=torch.exp(plain_logit - torch.logsumexp(plain, dim=1)),
        unoccluded_logit=plain_logit)
