"""The network a pass loads PyTorch checkpoints into: built from the zoo spec of the run
file or of our checkpoints' metadata, or from ``--model``; its Grad-CAM layer, classes and
input shape; and the inputs of a pass over PyTorch checkpoints (:func:`resolve_inputs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from analyzer.inputs import (
    AnalysisInputs,
    load_splits,
    resolve_class_names,
)
from analyzer.model_factory import default_layer, resolve_model
from store.checkpoint_files import CheckpointFile
from store.checkpoints import read_checkpoint_metadata
from store.errors import InputError
from store.model_files import load_weights_file, strip_common_prefix
from store.runfile import read_run_info
from trainer.models import ModelSpec, build_model, gradcam_layer


@dataclass
class NetworkInputs:
    """The network to load checkpoints into, its Grad-CAM layer, classes and input shape."""

    model: nn.Module | None
    layer: str
    class_names: list[str] | None  # None when nothing names them (export without a run file)
    image_size: tuple[int, int]
    channels: int
    description: str
    model_spec: str | None


def resolve_inputs(*, first_checkpoint: CheckpointFile, run_file: Path | None,
                   model: str | None, layer: str | None, data: dict[str, Path],
                   image_size: tuple[int, int] | None, channels: int | None,
                   splits: list[str] | None) -> AnalysisInputs:
    """Decide model, layer, classes and splits; load the splits' images."""
    network = resolve_network(first_checkpoint=first_checkpoint, run_file=run_file,
                              model=model, layer=layer, data=data, image_size=image_size,
                              channels=channels)
    class_names = network.class_names or []
    info = read_run_info(run_file) if run_file else None
    split_data = load_splits(data, info, class_names, network.channels, network.image_size,
                             splits)
    return AnalysisInputs(network.model, network.layer, class_names, split_data, run_file,
                          network.description, network.image_size, network.channels,
                          network.model_spec)


def resolve_network(*, first_checkpoint: CheckpointFile, run_file: Path | None,
                    model: str | None, layer: str | None, data: dict[str, Path],
                    image_size: tuple[int, int] | None, channels: int | None,
                    require_class_names: bool = True,
                    require_layer: bool = True) -> NetworkInputs:
    """Decide the network, its layer, classes and input shape (no images are read).

    Without ``require_class_names`` and with nothing that names the classes, the class count
    is read off the first checkpoint's weights. Without ``require_layer`` a model that names
    no Grad-CAM layer gets ``layer == ""`` (for analyses that do not use it).
    """
    info = read_run_info(run_file) if run_file else None
    metadata = _checkpoint_metadata(first_checkpoint)
    spec_json = info.model if info else metadata.get("model")
    spec = ModelSpec.from_json(spec_json) if spec_json else None
    class_names = resolve_class_names(info, metadata, data, required=require_class_names)
    if image_size is None and spec is not None:
        image_size = spec.image_size
    if image_size is None and "image_size" in metadata:  # an ONNX file's input shape
        image_size, channels = _metadata_shape(metadata, first_checkpoint, channels)
    if channels is None:
        channels = spec.in_channels if spec is not None else 1
    if image_size is None:
        raise InputError("cannot tell the input size of the model: give --image-size HxW")
    num_classes = len(class_names) if class_names is not None else _class_count(
        model, spec, first_checkpoint, channels, image_size)
    network, description, zoo_name = _build_network(model, spec, first_checkpoint, channels,
                                                    image_size, num_classes)
    chosen_layer = layer or (gradcam_layer(zoo_name) if zoo_name else None) or (
        default_layer(network, model or "") if network is not None else None)
    if not chosen_layer and require_layer:
        raise InputError("this model names no Grad-CAM layer: give --layer NAME "
                         "(the last convolution block's activation)")
    model_spec = ModelSpec(zoo_name, channels, image_size, num_classes).to_json() \
        if zoo_name else None
    return NetworkInputs(network, chosen_layer or "", class_names, tuple(image_size), channels,
                         description, model_spec)


def _checkpoint_metadata(checkpoint: CheckpointFile) -> dict[str, str]:
    suffix = checkpoint.path.suffix.lower()
    if suffix == ".onnx":
        from store.onnx_weights import read_onnx_metadata  # imports onnx: only for ONNX files

        return read_onnx_metadata(checkpoint.path)
    if suffix != ".safetensors":
        return {}
    return read_checkpoint_metadata(checkpoint.path)  # the header only: the weights come later


def _metadata_shape(metadata: dict[str, str], checkpoint: CheckpointFile,
                    channels: int | None) -> tuple[tuple[int, int], int | None]:
    """``image_size`` (``HxW``) and ``channels`` of a file's metadata (docs/ONNX.md)."""
    try:
        height, width = (int(side) for side in metadata["image_size"].split("x"))
        return (height, width), channels or int(metadata.get("channels", 1))
    except ValueError:
        raise InputError(f"{checkpoint.path.name}: metadata image_size must be HxW and "
                         f"channels a number, got {metadata['image_size']!r} and "
                         f"{metadata.get('channels')!r}") from None


def _build_network(model: str | None, spec: ModelSpec | None, first: CheckpointFile,
                   channels: int, image_size: tuple[int, int],
                   num_classes: int) -> tuple[nn.Module | None, str, str | None]:
    """The network to load each checkpoint into, a description, and its zoo name if any."""
    if model is not None:
        network = resolve_model(model, in_channels=channels, image_size=image_size,
                                num_classes=num_classes)
        zoo = model if _is_zoo_name(model) else None
        return network, model, zoo
    if spec is not None:
        spec = ModelSpec(spec.name, channels, image_size, num_classes)
        return build_model(spec), spec.name, spec.name
    if first.path.suffix == ".pt2":
        return None, "torch.export program", None
    raise InputError(f"{first.path.name} does not say which network it holds: give --model "
                     "(a zoo name, module:callable or file.py:callable)")


def _class_count(model: str | None, spec: ModelSpec | None, first: CheckpointFile,
                 channels: int, image_size: tuple[int, int]) -> int:
    """The class count, read off the first checkpoint's weights when nothing names it.

    The network is built for 2 and for 3 classes; a weight whose shape differs between the
    two is the classifier's, and the checkpoint's size on that axis is the count.
    """
    if spec is not None:
        return spec.num_classes
    if model is None:
        return 2  # _build_network refuses the checkpoint or it carries its own network
    shapes = [{key: tuple(value.shape) for key, value in resolve_model(
        model, in_channels=channels, image_size=image_size, num_classes=count).state_dict()
        .items()} for count in (2, 3)]
    weights = load_weights_file(first.path).state_dict or {}
    weights = strip_common_prefix(weights, set(shapes[0]))
    for key, two in shapes[0].items():
        three = shapes[1].get(key)
        if three is None or two == three or key not in weights:
            continue
        axes = [axis for axis, (a, b) in enumerate(zip(two, three, strict=True)) if a != b]
        if len(axes) == 1 and len(weights[key].shape) == len(two):
            return int(weights[key].shape[axes[0]])
    return 2  # the network's size does not depend on the class count


def _is_zoo_name(name: str) -> bool:
    return ":" not in name
