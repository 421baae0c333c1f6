"""ONNX checkpoints that carry their Grad-CAM gradient graph: the file contract (docs/ONNX.md).

A file is accepted when its ``metadata_props`` say ``format = reaction-onnx`` (major version 1)
and its graph has the documented inputs (``images``, ``targets``) and outputs (``logits``,
``reaction``, ``empty``, optionally ``cam``). A plain ONNX classifier is refused with a line that
says how to export one properly. Weights normally live inside the file; external data files are
accepted only inside the model's own folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePath

from store.errors import InputError
from store.files import write_atomically
from store.spec import SPEC_KEYS, ReactionSpec

ONNX_FORMAT = "reaction-onnx"
ONNX_FORMAT_VERSION = "1.0"
IMAGES, TARGETS = "images", "targets"
LOGITS, REACTION, EMPTY, CAM = "logits", "reaction", "empty", "cam"
EXPORT_HINT = ("export the PyTorch checkpoints with 'analyzer export-onnx --ckpt-dir CKPTS "
               "--out FOLDER' (see docs/ONNX.md)")
# ONNX TensorProto element types used by the contract.
_FLOAT, _INT64, _BOOL = 1, 7, 9
# Settings that decide what a file computes: a file is re-exported when one of them changes.
SETTING_KEYS = ("format_version", *SPEC_KEYS, "with_maps", "source_sha256")


def onnx_name(epoch: int) -> str:
    """File name of an epoch's ONNX checkpoint, e.g. ``epoch_0001.onnx``."""
    return f"epoch_{epoch:04d}.onnx"


@dataclass(frozen=True)
class OnnxContract:
    """What an accepted ONNX checkpoint computes, read from its graph and metadata."""

    spec: ReactionSpec
    channels: int
    image_size: tuple[int, int]
    num_classes: int
    with_maps: bool
    class_names: list[str] | None = None
    epoch: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def same_computation(self, other: OnnxContract) -> bool:
        """True when both files compute Reaction the same way on the same inputs."""
        return (self.spec, self.channels, self.image_size, self.num_classes) == (
            other.spec, other.channels, other.image_size, other.num_classes)


@dataclass
class OnnxFile:
    """One ONNX checkpoint read from disk: its bytes (None when it has external data)."""

    path: Path
    payload: bytes | None
    sha256: str
    contract: OnnxContract


def read_onnx_file(path: Path) -> OnnxFile:
    """Read and check an ONNX checkpoint; InputError with one line naming the file if it fails."""
    path = Path(path)
    payload = _read_bytes(path)
    model = _parse(payload, path)
    external = _external_locations(model)
    for location in external:
        _check_external_location(path, location)
    contract = contract_of(model, path)
    return OnnxFile(path, None if external else payload, hashlib.sha256(payload).hexdigest(),
                    contract)


def read_onnx_contract(path: Path) -> OnnxContract:
    """The contract of an ONNX checkpoint (see :func:`read_onnx_file`)."""
    return read_onnx_file(path).contract


def write_onnx_file(path: Path, payload: bytes) -> str:
    """Write a serialized ModelProto atomically; return its SHA-256."""
    write_atomically(path, payload)
    return hashlib.sha256(payload).hexdigest()


def remove_stale_onnx_temporaries(folder: Path) -> None:
    """Delete the temporary files a killed ONNX writer left behind in ``folder``."""
    for stale in Path(folder).glob("*.onnx.*.tmp"):
        stale.unlink(missing_ok=True)


def contract_of(model, path: Path) -> OnnxContract:
    """Check a ModelProto against the contract and return what it computes."""
    metadata = {entry.key: entry.value for entry in model.metadata_props}
    inputs = {value.name: value for value in model.graph.input}
    outputs = {value.name: value for value in model.graph.output}
    if metadata.get("format") != ONNX_FORMAT or REACTION not in outputs or EMPTY not in outputs:
        raise InputError(f"{path.name} is a plain ONNX model without the Reaction outputs "
                         f"({REACTION}, {EMPTY}) and format={ONNX_FORMAT} metadata: "
                         f"{EXPORT_HINT}")
    version = metadata.get("format_version", "")
    if version.partition(".")[0] != ONNX_FORMAT_VERSION.partition(".")[0]:
        raise InputError(f"{path.name} has {ONNX_FORMAT} version {version or '(none)'}; this "
                         f"analyzer reads version {ONNX_FORMAT_VERSION}")
    for key in ("layer", "score", "target"):
        if not metadata.get(key):
            raise InputError(f"{path.name} lacks the {key!r} metadata entry (docs/ONNX.md)")
    try:
        spec = ReactionSpec.from_attributes(metadata)
    except InputError as error:
        raise InputError(f"{path.name}: {error}") from None
    channels, height, width = _image_shape(inputs, path)
    if spec.target == "label":
        _expect(inputs, TARGETS, _INT64, ["batch"], path)
    num_classes = _expect(outputs, LOGITS, _FLOAT, ["batch", None], path)[1]
    _expect(outputs, REACTION, _FLOAT, ["batch"], path)
    _expect(outputs, EMPTY, _BOOL, ["batch"], path)
    if CAM in outputs:
        _expect(outputs, CAM, _FLOAT, ["batch", None, None], path)
    return OnnxContract(spec=spec, channels=channels,
                        image_size=(height, width), num_classes=num_classes,
                        with_maps=CAM in outputs, class_names=_class_names(metadata, path),
                        epoch=_optional_int(metadata, "epoch", path), metadata=metadata)


def _image_shape(inputs: dict, path: Path) -> tuple[int, int, int]:
    dims = _expect(inputs, IMAGES, _FLOAT, ["batch", None, None, None], path)
    return dims[1], dims[2], dims[3]


def _expect(values: dict, name: str, elem_type: int, dims: list[str | None],
            path: Path) -> list[int | str]:
    """The dims of graph value ``name``, checked: ``"batch"`` = any, None = a fixed size."""
    type_names = {_FLOAT: "float32", _INT64: "int64", _BOOL: "bool"}
    shape = "[" + ", ".join(d or "N" for d in dims) + "]"
    wanted = f"{name} ({type_names[elem_type]} {shape})"
    if name not in values:
        raise InputError(f"{path.name} has no {wanted} (docs/ONNX.md)")
    tensor = values[name].type.tensor_type
    found = [d.dim_value if d.HasField("dim_value") else d.dim_param or "?"
             for d in tensor.shape.dim]
    fixed = [isinstance(size, int) and size > 0 for size in found]
    if tensor.elem_type != elem_type or len(found) != len(dims) or any(
            is_fixed != (expected is None)
            for expected, is_fixed in zip(dims, fixed, strict=True)):
        raise InputError(f"{path.name}: {name} must be {type_names[elem_type]} {shape} "
                         f"(a dynamic batch, fixed sizes where N), found type "
                         f"{tensor.elem_type} shape {found}")
    return found


def _class_names(metadata: dict[str, str], path: Path) -> list[str] | None:
    if "classes" not in metadata:
        return None
    try:
        names = json.loads(metadata["classes"])
    except json.JSONDecodeError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InputError(f"{path.name}: metadata 'classes' must be a JSON list of names")
    return names


def _optional_int(metadata: dict[str, str], key: str, path: Path) -> int | None:
    if key not in metadata:
        return None
    try:
        return int(metadata[key])
    except ValueError:
        raise InputError(f"{path.name}: metadata {key!r} must be an integer, "
                         f"got {metadata[key]!r}") from None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"checkpoint not found: {path}") from None
    except OSError as error:
        raise InputError(f"cannot read checkpoint {path}: {error.strerror}") from None


def _parse(payload: bytes, path: Path):
    import onnx  # slow import: only where ONNX files are read
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_model_from_string(payload)
    except (DecodeError, ValueError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"ONNX checkpoint {path} is corrupt or truncated: {first}") from None
    if not model.HasField("graph") or not model.graph.output:
        raise InputError(f"ONNX checkpoint {path} is corrupt or truncated: it has no graph")
    return model


def _external_locations(model) -> list[str]:
    """The ``location`` of every tensor stored outside the file (graph and subgraphs)."""
    locations = []
    for tensor in _all_tensors(model.graph):
        if tensor.data_location == 1:  # TensorProto.EXTERNAL
            entries = {entry.key: entry.value for entry in tensor.external_data}
            locations.append(entries.get("location", ""))
    return locations


def _all_tensors(graph):
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _all_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _all_tensors(subgraph)


def _check_external_location(path: Path, location: str) -> None:
    """Refuse external data outside the model's folder (absolute, ``..``, or a link out)."""
    folder = path.resolve().parent
    relative = PurePath(location)
    target = (folder / relative).resolve()
    if not location or relative.is_absolute() or ".." in relative.parts or \
            os.path.commonpath([folder, target]) != str(folder):
        raise InputError(f"{path.name} points to external data {location!r} outside its "
                         "folder: refused")
    if not target.is_file():
        raise InputError(f"{path.name}: its external data file {location!r} is missing")
