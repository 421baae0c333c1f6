"""Eval-mode batch norm folded into the convolution before it, in a computing copy.

In eval mode ``BatchNorm2d`` is a per-channel affine map ``y = (x - mean) * s + beta`` with
``s = gamma / sqrt(var + eps)``; after a ``Conv2d`` it is the same as that conv with its weight
scaled by ``s`` per output channel and its bias ``(b - mean) * s + beta``. One pass over the
activation (the normalisation) is saved per pair.

Only a pattern whose meaning cannot change is folded: a ``Conv2d`` and a ``BatchNorm2d`` that
are consecutive children of a plain ``nn.Sequential``, each used once in the model, without
hooks, with running statistics, neither of them the Grad-CAM layer (whose output must stay the
tensor it names), and the conv called, in a probe forward pass, only from inside that
Sequential's own forward (so its output goes to the norm and nowhere else: a model that calls
``features[0]`` itself could use the conv's output twice). The user's
model is not touched: the copy shares every other parameter and buffer with it (so a
checkpoint loaded into the model is in the copy too) and has new convs, refolded per
checkpoint by :meth:`FoldedNetwork.refold`.

The same copy fuses each ReLU that follows a conv (folded or not) into it, on a CPU
(:mod:`analyzer.conv_relu`), with the same conditions and the same probe, and computes each
plain 2×2 max pool without argmax indices where no gradient passes (:mod:`analyzer.max_pool`:
the same function, wherever it is called from).
"""

from __future__ import annotations

import copy
import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from analyzer.conv_relu import ConvReLU, fusable_relus, hooked
from analyzer.max_pool import IndexFreeMaxPool, replaceable_pools


@dataclass(frozen=True)
class _Fold:
    conv: nn.Conv2d         # in the user's model
    norm: nn.BatchNorm2d    # in the user's model
    folded: nn.Conv2d       # in the computing copy


@dataclass(frozen=True)
class FoldedNetwork:
    """A copy of a model with its foldable conv → batch-norm pairs folded, its fusable
    conv → ReLU pairs fused and its 2×2 max pools computed without indices."""

    model: nn.Module
    module: nn.Module       # the Grad-CAM layer in ``model``
    folds: tuple[_Fold, ...]
    fused_relus: int = 0
    index_free_pools: int = 0

    @classmethod
    def build(cls, model: nn.Module, layer: str, probe: Tensor) -> FoldedNetwork | None:
        """The folded copy of ``model``, with ``layer`` kept as it is (or, a ReLU, fused into
        its conv); None if nothing folds, fuses or pools without indices.

        ``probe``: a batch of images for one eval-mode forward of ``model`` (no autograd)
        that sees from where each conv is called.
        """
        pairs = foldable_pairs(model, layer)
        fusions = fusable_relus(model, layer, {(parent, norm) for parent, _, norm in pairs})
        kept = called_from_their_sequence(model, pairs + fusions, probe)
        pairs = [pair for pair in pairs if pair in kept]
        fusions = [fusion for fusion in fusions if fusion in kept]
        pools = replaceable_pools(model)
        if not pairs and not fusions and not pools:
            return None
        shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
        network = copy.deepcopy(model, memo=shared)
        copies = dict(network.named_modules())
        originals = dict(model.named_modules())
        folds = []
        for parent, conv_name, norm_name in pairs:
            conv = originals[parent].get_submodule(conv_name)
            norm = originals[parent].get_submodule(norm_name)
            folded = _conv_with_bias(conv)
            setattr(copies[parent], conv_name, folded)  # same place in the Sequential's order
            setattr(copies[parent], norm_name, nn.Identity())  # names stay: layer found by name
            folds.append(_Fold(conv, norm, folded))
        for parent, conv_name, relu_name in fusions:
            fused = ConvReLU(copies[parent].get_submodule(conv_name))  # folded, or a copy
            setattr(copies[parent], conv_name, fused)
            setattr(copies[parent], relu_name, nn.Identity())  # the layer may be this one
        for name in pools:
            parent, _, pool_name = name.rpartition(".")
            setattr(copies[parent], pool_name, IndexFreeMaxPool())
        result = cls(network, network.get_submodule(layer), tuple(folds), len(fusions),
                     len(pools))
        result.refold()
        return result

    @torch.no_grad()
    def refold(self) -> None:
        """Recompute every folded conv from the model's current weights (in float64)."""
        for fold in self.folds:
            norm, weight = fold.norm, fold.conv.weight
            scale = torch.rsqrt(norm.running_var.double() + norm.eps)
            shift = -norm.running_mean.double()
            if fold.conv.bias is not None:
                shift = shift + fold.conv.bias.double()
            if norm.affine:
                scale = scale * norm.weight.double()
            shift = shift * scale + (norm.bias.double() if norm.affine else 0.0)
            fold.folded.weight.copy_(weight.double() * scale.view(-1, 1, 1, 1))
            fold.folded.bias.copy_(shift)

    def set_memory_format(self, memory_format: torch.memory_format) -> None:
        """Put the copy's own convs (the shared tensors follow the model) in ``memory_format``."""
        for fold in self.folds:
            fold.folded.to(memory_format=memory_format)


def foldable_pairs(model: nn.Module, layer: str) -> list[tuple[str, str, str]]:
    """``(Sequential's name, the conv's name in it, the norm's)`` of every foldable pair."""
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    pairs = []
    for name, parent in model.named_modules():
        if type(parent) is not nn.Sequential:  # a subclass may have its own forward
            continue
        children = list(parent.named_children())
        for (conv_name, conv), (norm_name, norm) in itertools.pairwise(children):
            qualified = {f"{name}.{child}" if name else child for child in (conv_name, norm_name)}
            if layer not in qualified and _foldable(conv, norm) and \
                    uses[id(conv)] == 1 and uses[id(norm)] == 1:
                pairs.append((name, conv_name, norm_name))
    return pairs


def called_from_their_sequence(model: nn.Module, pairs: list[tuple[str, str, str]],
                               probe: Tensor) -> list[tuple[str, str, str]]:
    """The pairs whose conv runs, in a forward pass of ``probe``, only inside its Sequential's
    forward; the model's train/eval mode is restored."""
    modules = dict(model.named_modules())
    inside: Counter[str] = Counter()
    outside: set[tuple[str, str, str]] = set()
    handles = []

    def entering(parent: str) -> Callable[..., None]:
        return lambda *_: inside.update([parent])

    def leaving(parent: str) -> Callable[..., None]:
        return lambda *_: inside.subtract([parent])

    def calling(pair: tuple[str, str, str]) -> Callable[..., None]:
        return lambda *_: None if inside[pair[0]] > 0 else outside.add(pair)

    for parent in {pair[0] for pair in pairs}:
        handles += [modules[parent].register_forward_pre_hook(entering(parent)),
                    modules[parent].register_forward_hook(leaving(parent))]
    for pair in pairs:
        handles.append(modules[pair[0]].get_submodule(pair[1]).register_forward_pre_hook(
            calling(pair)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(probe)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return [pair for pair in pairs if pair not in outside]


def _foldable(conv: nn.Module, norm: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and type(norm) is nn.BatchNorm2d
            and norm.track_running_stats and norm.running_mean is not None
            and norm.running_var is not None and norm.num_features == conv.out_channels
            and not any(hooked(m) for m in (conv, norm)))


def _conv_with_bias(conv: nn.Conv2d) -> nn.Conv2d:
    """A conv of ``conv``'s shape and settings with a bias, its parameters frozen."""
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                       conv.padding, conv.dilation, conv.groups, True, conv.padding_mode,
                       device=conv.weight.device, dtype=conv.weight.dtype)
    folded.weight.data = torch.empty_like(conv.weight)  # conv's memory layout
    folded.requires_grad_(False)
    return folded
