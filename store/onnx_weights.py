"""The weights inside an ONNX graph: its conv kernels (`analyzer filters`) and its parameters
by their PyTorch names (`analyzer features` on ONNX checkpoints).

Any ONNX model is read, ours (docs/ONNX.md) or another exporter's. ``torch.onnx.export``
(and our exporter) name each weight initializer as the PyTorch state dict does
(``features.0.weight``), so the network the graph was exported from can be rebuilt with them.
External data is read only from the model's own folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from store.errors import InputError
from store.onnx_files import _check_external_location, _external_locations, _parse, _read_bytes

# Buffers the forward pass never reads, which an exporter drops from the graph.
_UNUSED_BUFFERS = ("num_batches_tracked",)


@dataclass(frozen=True)
class OnnxWeights:
    """An ONNX file's initializers ``{name: array}`` and its ``metadata_props``."""

    initializers: dict[str, np.ndarray]
    metadata: dict[str, str]


def read_onnx_weights(path: Path) -> OnnxWeights:
    """Every initializer of the graph (external data from the file's folder only)."""
    model = _load(Path(path))
    from onnx import numpy_helper

    return OnnxWeights({tensor.name: numpy_helper.to_array(tensor).copy()
                        for tensor in model.graph.initializer},
                       {entry.key: entry.value for entry in model.metadata_props})


def read_onnx_metadata(path: Path) -> dict[str, str]:
    """The file's ``metadata_props`` (its weights are neither loaded nor converted)."""
    path = Path(path)
    model = _parse(_read_bytes(path), path)
    return {entry.key: entry.value for entry in model.metadata_props}


def read_onnx_conv_weights(path: Path) -> dict[str, np.ndarray]:
    """``{layer: kernel [filters, in-channels, kh, kw]}`` of the graph's Conv nodes, in order
    (the layer is the weight's name without ``.weight``)."""
    model = _load(Path(path))
    from onnx import numpy_helper

    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    kernels: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in initializers:
            weight = numpy_helper.to_array(initializers[node.input[1]]).copy()
            if weight.ndim == 4:
                kernels[node.input[1].removesuffix(".weight")] = weight
    return kernels


def state_dict_from_onnx(initializers: dict[str, np.ndarray],
                         expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The initializers that ``expected`` (a network's state dict) names, as its tensors.

    Buffers the forward pass does not read (``num_batches_tracked``) keep the network's own
    values when the graph dropped them; any other missing or misshapen weight is refused with
    one line naming them (the graph's other initializers, its constants, are left out).
    """
    state_dict, missing, wrong_shape = {}, [], []
    for key, value in expected.items():
        if key in initializers:
            array = initializers[key]
            if tuple(array.shape) != tuple(value.shape):
                wrong_shape.append(f"{key} {list(array.shape)} (the model: {list(value.shape)})")
            state_dict[key] = torch.from_numpy(array).to(value.dtype)
        elif key.rsplit(".", 1)[-1] in _UNUSED_BUFFERS:
            state_dict[key] = value.detach().clone()
        else:
            missing.append(key)
    if missing or wrong_shape:
        shown = [f"missing {', '.join(missing[:4])}{' …' if len(missing) > 4 else ''}"] \
            if missing else []
        shown += [f"wrong shape {', '.join(wrong_shape[:2])}"] if wrong_shape else []
        raise InputError(f"its ONNX weights do not fit the model ({'; '.join(shown)}): "
                         "give the --model it was exported from (an exporter that folds batch "
                         "norm into the convolutions leaves no weights to rebuild it with)")
    return state_dict


def _load(path: Path):
    """The parsed model with its external data (from its own folder only)."""
    from onnx import external_data_helper  # slow import: only for ONNX files

    model = _parse(_read_bytes(path), path)
    for location in _external_locations(model):
        _check_external_location(path, location)
    external_data_helper.load_external_data_for_model(model, str(path.parent))
    return model
