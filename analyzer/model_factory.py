"""Build the model a checkpoint's weights go into: a zoo name or the user's own callable.

``--model`` takes a zoo name (``small``, ``model3``…), ``package.module:callable`` importable
from the current folder or ``PYTHONPATH``, or ``path/to/file.py:callable``. The callable gets
those of ``in_channels``, ``num_classes`` and ``image_size`` that it declares by name.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from torch import nn

from store.errors import InputError, first_line
from trainer.models import ModelSpec, build_model, gradcam_layer, model_names


def resolve_model(spec: str, *, in_channels: int, image_size: tuple[int, int],
                  num_classes: int) -> nn.Module:
    """The model named by ``spec``, built for the given input shape and class count."""
    if spec in model_names():
        return build_model(ModelSpec(spec, in_channels, tuple(image_size), num_classes))
    target, colon, attribute = spec.rpartition(":")
    if not colon or not target or not attribute:
        raise InputError(f"unknown model {spec!r}: give a zoo model ({', '.join(model_names())})"
                         ", module.path:callable or path/to/file.py:callable")
    module = _import_file(Path(target)) if _is_file_path(target) else _import_module(target)
    factory = _attribute(module, target, attribute)
    arguments = {"in_channels": in_channels, "num_classes": num_classes,
                 "image_size": tuple(image_size)}
    return _call_factory(factory, spec, arguments)


def default_layer(model: nn.Module, spec: str) -> str | None:
    """The Grad-CAM layer to use when none is given: the zoo's, or ``model.gradcam_layer``."""
    if spec in model_names():
        return gradcam_layer(spec)
    layer = getattr(model, "gradcam_layer", None)
    return layer if isinstance(layer, str) else None


def _is_file_path(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def _import_module(name: str) -> ModuleType:
    """Import ``name`` as ``python -m`` would see it: the current folder comes first."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    importlib.invalidate_caches()  # the module may have been written after the last import
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise InputError(f"cannot import module {name!r}: {first_line(error)}") from None
    except Exception as error:  # the user's module raised while it ran
        raise InputError(f"importing module {name!r} failed: {_describe(error)}") from None


def _import_file(path: Path) -> ModuleType:
    """Run a Python file as a module under a name unique to its path; its folder is importable."""
    if not path.is_file():
        raise InputError(f"model file not found: {path}")
    resolved = path.resolve()
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
    name = f"reaction_user_model_{resolved.stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise InputError(f"cannot import {path}: not a Python source file")
    module = importlib.util.module_from_spec(module_spec)
    if str(resolved.parent) not in sys.path:
        sys.path.insert(0, str(resolved.parent))  # so the file can import its neighbours
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:  # the user's file raised (SyntaxError included) while it ran
        del sys.modules[name]
        raise InputError(f"importing {path} failed: {_describe(error)}") from None
    return module


def _attribute(module: ModuleType, target: str, attribute: str) -> Callable:
    try:
        found = functools.reduce(getattr, attribute.split("."), module)
    except AttributeError:
        raise InputError(f"{target} has no attribute {attribute!r}") from None
    if not callable(found):
        raise InputError(f"{target}:{attribute} is a {type(found).__name__}, not a callable")
    return found


def _call_factory(factory: Callable, spec: str, arguments: dict[str, object]) -> nn.Module:
    """Call ``factory`` with the arguments it declares by name and check it gives a module."""
    try:
        declared = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        declared = {}
    accepted = {name: value for name, value in arguments.items()
                if name in declared and declared[name].kind in (
                    inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    try:
        model = factory(**accepted)
    except InputError:
        raise
    except Exception as error:  # whatever the user's code raises
        raise InputError(f"{spec} failed: {_describe(error)}") from None
    if not isinstance(model, nn.Module):
        raise InputError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {first_line(error)}"
