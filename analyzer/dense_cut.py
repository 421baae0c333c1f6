"""The Grad-CAM gradient taken at the output of the dense layer that alone takes the map,
flattened.

Of ∂y^c/∂T Grad-CAM needs only each channel's sum over the map (alpha_k, docs/METHOD.md §2),
where T is the layer's output A, or the output P of the max pool that alone follows it
(:mod:`analyzer.pool_cut`: the same sums). When T goes, flattened and nowhere else, into a
dense layer z = W·flatten(T) + b, with T's K channels of S entries each, then
∂y^c/∂T^k_s = Σ_o ∂y^c/∂z_o · W[o, k·S + s], and so

    Σ_s ∂y^c/∂T^k_s = Σ_o ∂y^c/∂z_o · Σ_s W[o, k·S + s].

The backward can stop at z: the product of the gradient with W, ``[B, out] × [out, K·S]``
(for thesis Model II at 50×200, 11776 inputs, the largest matrix product of the backward),
becomes one with W summed per channel, ``[out, K]`` (:func:`analyzer.gradcam
.channel_weights_from_dense`).

Which dense layer, if any, is read off the autograd graph of a probe forward
(:func:`sole_dense_layer`): from the tensor T as the forward used it, every node on the way
is taken by exactly one other, each only reshapes or copies (a view, a flatten, a
``contiguous()``: the entries keep their order), and the last is taken by the call of an
``nn.Linear`` module (no subclass, no hooks) that runs once per forward on a ``[B, K·S]``
input. The backend then compares a first batch computed both ways
(``TorchBackend._choose_dense_cut``).
"""

from __future__ import annotations

from torch import Tensor

from analyzer.autograd_graph import ModuleCall, called_once, consumers

# Backward nodes of ops that only reshape or copy their input, its entries in order.
_RESHAPES = frozenset({"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0",
                       "CloneBackward0", "AliasBackward0"})


def sole_dense_layer(calls: list[ModuleCall], passed_on: Tensor, scores: Tensor) -> str | None:
    """The name of the dense layer that alone takes ``passed_on`` (T, as the forward used
    it), flattened, on the autograd graph that leads to ``scores``; None when there is none.

    ``calls``: the forward's calls of plain ``nn.Linear`` modules
    (:func:`analyzer.autograd_graph.watching_calls`)."""
    node = passed_on.grad_fn
    if node is None:
        return None
    taken_by = consumers(scores)
    flat = passed_on[0].numel()
    dense = {id(call.grad_fn): call for call in called_once(calls)
             if call.grad_fn is not None and isinstance(call.input, Tensor)
             and tuple(call.input.shape) == (len(passed_on), flat)}
    while len(taken_by.get(id(node), [])) == 1:
        (node,) = taken_by[id(node)]
        if id(node) in dense:
            return dense[id(node)].name
        if node.name() not in _RESHAPES:
            return None
    return None
