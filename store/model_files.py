"""Checkpoint files from other trainers: find one per epoch in a folder and read its weights.

Our own checkpoints are safetensors (:mod:`store.checkpoints`). Other trainers leave PyTorch
pickles (``.pt``, ``.pth``, Lightning's ``.ckpt``), TorchScript archives, or ``torch.export``
programs (``.pt2``). None of them is allowed to run code while it is read:

- pickles load with ``weights_only=True`` only, never with a fallback;
- TorchScript archives load with ``torch.jit.load``, whose unpickler builds TorchScript
  classes only, and give their ``state_dict()``;
- ``.pt2`` archives are inspected before ``torch.export.load``, which would otherwise unpickle
  without the weights-only restriction (pickled weights and constants, sample inputs it
  cannot load safely, opaque objects) and load AOTInductor shared libraries.
"""

from __future__ import annotations

import io
import json
import re
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from store.checkpoint_files import CHECKPOINT_SUFFIXES
from store.checkpoints import load_checkpoint
from store.errors import InputError, first_line

_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt")
# Keys under which trainers nest the weights: Lightning, common tutorials, plain wrappers.
_WEIGHT_KEYS = ("state_dict", "model_state_dict", "model")
_WEIGHTS_ONLY_REFUSAL = "Weights only load failed"


@dataclass
class LoadedWeights:
    """What a checkpoint file yields: weights for a model the caller builds, or a program.

    An ONNX file yields its graph's initializers (``graph_weights``): the weights of the
    network it was exported from under their PyTorch names, beside the graph's constants.
    """

    state_dict: dict[str, torch.Tensor] | None
    module: torch.nn.Module | None
    metadata: dict[str, str] = field(default_factory=dict)
    graph_weights: dict[str, np.ndarray] | None = None

    def weights_for(self, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weights to load into a network whose state dict is ``expected``."""
        if self.graph_weights is not None:
            from store.onnx_weights import state_dict_from_onnx

            return state_dict_from_onnx(self.graph_weights, expected)
        if self.state_dict is None:
            raise InputError("it holds a program, not weights for a network")
        return strip_common_prefix(self.state_dict, set(expected))


def load_weights_file(path: Path) -> LoadedWeights:
    """Read a checkpoint file of any supported kind; InputError with one line if it cannot."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        state_dict, metadata = load_checkpoint(path)
        return LoadedWeights(state_dict, None, metadata)
    if suffix == ".onnx":
        from store.onnx_weights import read_onnx_weights

        graph = read_onnx_weights(path)
        return LoadedWeights(None, None, graph.metadata, graph.initializers)
    if suffix not in (*_PICKLE_SUFFIXES, ".pt2"):
        raise InputError(f"{path}: unsupported checkpoint type {suffix or '(no suffix)'}; "
                         f"expected one of {', '.join(CHECKPOINT_SUFFIXES)}")
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    if suffix == ".pt2":
        return LoadedWeights(None, _load_exported_program(path))
    if _is_torchscript_archive(path):
        return LoadedWeights(_load_torchscript_weights(path), None)
    return LoadedWeights(_weights_in(_load_pickle(path), path), None)


def strip_common_prefix(state_dict: dict[str, torch.Tensor],
                        expected_keys: set[str]) -> dict[str, torch.Tensor]:
    """Drop leading dotted components shared by every key until the keys are ``expected_keys``.

    Handles ``module.`` (DataParallel), ``model.``/``net.`` (Lightning's attribute name) and
    deeper nestings. Returns ``state_dict`` unchanged when its keys already match or when no
    stripping makes them match; the caller then reports the mismatched keys.
    """
    candidate = state_dict
    while set(candidate) != set(expected_keys):
        heads = {key.partition(".")[0] for key in candidate}
        if len(heads) != 1 or not all("." in key for key in candidate):
            return state_dict
        candidate = {key.partition(".")[2]: value for key, value in candidate.items()}
    return candidate


def _corrupt(path: Path, error: BaseException) -> InputError:
    return InputError(f"checkpoint {path} is corrupt or truncated: {first_line(error)}")


def _load_pickle(path: Path) -> object:
    try:
        with warnings.catch_warnings():  # an old pickle protocol: the refusal below says it
            warnings.filterwarnings("ignore", category=UserWarning,
                                    module=r"torch\._weights_only_unpickler")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for damaged files
        if _WEIGHTS_ONLY_REFUSAL not in str(error):
            raise _corrupt(path, error) from None
        reason = _refusal_reason(error)
        if reason.startswith("Unsupported operand"):  # not pickle opcodes at all
            raise InputError(f"checkpoint {path} is corrupt or truncated: not a pickle "
                             f"({reason})") from None
        raise InputError(
            f"{path} holds pickled Python objects that weights_only loading refuses "
            f"({reason}): save a state_dict (torch.save(model.state_dict(), ...)) "
            "or safetensors") from None


def _refusal_reason(error: BaseException) -> str:
    """The global the weights-only unpickler refused, or the first line of its complaint."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    refused = re.search(r"Unsupported global: (GLOBAL \S+)", text)
    if refused:
        return f"unsupported {refused[1]}"
    complaint = text.partition("WeightsUnpickler error:")[2].strip().splitlines()
    return complaint[0].strip() if complaint else first_line(error)


def _weights_in(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a loaded pickle: the dict itself or the one nested under a known key."""
    if not isinstance(loaded, dict):
        raise InputError(f"no weights found in {path}: it holds a {type(loaded).__name__}, "
                         "not a dict of tensors")
    for key in _WEIGHT_KEYS:
        nested = loaded.get(key)
        if isinstance(nested, dict) and _tensors_of(nested):
            return _tensors_of(nested)
    weights = _tensors_of(loaded)
    if not weights:
        keys = ", ".join(map(str, list(loaded)[:8])) or "none"
        raise InputError(f"no weights found in {path} (top-level keys: {keys})")
    return weights


def _tensors_of(mapping: dict) -> dict[str, torch.Tensor]:
    return {str(key): value for key, value in mapping.items() if isinstance(value, torch.Tensor)}


def _archive_entries(path: Path) -> list[str]:
    """Entry names inside a zip archive without the archive's root folder; [] if not a zip."""
    if not zipfile.is_zipfile(path):
        return []
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        raise _corrupt(path, error) from None
    return [name.partition("/")[2] for name in names]


def _is_torchscript_archive(path: Path) -> bool:
    entries = _archive_entries(path)
    return "constants.pkl" in entries or any(name.startswith("code/") for name in entries)


def _load_torchscript_weights(path: Path) -> dict[str, torch.Tensor]:
    """A TorchScript archive's weights; hooks do not fire in scripted code, so not the module."""
    try:
        scripted = torch.jit.load(str(path), map_location="cpu")
    except Exception as error:  # torch raises RuntimeError and others for damaged archives
        raise _corrupt(path, error) from None
    weights = {name: tensor.detach() for name, tensor in scripted.state_dict().items()}
    if not weights:
        raise InputError(f"no weights found in {path}")
    return weights


def _load_exported_program(path: Path) -> torch.nn.Module:
    """A ``torch.export`` program, unflattened so its submodules keep their qualified names.

    ``unflatten`` (not ``program.module()``, which ``exec``s the file's guard code) gives a
    module whose submodules can carry forward hooks, as the Grad-CAM backend needs.
    """
    _refuse_unsafe_pt2(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch-internal deprecation noise
            program = torch.export.load(path)
            return torch.export.unflatten(program)
    except Exception as error:  # torch.export raises many types for files it cannot read
        raise InputError(f"cannot load exported program {path}: {first_line(error)}") from None


def _refuse_unsafe_pt2(path: Path) -> None:
    """InputError if ``torch.export.load`` would unpickle or run native code from ``path``."""
    from torch.export.pt2_archive import constants as pt2  # slow import: only for .pt2
    try:
        with zipfile.ZipFile(path) as archive:
            entries = {name.partition("/")[2]: name for name in archive.namelist()}
            if pt2.ARCHIVE_FORMAT_PATH not in entries:
                raise InputError(f"{path} is not a torch.export archive (torch.export.save)")
            danger = _pt2_danger(archive, entries)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, ValueError, KeyError, TypeError,
            AttributeError) as error:  # damaged zip, or config JSON not shaped as torch writes it
        raise _corrupt(path, error) from None
    if danger:
        raise InputError(f"{path} holds {danger}, which torch.export.load would execute: "
                         "save the model's state_dict (.pt or .safetensors) and pass --model")


def _pt2_danger(archive: zipfile.ZipFile, entries: dict[str, str]) -> str | None:
    """What in a .pt2 archive would be unpickled or run while loading it; None if nothing."""
    from torch.export.pt2_archive import constants as pt2  # slow import: only for .pt2
    for inner, name in entries.items():
        if inner.startswith(pt2.AOTINDUCTOR_DIR):
            return "AOTInductor compiled code"
        if PurePosixPath(inner).name.startswith("serialized_") or (
                inner.endswith(".pt") and inner.startswith((pt2.WEIGHTS_DIR, pt2.CONSTANTS_DIR))):
            return "weights in the legacy pickled format"
        if inner.endswith(("_weights_config.json", "_constants_config.json")):
            payloads = json.loads(archive.read(name))["config"].values()
            if any(payload.get("use_pickle") for payload in payloads):
                return "pickled tensors"
            if any(not payload["path_name"].startswith(pt2.TENSOR_CONSTANT_FILENAME_PREFIX)
                   for payload in payloads if inner.endswith("_constants_config.json")):
                return "custom or opaque objects (pickled)"
        if inner.startswith(pt2.SAMPLE_INPUTS_DIR) and not _loads_weights_only(archive.read(name)):
            # torch retries refused sample inputs as unrestricted pickles
            return "sample inputs that weights_only loading refuses"
    return None


def _loads_weights_only(payload: bytes) -> bool:
    try:
        torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception:  # refused or damaged: either way torch would fall back to full pickle
        return False
    return True
