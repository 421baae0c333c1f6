"""A 2×2 max pool without argmax indices, on a CPU, where no gradient passes through.

PyTorch's CPU ``max_pool2d`` always records the argmax of every window for a backward, even
where none will run (every pool before the Grad-CAM layer, and after it once the gradient is
taken further on: :mod:`analyzer.pool_cut`, :mod:`analyzer.dense_cut`): on thesis Model II at
50×200 the pools were a seventh of the torch backend's time. The maximum of the rows taken two by
two, then of the columns, is the same function, bit for bit (a maximum rounds nothing; NaN
propagates as in ``max_pool2d``), written without indices: on Model II's maps 1.2–1.7×
faster in the channels-last layout, 6–8× in the default one, and the torch backend 1.11× and
1.52× (docs/BENCHMARKS.md "Max pools without indices").

Only a plain ``nn.MaxPool2d`` of kernel 2 and stride 2, no padding, no dilation, floor mode,
no indices, without hooks, is replaced, in the backend's computing copy
(:class:`analyzer.bn_fold.FoldedNetwork`); a call whose input needs a gradient, or on another
device, or with a map smaller than the window, is ``max_pool2d`` itself.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from analyzer.conv_relu import hooked


class IndexFreeMaxPool(nn.Module):
    """A 2×2, stride-2 max pool that records no argmax where no gradient passes."""

    def forward(self, images: Tensor) -> Tensor:
        needs_gradient = torch.is_grad_enabled() and images.requires_grad
        if needs_gradient or images.device.type != "cpu" or images.dim() not in (3, 4) or \
                min(images.shape[-2:]) < 2:
            return nn.functional.max_pool2d(images, 2)
        height, width = images.shape[-2] // 2 * 2, images.shape[-1] // 2 * 2
        cropped = images[..., :height, :width]  # floor mode: an odd last row or column drops
        rows = torch.maximum(cropped[..., 0::2, :], cropped[..., 1::2, :])
        return torch.maximum(rows[..., 0::2], rows[..., 1::2])


def replaceable_pools(model: nn.Module) -> list[str]:
    """The qualified names of the model's max pools that :class:`IndexFreeMaxPool` computes
    the same as."""
    return [name for name, module in model.named_modules()
            if type(module) is nn.MaxPool2d and _two_by_two(module) and not hooked(module)]


def _two_by_two(pool: nn.MaxPool2d) -> bool:
    def pair(value: int | tuple[int, ...]) -> tuple[int, ...]:
        return tuple(value) if isinstance(value, tuple | list) else (value, value)

    return (pair(pool.kernel_size) == (2, 2) and pair(pool.stride) == (2, 2)
            and pair(pool.padding) == (0, 0) and pair(pool.dilation) == (1, 1)
            and not pool.ceil_mode and not pool.return_indices)
