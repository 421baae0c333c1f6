"""What an exported Reaction graph depends on, as digests for the graph cache's key.

:mod:`analyzer.onnx_export` keys a cached graph on one of two digests of the network:

- :func:`structure_digest`, in milliseconds: ``torch.fx.symbolic_trace`` of the network's
  forward (its code, every tensor constant by value), the class and plain attributes of each
  ``torch.nn`` module it calls, and the source of this project's code traced into the graph.
  It is None wherever that could miss a difference: a forward fx cannot trace, a module hook,
  a called function from outside torch (``torch.fx.wrap``), a custom autograd function defined
  where one of the network's classes is (fx runs its forward, never sees its backward), a
  ``torch.nn`` module holding a non-torch module or an attribute that is not a plain value.
- :func:`trace_digest`, from the ``make_fx`` trace of the whole computation (seconds): for
  every network, where the structure digest is None.

A graph read from the cache is checked against the PyTorch backend before it is used
(analyzer/onnx_export.py), so a difference these digests miss costs an export, not a wrong
result. Nothing in a digest depends on the process (no object addresses): the same network
gets the same digest in the next run.
"""

from __future__ import annotations

import hashlib
import types
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from analyzer.torch_backend import _eval_mode

_TORCH_PACKAGES = {"torch", "operator", "_operator", "math", "builtins"}
_MODULE_INTERNALS = frozenset(vars(nn.Module()))  # parameters, buffers, submodules, hooks…
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks",
                 "_global_backward_hooks", "_global_backward_pre_hooks")
_PLAIN = (type(None), bool, int, float, complex, str, torch.dtype, torch.device,
          torch.memory_format, torch.layout)


def structure_digest(model: nn.Module, sources: Iterable[types.ModuleType]) -> bytes | None:
    """SHA-256 of the network's eval-mode structure and of ``sources`` (the modules whose code
    computes the graph around the network); None where it may not tell two computations
    apart (see the module's docstring)."""
    if _has_hooks(model) or _defines_autograd_functions(model):
        return None
    try:
        with _eval_mode(model):
            traced = torch.fx.symbolic_trace(model)
    except Exception:  # fx refuses data-dependent control flow and much else
        return None
    digest = hashlib.sha256(traced.code.encode())
    try:
        for source in sources:
            digest.update(Path(source.__file__).read_bytes())
    except (OSError, TypeError):  # a module without a readable source file
        return None
    weights = {id(tensor) for tensor in (*model.parameters(), *model.buffers())}
    for node in traced.graph.nodes:
        if node.op == "call_module":
            described = _leaf(model.get_submodule(node.target))
        elif node.op == "call_function":
            described = _torch_function_name(node.target)
        elif node.op == "get_attr":
            described = _constant(_attribute(traced, node.target), weights)
        else:
            continue
        if described is None:
            return None
        digest.update(f"{node.op} {node.name} {described}\n".encode())
    return digest.digest()


def trace_digest(traced: torch.fx.GraphModule) -> bytes | None:
    """SHA-256 of a ``make_fx`` trace's code and tensor constants; None when a constant
    cannot be read by value."""
    digest = hashlib.sha256(traced.code.encode())
    for node in traced.graph.nodes:
        if node.op == "get_attr":
            described = _constant(_attribute(traced, node.target), set())
            if described is None:
                return None
            digest.update(f"{node.target} {described}\n".encode())
    return digest.digest()


def _has_hooks(model: nn.Module) -> bool:
    """Whether a hook would run that fx's trace does not see."""
    from torch.nn.modules import module as module_globals

    if any(getattr(module_globals, name, None) for name in _GLOBAL_HOOKS):
        return True
    return any(getattr(module, name, None) for module in model.modules() for name in _HOOKS)


def _defines_autograd_functions(model: nn.Module) -> bool:
    """Whether a Python module that defines one of the network's classes (or their bases)
    outside torch also defines a ``torch.autograd.Function``."""
    homes = {kind.__module__ for module in model.modules() for kind in type(module).__mro__
             if kind.__module__.split(".")[0] not in ("torch", "builtins")}
    pending = [torch.autograd.Function]
    while pending:
        for subclass in pending.pop().__subclasses__():
            if subclass.__module__ in homes:
                return True
            pending.append(subclass)
    return False


def _leaf(module: nn.Module) -> str | None:
    """A ``torch.nn`` module that fx calls without tracing into: its class and plain
    attributes, and those of the modules it holds; None if any is not torch's or not plain."""
    parts = []
    for name, inner in module.named_modules():
        kind = type(inner)
        if kind.__module__.split(".")[0] != "torch":
            return None
        attributes = {key: value for key, value in vars(inner).items()
                      if key not in _MODULE_INTERNALS}
        if not all(_plain(value) for value in attributes.values()):
            return None
        slots = sorted((key, value is None) for key, value in
                       (*inner._parameters.items(), *inner._buffers.items()))
        parts.append(f"{name}: {kind.__module__}.{kind.__qualname__} "
                     f"{sorted(attributes.items())!r} {slots!r}")
    return "; ".join(parts)


def _plain(value: object) -> bool:
    """A value whose ``repr`` is the same in every process (a set's order is not)."""
    if isinstance(value, (tuple, list)):
        return all(_plain(item) for item in value)
    return isinstance(value, _PLAIN)


def _torch_function_name(function: object) -> str | None:
    """``module.qualname`` of a called function that is torch's (or one of Python's operators
    and builtins), whose behaviour the torch version in the key pins down; None otherwise."""
    owner = getattr(function, "__self__", None) or getattr(function, "__objclass__", None)
    if isinstance(owner, types.ModuleType):
        package = owner.__name__
    elif isinstance(owner, type):  # a classmethod, such as a custom autograd Function's apply
        package = owner.__module__
    elif owner is not None:
        package = type(owner).__module__
    else:
        package = getattr(function, "__module__", None) or ""
    if package.split(".")[0] not in _TORCH_PACKAGES:
        return None
    name = getattr(function, "__qualname__", None) or getattr(function, "__name__", None)
    return f"{package}.{name}" if name else None


def _attribute(root: nn.Module, target: str) -> object:
    value: object = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _constant(value: object, weights: set[int]) -> str | None:
    """A tensor read by the graph: a weight by its place alone (its values are the
    checkpoint's), any other by dtype, shape and bytes; None for what cannot be read."""
    if not isinstance(value, Tensor):
        return None
    if id(value) in weights:
        return "weight"
    try:
        content = value.detach().cpu().contiguous().numpy().tobytes()
    except Exception:  # a fake or otherwise unreadable tensor
        return None
    return f"{value.dtype} {list(value.shape)} {hashlib.sha256(content).hexdigest()}"
