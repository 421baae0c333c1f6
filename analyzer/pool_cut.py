"""The Grad-CAM gradient taken after the max pool that alone follows the layer.

Of ∂y^c/∂A Grad-CAM needs only its sum over the map, per channel (alpha_k, docs/METHOD.md
§2). A max pool sends each of its outputs' gradients to exactly one entry of its input, the
window's maximum (whatever the kernel, stride, padding, dilation or ceil mode), so when the
layer's output A goes to a max pool and nowhere else, Σ_ij ∂y^c/∂A^k_ij = Σ_pq ∂y^c/∂P^k_pq
over the pool's output P. The backward can then stop at P: it skips the pool's scatter, and
the forward records no argmax indices (on ONNX Runtime, a fifth of thesis Model II's time,
docs/BENCHMARKS.md).

Which pool, if any, is read off the autograd graph of a probe forward (:func:`sole_max_pool`):
the tensor the layer passes on has exactly one consumer on the way to the scores, and it is
the call of an ``nn.MaxPool2d`` module (no subclass, no hooks) that runs once per forward, on
that very tensor. The backend then compares a first batch computed both ways
(``TorchBackend._choose_pool_cut``).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from torch import Tensor, nn

from analyzer.conv_relu import hooked


@dataclass(frozen=True)
class PoolCall:
    """One call of a max pool module in a probe forward: its input, its output's grad_fn."""

    name: str
    input: object
    grad_fn: object


@contextlib.contextmanager
def watching_max_pools(network: nn.Module) -> Iterator[list[PoolCall]]:
    """Record every call of the network's plain, unhooked ``nn.MaxPool2d`` modules."""
    calls: list[PoolCall] = []

    def watch(name: str):
        def record(module: nn.Module, inputs: tuple, output: object) -> None:
            calls.append(PoolCall(name, inputs[0] if inputs else None,
                                  getattr(output, "grad_fn", None)))
        return record

    pools = [(name, module) for name, module in network.named_modules()
             if type(module) is nn.MaxPool2d and not hooked(module)]
    handles = [module.register_forward_hook(watch(name)) for name, module in pools]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def sole_max_pool(calls: list[PoolCall], passed_on: Tensor, scores: Tensor) -> str | None:
    """The name of the max pool that is the only consumer of ``passed_on`` (the layer's
    output, as the forward used it) on the autograd graph that leads to ``scores``; None when
    it has another consumer or none, or the pool ran more than once."""
    source = passed_on.grad_fn
    if source is None or scores.grad_fn is None:
        return None
    consumers = [node for node in _nodes(scores.grad_fn)
                 for function, _ in node.next_functions if function is source]
    if len(consumers) != 1:
        return None
    runs = Counter(call.name for call in calls)
    for call in calls:
        if call.input is passed_on and call.grad_fn is consumers[0] and runs[call.name] == 1:
            return call.name
    return None


def _nodes(root: object) -> list[object]:
    """Every node of the autograd graph that ends in ``root``, each once."""
    seen, stack, nodes = {id(root)}, [root], []
    while stack:
        node = stack.pop()
        nodes.append(node)
        for function, _ in node.next_functions:
            if function is not None and id(function) not in seen:
                seen.add(id(function))
                stack.append(function)
    return nodes
