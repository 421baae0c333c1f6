"""The conv kernels of an ONNX graph, for comparing filters (`analyzer filters`).

Any ONNX model is read, ours (docs/ONNX.md) or another exporter's: the weight input of every
``Conv`` node that is an initializer, in the graph's node order, named as the exporter named
it (``torch.onnx.export`` keeps the PyTorch name, ``features.0.weight``; the layer is that
name without ``.weight``). External data is read only from the model's own folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from store.onnx_files import _check_external_location, _external_locations, _parse, _read_bytes


def read_onnx_conv_weights(path: Path) -> dict[str, np.ndarray]:
    """``{layer: kernel [filters, in-channels, kh, kw]}`` of the graph's Conv nodes, in order."""
    from onnx import external_data_helper, numpy_helper  # slow import: only for ONNX files

    path = Path(path)
    model = _parse(_read_bytes(path), path)
    for location in _external_locations(model):
        _check_external_location(path, location)
    external_data_helper.load_external_data_for_model(model, str(path.parent))
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    kernels: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in initializers:
            weight = numpy_helper.to_array(initializers[node.input[1]]).copy()
            if weight.ndim == 4:
                kernels[node.input[1].removesuffix(".weight")] = weight
    return kernels
