"""Reading a probe forward's autograd graph: which module calls made which nodes, and what
consumes a node (:mod:`analyzer.pool_cut`, :mod:`analyzer.dense_cut`)."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from torch import Tensor, nn

from analyzer.conv_relu import hooked


@dataclass(frozen=True)
class ModuleCall:
    """One call of a module in a probe forward: its first input, its output's grad_fn."""

    name: str
    input: object
    grad_fn: object


@contextlib.contextmanager
def watching_calls(network: nn.Module, kinds: tuple[type[nn.Module], ...]
                   ) -> Iterator[list[ModuleCall]]:
    """Record every call of the network's modules of exactly one of the types ``kinds`` (no
    subclass: its forward could be anything) that carry no hook (their calls could do more)."""
    calls: list[ModuleCall] = []

    def watch(name: str):
        def record(module: nn.Module, inputs: tuple, output: object) -> None:
            calls.append(ModuleCall(name, inputs[0] if inputs else None,
                                    getattr(output, "grad_fn", None)))
        return record

    watched = [(name, module) for name, module in network.named_modules()
               if type(module) in kinds and not hooked(module)]
    handles = [module.register_forward_hook(watch(name)) for name, module in watched]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def called_once(calls: list[ModuleCall]) -> list[ModuleCall]:
    """The calls of modules that ran exactly once in the forward."""
    runs = Counter(call.name for call in calls)
    return [call for call in calls if runs[call.name] == 1]


def consumers(scores: Tensor) -> dict[int, list[object]]:
    """For every node of the autograd graph that ends in ``scores``, by ``id``, the nodes
    that take its output (each consumer once per use)."""
    taken_by: dict[int, list[object]] = {}
    if scores.grad_fn is None:
        return taken_by
    seen, stack = {id(scores.grad_fn)}, [scores.grad_fn]
    while stack:
        node = stack.pop()
        for function, _ in node.next_functions:
            if function is None:
                continue
            taken_by.setdefault(id(function), []).append(node)
            if id(function) not in seen:
                seen.add(id(function))
                stack.append(function)
    return taken_by
