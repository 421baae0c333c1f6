"""A conv layer's filters read from a checkpoint of any kind the analyzer reads.

Our safetensors checkpoints, ``.pt``/``.pth``/``.ckpt`` state dicts (``weights_only=True``),
TorchScript archives and ``torch.export`` programs all go through
:func:`store.model_files.load_weights_file`; ONNX graphs give the kernels of their ``Conv``
nodes in graph order (:mod:`store.onnx_weights`). The conv layers are named in the network's order
when the network is known (the run file's or the checkpoint's zoo model, or ``--model``),
else in the order the file stores its weights (PyTorch's registration order for pickles and
programs): every 4-D ``<name>.weight`` is a conv layer ``<name>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from analyzer.inputs import find_run_file
from analyzer.network import resolve_network
from store.checkpoint_files import CheckpointFile, checkpoint_epoch
from store.errors import InputError
from store.model_files import load_weights_file, strip_common_prefix
from store.onnx_weights import read_onnx_conv_weights


@dataclass(frozen=True)
class NetworkOptions:
    """Which network the checkpoints hold (None: as the run file or the checkpoint says)."""

    run: Path | None = None
    model: str | None = None
    image_size: tuple[int, int] | None = None
    channels: int | None = None


@dataclass(frozen=True)
class ConvFilters:
    """One conv layer's filters of one checkpoint.

    Attributes:
        path: the checkpoint file.
        layer: qualified module name of the conv layer.
        weights: ``[filters, in-channels, kh, kw]`` the kernels as stored (bias left out).
        conv_layers: every conv layer of the network, in order (the first is the default).
    """

    path: Path
    layer: str
    weights: np.ndarray
    conv_layers: tuple[str, ...]


def network_for(path: Path, options: NetworkOptions | None = None) -> nn.Module | None:
    """The network the weights of checkpoint ``path`` belong to, when the run file beside its
    folder (or ``--run``), the checkpoint's own metadata or ``--model`` says; else None."""
    path, options = Path(path), options or NetworkOptions()
    run_file = find_run_file(path.parent, options.run)
    metadata = load_weights_file(path).metadata if path.suffix == ".safetensors" else {}
    if options.model is None and run_file is None and "model" not in metadata:
        return None
    checkpoint = CheckpointFile(checkpoint_epoch(path.name) or 0, path)
    return resolve_network(first_checkpoint=checkpoint, run_file=run_file, model=options.model,
                           layer=None, data={}, image_size=options.image_size,
                           channels=options.channels, require_class_names=False,
                           require_layer=False).model


def read_filters(path: Path, layer: str | None, model: nn.Module | None = None) -> ConvFilters:
    """The filters of ``layer`` (default: the first conv layer) in the checkpoint ``path``.

    Args:
        path: a checkpoint file of any kind the analyzer reads, ONNX included.
        layer: qualified name of a conv layer; None for the first.
        model: the network the weights belong to (:func:`network_for`), naming the conv
            layers in its order; None: every 4-D ``<name>.weight`` in the file's order.
    """
    path = Path(path)
    if path.suffix.lower() == ".onnx":  # the kernels of its Conv nodes, in graph order
        return _pick(path, {name: torch.as_tensor(kernel) for name, kernel in
                            read_onnx_conv_weights(path).items()}, layer)
    loaded = load_weights_file(path)
    if loaded.module is not None:  # a torch.export program: its own state dict, in order
        return _pick(path, _conv_weights(loaded.module.state_dict()), layer)
    weights = loaded.state_dict or {}
    if model is None:
        return _pick(path, _conv_weights(weights), layer)
    expected = model.state_dict()
    weights = strip_common_prefix(weights, set(expected))
    convs = {}
    for name, module in model.named_modules():
        key = f"{name}.weight"
        if isinstance(module, nn.Conv2d) and key in weights:
            if tuple(weights[key].shape) != tuple(expected[key].shape):
                raise InputError(f"{path.name}: {key} is {list(weights[key].shape)}, the model "
                                 f"expects {list(expected[key].shape)}")
            convs[name] = weights[key]
    return _pick(path, convs, layer)


def _conv_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every 4-D ``<name>.weight`` of a state dict, in its order, as ``{name: weight}``."""
    return {key.removesuffix(".weight"): value for key, value in state_dict.items()
            if key.endswith(".weight") and value.dim() == 4}


def _pick(path: Path, convs: dict[str, torch.Tensor], layer: str | None) -> ConvFilters:
    if not convs:
        raise InputError(f"{path.name} has no conv layer (no 4-D weight)")
    names = tuple(convs)
    chosen = names[0] if layer is None else layer
    if chosen not in convs:
        shown = ", ".join(names[:8]) + (", …" if len(names) > 8 else "")
        raise InputError(f"{chosen!r} is not a conv layer of {path.name}; its conv layers: "
                         f"{shown}")
    weights = convs[chosen].detach().cpu().numpy()
    return ConvFilters(path, chosen, weights, names)
