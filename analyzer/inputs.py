"""What `analyzer reaction` analyses: the model, its target layer, the classes and the splits.

Resolved from the run file beside the checkpoints when there is one, from our checkpoints'
own metadata, and from the command-line options (which win).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from analyzer.model_factory import default_layer, resolve_model
from store.checkpoints import read_checkpoint_metadata
from store.datasets import SPLITS, folder_images, open_source, read_folder_images
from store.errors import InputError
from store.model_files import CheckpointFile, load_weights_file, strip_common_prefix
from store.onnx_files import OnnxContract
from store.results import SplitImages
from store.runfile import RUN_FILE, RunInfo, read_run_info
from trainer.models import ModelSpec, build_model, gradcam_layer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitData:
    """One split's images, loaded once: pixels ``[N, C, H, W]`` in [0, 1] and their identity."""

    name: str
    images: np.ndarray
    identity: SplitImages


@dataclass
class AnalysisInputs:
    """Everything the Reaction pass needs besides the checkpoints themselves."""

    model: nn.Module | None  # None when every checkpoint carries its network (.pt2, .onnx)
    layer: str
    class_names: list[str]
    splits: list[SplitData]
    run_file: Path | None
    model_description: str
    image_size: tuple[int, int] | None = None
    channels: int | None = None
    model_spec: str | None = None  # the zoo spec JSON when the model is a zoo one


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


def find_run_file(ckpt_dir: Path, run: Path | None) -> Path | None:
    """``--run``, else ``run.h5`` in the checkpoint folder's parent, else None."""
    if run is not None:
        if not Path(run).is_file():
            raise InputError(f"run file not found: {run}")
        return Path(run)
    ckpt_dir = Path(ckpt_dir)
    # As the user wrote it (runs/demo/run.h5 in messages), unless the name has no parent in it.
    parent = ckpt_dir.parent if ckpt_dir.name not in ("", "..") else ckpt_dir.resolve().parent
    beside = parent / RUN_FILE
    return beside if beside.is_file() else None


def parse_data_options(values: tuple[str, ...]) -> dict[str, Path]:
    """``("train=DIR", "test=DIR")`` → ``{"train": DIR, "test": DIR}``."""
    folders: dict[str, Path] = {}
    for value in values:
        split, sep, folder = value.partition("=")
        if not sep or not split or not folder:
            raise InputError(f"--data takes SPLIT=FOLDER (e.g. train=siw13/train), got {value!r}")
        if split in folders:
            raise InputError(f"--data gives the {split} split twice")
        folders[split] = Path(folder).expanduser()  # the shell leaves a ~ after "=" alone
    return folders


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
    split_data = (_folder_splits(data, class_names, network.channels, network.image_size,
                                 splits) if data
                  else _run_splits(info, network.channels, network.image_size, splits))
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
    class_names = _class_names(info, metadata, data, required=require_class_names)
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


def resolve_onnx_inputs(*, contract: OnnxContract, run_file: Path | None, model: str | None,
                        layer: str | None, data: dict[str, Path],
                        image_size: tuple[int, int] | None, channels: int | None,
                        splits: list[str] | None) -> AnalysisInputs:
    """Inputs for ONNX checkpoints: layer and input shape come from the files themselves."""
    if model is not None:
        raise InputError("--model does not apply to ONNX checkpoints: they carry their network")
    if layer is not None and layer != contract.spec.layer:
        raise InputError(f"the ONNX checkpoints compute Grad-CAM at layer {contract.spec.layer!r}: "
                         f"export them again with 'analyzer export-onnx --layer {layer}'")
    if image_size is not None and tuple(image_size) != contract.image_size:
        raise InputError(f"the ONNX checkpoints take {_size(contract.image_size)} images, "
                         f"not {_size(image_size)}")
    if channels is not None and channels != contract.channels:
        raise InputError(f"the ONNX checkpoints take {contract.channels}-channel images, "
                         f"not {channels}")
    info = read_run_info(run_file) if run_file else None
    metadata = {} if contract.class_names is None else {
        "classes": json.dumps(contract.class_names)}
    class_names = _class_names(info, metadata, data)
    size, channels = contract.image_size, contract.channels
    split_data = (_folder_splits(data, class_names, channels, size, splits) if data
                  else _run_splits(info, channels, size, splits))
    return AnalysisInputs(None, contract.spec.layer, class_names, split_data, run_file,
                          f"ONNX graph (layer {contract.spec.layer})", size, channels)


def _size(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


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


def _class_names(info: RunInfo | None, metadata: dict[str, str],
                 data: dict[str, Path], required: bool = True) -> list[str] | None:
    if info is not None:
        return info.class_names
    if "classes" in metadata:
        return json.loads(metadata["classes"])
    if data:
        return folder_images(next(iter(data.values())))[0]
    if not required:
        return None
    raise InputError("no run file beside the checkpoints: give --run RUN.h5, or --data "
                     "SPLIT=FOLDER with --model and --out")


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


def _run_splits(info: RunInfo | None, channels: int, image_size: tuple[int, int],
                wanted: list[str] | None) -> list[SplitData]:
    if info is None:
        raise InputError("no run file and no --data: nothing to analyse")
    available = [s for s in SPLITS if s in info.split_ids] + \
        [s for s in info.split_ids if s not in SPLITS]
    names = _chosen_splits(available, wanted)
    source = open_source(info.config["data"], info.config.get("test"))
    loaded = []
    for name in names:
        ids = info.split_ids[name]
        if not ids:
            logger.warning(f"the {name} split has no images, skipped")
            continue
        which = "test" if name == "test" else "train"
        pixels = source.load(ids, channels, image_size, which=which)
        loaded.append(SplitData(name, pixels, SplitImages(ids, info.split_labels[name])))
    return loaded


def _folder_splits(data: dict[str, Path], class_names: list[str], channels: int,
                   image_size: tuple[int, int], wanted: list[str] | None) -> list[SplitData]:
    loaded = []
    for name in _chosen_splits(list(data), wanted):
        folder_classes, ids, labels = folder_images(data[name])
        if folder_classes != class_names:
            raise InputError(f"the classes of {data[name]} ({', '.join(folder_classes)}) differ "
                             f"from the model's ({', '.join(class_names)})")
        pixels = read_folder_images(data[name], ids, channels, image_size)
        loaded.append(SplitData(name, pixels, SplitImages(ids, labels)))
    return loaded


def _chosen_splits(available: list[str], wanted: list[str] | None) -> list[str]:
    if wanted is None:
        return available
    unknown = [s for s in wanted if s not in available]
    if unknown:
        raise InputError(f"no {', '.join(unknown)} split here; available: {', '.join(available)}")
    return wanted
