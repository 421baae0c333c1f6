"""What `analyzer reaction` analyses: the classes and the splits' images, and, for ONNX
checkpoints, the layer and input shape their files declare.

Resolved from the run file beside the checkpoints when there is one, from the checkpoints'
own metadata, and from the command-line options (which win). The network that PyTorch
checkpoints are loaded into is :mod:`analyzer.network`'s; this module imports no torch, so a
pass over ONNX files runs without it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from store.datasets import SPLITS, folder_images, open_source, read_folder_images
from store.errors import InputError
from store.onnx_files import OnnxContract
from store.results import SplitImages
from store.runfile import RUN_FILE, RunInfo, read_run_info

if TYPE_CHECKING:
    from torch import nn

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
    class_names = resolve_class_names(info, metadata, data)
    size, channels = contract.image_size, contract.channels
    return AnalysisInputs(None, contract.spec.layer, class_names,
                          load_splits(data, info, class_names, channels, size, splits),
                          run_file, f"ONNX graph (layer {contract.spec.layer})", size, channels)


def load_splits(data: dict[str, Path], info: RunInfo | None, class_names: list[str],
                channels: int, image_size: tuple[int, int],
                wanted: list[str] | None) -> list[SplitData]:
    """The splits' images: the ``--data`` folders when given, else the run file's splits."""
    if data:
        return _folder_splits(data, class_names, channels, image_size, wanted)
    return _run_splits(info, channels, image_size, wanted)


def _size(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def resolve_class_names(info: RunInfo | None, metadata: dict[str, str],
                        data: dict[str, Path], required: bool = True) -> list[str] | None:
    """The class names: the run file's, else a checkpoint's metadata, else the first
    ``--data`` folder's subfolders; None (or, when ``required``, an error) without any."""
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
