"""Feature-map visualisation of Zeiler & Fergus (seed 003 §2.1): pure tensor functions.

* :func:`update_strongest`: the strongest activation of each chosen channel over a stream of
  batches (image, position and value; the first on ties).
* :func:`project_to_pixels`: that activation projected into pixel space by a deconvnet.
  The deconvnet's three steps are the backward pass of the network with one change: unpooling
  with the forward pass's switches is max-pooling's own backward, filtering with the
  transposed (flipped) filters is a convolution's own backward, and *rectification* applies
  ReLU to the signal coming down, ignoring where the forward pass was negative. So the
  projection is the gradient of the chosen activation with every ReLU's backward replaced by
  ``relu(grad)``, seeded with the activation's value (all other activations of the layer set
  to zero). ReLUs are intercepted wherever they are called (``nn.ReLU``, ``F.relu``,
  ``torch.relu``, ``Tensor.relu``, ``aten.relu`` in a ``torch.export`` program), so this
  works for any network the analyzer loads.
  Guided backpropagation (Springenberg et al.), which also keeps the forward mask, is the
  option ``method="guided"``.
* :func:`receptive_fields`: the input pixels a feature-map position sees, from the same
  network with every convolution's weights set to their mean (positive), batch norm and ReLUs
  off and max-pooling made average pooling, so no path cancels: the support of the gradient
  is the receptive field (clipped at the image border).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from analyzer.torch_backend import _eval_mode, _frozen_parameters, check_feature_map
from store.errors import InputError

_RELU_NAMES = {"relu", "relu_"}


def _op_name(func) -> str:
    """``relu`` for ``F.relu``, ``torch.relu``, ``Tensor.relu`` and ``aten.relu.default``
    (what the graph of a ``torch.export`` program calls)."""
    return getattr(func, "__name__", "").split(".")[0]


@dataclass(frozen=True)
class Strongest:
    """The strongest activation of each chosen channel so far.

    Attributes:
        value: ``[K]`` the activation (−inf before any image).
        image: ``[K]`` its image's index in the stream (−1 before any image).
        row, col: ``[K]`` its position in the feature map.
    """

    value: Tensor
    image: Tensor
    row: Tensor
    col: Tensor

    @classmethod
    def empty(cls, channels: int, device: torch.device | str = "cpu") -> Strongest:
        """Nothing seen yet."""
        none = torch.full((channels,), -1, dtype=torch.int64, device=device)
        return cls(torch.full((channels,), -torch.inf, device=device), none, none.clone(),
                   none.clone())


def update_strongest(best: Strongest, activation: Tensor, channels: Tensor,
                     offset: int) -> Strongest:
    """Fold a batch into ``best``: max over images and positions, per channel.

    Args:
        best: the strongest so far.
        activation: ``[B, K_all, H, W]`` the layer's output for images ``offset …``.
        channels: ``[K]`` the channels followed.
        offset: the stream index of the batch's first image.

    Returns:
        The new strongest; on ties the earlier image, then the earlier position in row-major
        order, wins (a later batch must be strictly stronger).
    """
    chosen = activation[:, channels].flatten(2)  # [B, K, H·W]
    per_image, position = chosen.max(dim=2)
    value, image = per_image.max(dim=0)
    where = position.gather(0, image[None])[0]
    better = value > best.value
    width = activation.shape[-1]
    return Strongest(torch.where(better, value, best.value),
                     torch.where(better, image + offset, best.image),
                     torch.where(better, where // width, best.row),
                     torch.where(better, where % width, best.col))


class _LayerReached(Exception):
    """Raised by the capture hook: the rest of the network is not needed."""


class _Capture:
    """Forward hook keeping the layer's output, then stopping the forward pass."""

    def __init__(self, layer: str) -> None:
        self.layer = layer
        self.output: Tensor | None = None

    def __call__(self, module: nn.Module, inputs: tuple, output: object) -> None:
        check_feature_map(self.layer, output)
        self.output = output
        raise _LayerReached


def layer_output(model: nn.Module, module: nn.Module, layer: str, images: Tensor) -> Tensor:
    """The output of ``module`` for ``images``; the network after it is not run."""
    capture = _Capture(layer)
    handle = module.register_forward_hook(capture)
    try:
        model(images)
    except _LayerReached:
        pass
    finally:
        handle.remove()
    if capture.output is None:
        raise InputError(f"layer {layer!r} was not used by the forward pass")
    return capture.output


def strongest_activations(model: nn.Module, module: nn.Module, layer: str, images: Tensor,
                          channels: Tensor, batch_size: int) -> Strongest:
    """The strongest activation of each channel over all ``images`` (eval mode, no grad)."""
    best = Strongest.empty(len(channels), images.device)
    with _eval_mode(model), torch.no_grad():
        for start in range(0, len(images), batch_size):
            activation = layer_output(model, module, layer, images[start:start + batch_size])
            if int(channels.max()) >= activation.shape[1]:
                raise InputError(f"layer {layer!r} has {activation.shape[1]} channels: channel "
                                 f"{int(channels.max())} does not exist")
            best = update_strongest(best, activation.float(), channels, start)
    return best


PROJECTIONS = ("deconvnet", "guided")


class _DeconvReLU(torch.autograd.Function):
    """ReLU forward; the deconvnet's rectification backward: ``relu(grad)``."""

    @staticmethod
    def forward(ctx, inputs: Tensor) -> Tensor:
        return inputs.clamp(min=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.clamp(min=0)


class _GuidedReLU(torch.autograd.Function):
    """ReLU forward; guided backpropagation's backward: ``relu(grad) · [input > 0]``."""

    @staticmethod
    def forward(ctx, inputs: Tensor) -> Tensor:
        ctx.save_for_backward(inputs)
        return inputs.clamp(min=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (inputs,) = ctx.saved_tensors
        return grad.clamp(min=0) * (inputs > 0)


class _RectifyingMode(TorchFunctionMode):
    """Every ReLU call, functional or module, gets the backward rule of ``method``; counts
    them."""

    def __init__(self, method: str) -> None:
        super().__init__()
        if method not in PROJECTIONS:
            raise InputError(f"projection must be one of {', '.join(PROJECTIONS)}, got "
                             f"{method!r}")
        self.rule = _DeconvReLU if method == "deconvnet" else _GuidedReLU
        self.rectifiers = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if _op_name(func) in _RELU_NAMES:
            self.rectifiers += 1
            return self.rule.apply(args[0])
        return func(*args, **(kwargs or {}))


@dataclass(frozen=True)
class Projection:
    """Projections ``[K, C, H, W]`` into pixel space and how many ReLU calls were rectified."""

    pixels: Tensor
    rectifiers: int


def project_to_pixels(model: nn.Module, module: nn.Module, layer: str, images: Tensor,
                      channels: Tensor, rows: Tensor, cols: Tensor,
                      method: str = "deconvnet") -> Projection:
    """Project one activation per image into pixel space (seed 003 §2.1).

    Row r projects activation ``A[r, channels[r], rows[r], cols[r]]`` of image ``images[r]``:
    the layer's map with every other activation set to zero is passed down through
    unpooling (the forward switches), rectification and the transposed filters, to the
    input. Rectification is the deconvnet's ``relu(signal)`` (``method="deconvnet"``, the
    paper's), or guided backpropagation's ``relu(signal) · [forward input > 0]``
    (``"guided"``). Rows are independent (eval mode), so one backward serves all.

    Returns:
        ``[K, C, H, W]`` float32, the activation's value times the unit response.
    """
    pixels = images.detach().clone().requires_grad_(True)
    mode = _RectifyingMode(method)
    with _eval_mode(model), _frozen_parameters(model), torch.enable_grad(), mode:
        activation = layer_output(model, module, layer, pixels)
    index = torch.arange(len(images), device=images.device)
    seed = torch.zeros_like(activation)
    seed[index, channels, rows, cols] = activation[index, channels, rows, cols].detach()
    (gradient,) = torch.autograd.grad(activation, pixels, grad_outputs=seed, allow_unused=True)
    if gradient is None:
        gradient = torch.zeros_like(pixels)
    return Projection(gradient.detach().float(), mode.rectifiers)


class _ReceptiveFieldMode(TorchFunctionMode):
    """Convolutions with positive mean weights and no bias, batch norm and ReLUs off,
    max-pool as average pool: every path from a position to the input is positive."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = _op_name(func)
        if name == "conv2d":
            inputs, weight, *rest = args
            kwargs.pop("bias", None)
            ones = torch.full_like(weight, 1.0 / weight[0].numel())
            return F.conv2d(inputs, ones, None, *rest[1:], **kwargs)
        if name == "batch_norm" or name in _RELU_NAMES:  # a ReLU could cut a path off
            return args[0]
        if name in ("max_pool2d", "_max_pool2d"):
            return _average_instead(func, args, kwargs)
        return func(*args, **kwargs)


def _average_instead(func, args: tuple, kwargs: dict) -> Tensor:
    """``max_pool2d(input, kernel, stride, padding, dilation, ceil_mode)`` as an average pool
    over the same windows (dilated or index-returning pools are left as they are)."""
    names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode",
             "return_indices")
    bound = {**dict(zip(names, args, strict=False)), **kwargs}
    if bound.get("return_indices") or bound.get("dilation", 1) not in (1, (1, 1), [1, 1]):
        return func(*args, **kwargs)
    return F.avg_pool2d(bound["input"], bound["kernel_size"], bound.get("stride") or None,
                        bound.get("padding", 0), bound.get("ceil_mode", False),
                        count_include_pad=True)  # aten's stride [] means the kernel size


def receptive_fields(model: nn.Module, module: nn.Module, layer: str,
                     image_shape: tuple[int, int, int], channels: Tensor, rows: Tensor,
                     cols: Tensor) -> Tensor:
    """The input box each position sees: ``[K, 4]`` = row start, row stop, column start,
    column stop (half-open pixel ranges, clipped at the border).

    Computed as the support of the gradient of ``A[channels[r], rows[r], cols[r]]`` for an
    all-ones image through the network made positive (:class:`_ReceptiveFieldMode`); it
    depends on the architecture only, not on the weights.
    """
    device = rows.device
    ones = torch.ones((len(rows), *image_shape), device=device, requires_grad=True)
    with _eval_mode(model), _frozen_parameters(model), torch.enable_grad(), \
            _ReceptiveFieldMode():
        activation = layer_output(model, module, layer, ones)
    index = torch.arange(len(rows), device=device)
    seed = torch.zeros_like(activation)
    seed[index, channels, rows, cols] = 1.0
    (gradient,) = torch.autograd.grad(activation, ones, grad_outputs=seed, allow_unused=True)
    height, width = image_shape[1:]
    if gradient is None:
        return torch.tensor([[0, height, 0, width]] * len(rows), dtype=torch.int64)
    support = gradient.abs().sum(dim=1) > 0  # [K, H, W]
    return torch.stack([_span(support.any(dim=2), height), _span(support.any(dim=1), width)],
                       dim=1).flatten(1).cpu()


def _span(mask: Tensor, size: int) -> Tensor:
    """``[K, 2]`` first and one-past-last True of each row of ``mask`` (all: none True)."""
    positions = torch.arange(size, device=mask.device).expand_as(mask)
    start = torch.where(mask, positions, size).min(dim=1).values
    stop = torch.where(mask, positions + 1, 0).max(dim=1).values
    empty = ~mask.any(dim=1)
    return torch.stack([torch.where(empty, 0, start), torch.where(empty, size, stop)], dim=1)

