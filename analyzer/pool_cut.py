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
the call of an ``nn.MaxPool2d`` module (no subclass, no hooks; or the index-free 2×2 pool of
:mod:`analyzer.max_pool` that replaced one) that runs once per forward, on
that very tensor. The backend then compares a first batch computed both ways
(``TorchBackend._choose_pool_cut``).
"""

from __future__ import annotations

from torch import Tensor

from analyzer.autograd_graph import ModuleCall, called_once, consumers


def sole_max_pool(calls: list[ModuleCall], passed_on: Tensor, scores: Tensor) -> str | None:
    """The name of the max pool that is the only consumer of ``passed_on`` (the layer's
    output, as the forward used it) on the autograd graph that leads to ``scores``; None when
    it has another consumer or none, or the pool ran more than once.

    ``calls``: the forward's calls of plain ``nn.MaxPool2d`` modules, and of the index-free
    pools that replace some in the backend's computing copy (:mod:`analyzer.max_pool`)
    (:func:`analyzer.autograd_graph.watching_calls`)."""
    if passed_on.grad_fn is None:
        return None
    taken_by = consumers(scores).get(id(passed_on.grad_fn), [])
    if len(taken_by) != 1:
        return None
    for call in called_once(calls):
        if call.input is passed_on and call.grad_fn is taken_by[0]:
            return call.name
    return None
