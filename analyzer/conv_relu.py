"""A ReLU fused into the convolution before it, on a CPU, where no gradient passes through.

oneDNN applies the ReLU as a post-op while it writes the convolution's output
(``torch.ops.mkldnn._convolution_pointwise``, the kernel ``torch.compile`` picks for the same
pattern on a CPU): the separate pass over the feature map, a fifth of the torch backend's time
on thesis Model II (docs/BENCHMARKS.md), is saved, and the values are the same. The fused op
has no backward, so a call whose input or weights need a gradient (a conv after the Grad-CAM
layer) computes ``relu(conv(x))`` as two ops.

Which pairs may be fused is decided with batch-norm folding (:mod:`analyzer.bn_fold`): a
``Conv2d`` followed, in the same plain ``nn.Sequential``, by an ``nn.ReLU`` (directly, or
after a batch norm that is folded), each used once, without hooks, the conv not the Grad-CAM
layer (the ReLU may be: its output is the fused one).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Collection

import torch
from torch import Tensor, nn


def fusion_available() -> bool:
    """Whether this torch has oneDNN's fused convolution (CPU builds with mkldnn)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._convolution_pointwise  # noqa: B018 (raises where it is missing)
    except (AttributeError, RuntimeError):
        return False
    return True


class ConvReLU(nn.Module):
    """``relu(conv(x))`` in one oneDNN call where nothing needs a gradient; two ops elsewhere.

    ``conv`` is kept as a child (its parameters are the ones loaded and refolded).
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, images: Tensor) -> Tensor:
        conv = self.conv
        needs_gradient = torch.is_grad_enabled() and (
            images.requires_grad or conv.weight.requires_grad
            or (conv.bias is not None and conv.bias.requires_grad))
        if needs_gradient or images.device.type != "cpu" or images.dtype != torch.float32:
            return torch.relu(conv(images))
        return torch.ops.mkldnn._convolution_pointwise(
            images, conv.weight, conv.bias, list(conv.padding), list(conv.stride),
            list(conv.dilation), conv.groups, "relu", [], "")


def fusable_relus(model: nn.Module, layer: str,
                  folded_norms: Collection[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """``(Sequential's name, the conv's name in it, the ReLU's)`` of every fusable pair.

    ``folded_norms``: ``(Sequential's name, norm's name)`` of the batch norms that will be
    folded, which may stand between the conv and its ReLU.
    """
    if not fusion_available():
        return []
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    fusions = []
    for name, parent in model.named_modules():
        if type(parent) is not nn.Sequential:  # a subclass may have its own forward
            continue
        children = [(child, module) for child, module in parent.named_children()
                    if (name, child) not in folded_norms]
        for (conv_name, conv), (relu_name, relu) in itertools.pairwise(children):
            conv_qualified = f"{name}.{conv_name}" if name else conv_name
            if conv_qualified != layer and _fusable(conv, relu) and \
                    uses[id(conv)] == 1 and uses[id(relu)] == 1:
                fusions.append((name, conv_name, relu_name))
    return fusions


def _fusable(conv: nn.Module, relu: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and type(relu) is nn.ReLU
            and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)
            and conv.weight.device.type == "cpu" and conv.weight.dtype == torch.float32
            and not any(hooked(m) for m in (conv, relu)))


def hooked(module: nn.Module) -> bool:
    """Whether any hook is registered on ``module`` (its calls may then do more)."""
    return bool(module._forward_hooks or module._forward_pre_hooks
                or module._backward_hooks or module._backward_pre_hooks)
