"""Checkpoint files: one safetensors file per epoch, plus one resume file per run.

A checkpoint holds the model's weights only (parameters and batch-norm buffers) and, in the
safetensors metadata, what is needed to rebuild the model: the zoo spec (JSON), the class
names and the epoch. The resume file additionally holds the optimizer state and the record of
the epoch it was written after. Both are written atomically (temporary file + rename) and
never contain pickles.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from store.errors import InputError
from store.files import write_atomically

CHECKPOINT_FORMAT = "reaction-checkpoint"
RESUME_FORMAT = "reaction-resume"
RESUME_FILE = "resume.safetensors"
_OPTIMIZER_PREFIX = "optimizer."
_MODEL_PREFIX = "model."
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit


def checkpoint_name(epoch: int) -> str:
    """File name of an epoch's checkpoint, e.g. ``epoch_0001.safetensors``."""
    return f"epoch_{epoch:04d}.safetensors"


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the temporary files a killed writer left behind in ``folder``."""
    for stale in Path(folder).glob("*.safetensors.*.tmp"):
        stale.unlink(missing_ok=True)


def save_checkpoint(path: Path, state_dict: dict[str, torch.Tensor],
                    metadata: dict[str, str]) -> str:
    """Write a weights-only checkpoint atomically and return its SHA-256.

    Args:
        path: target file (``.safetensors``).
        state_dict: the model's ``state_dict()`` (parameters and buffers).
        metadata: strings stored in the safetensors header (epoch, model spec, classes).
    """
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()}
    parts = safetensors_parts(tensors, {"format": CHECKPOINT_FORMAT, **metadata})
    write_atomically(path, *parts)
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def safetensors_parts(tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str]) -> list[bytes | memoryview]:
    """The bytes of a safetensors file of ``tensors`` (contiguous, on the CPU), as parts to
    write in turn: the header, then each tensor's own memory, copied nowhere.

    The bytes are those of ``safetensors.torch.save`` with the header's keys sorted, so
    equal weights give equal files (safetensors keeps the metadata in a hash map whose order
    changes from process to process). The tensors' order and dtype names are safetensors'
    own, read from a ``save`` of one-element stand-ins.
    """
    probe = save({name: torch.zeros(1, dtype=tensor.dtype) for name, tensor in tensors.items()})
    probed = json.loads(probe[8:8 + int.from_bytes(probe[:8], "little")])
    header: dict[str, object] = {"__metadata__": metadata}
    buffers, offset = [], 0
    for name in sorted(tensors, key=lambda name: probed[name]["data_offsets"][0]):
        tensor = tensors[name]
        data = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())  # little-endian
        header[name] = {"dtype": probed[name]["dtype"], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(data)]}
        buffers.append(data)
        offset += len(data)
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the format asks
    return [len(text).to_bytes(8, "little") + text, *buffers]


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors checkpoint: ``(state_dict, metadata)``; InputError if unreadable."""
    payload = _read_bytes(path, "checkpoint")
    try:
        tensors = load(payload)
        metadata = _safetensors_metadata(payload)
    except (SafetensorError, ValueError, json.JSONDecodeError) as error:
        raise InputError(f"checkpoint {path} is corrupt or truncated: {error}") from None
    return tensors, metadata


def read_checkpoint_metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors checkpoint, reading only its header; InputError if that
    is unreadable (the tensors are checked when the checkpoint is loaded)."""
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if size > _MAX_HEADER_BYTES:
                raise ValueError(f"header of {size} bytes")
            text = handle.read(size)
        if size == 0 or len(text) != size:
            raise ValueError("the header is cut short")
        header = json.loads(text)
        metadata = header.get("__metadata__", {}) if isinstance(header, dict) else None
        if not isinstance(metadata, dict):
            raise ValueError("the header is not a JSON object")
    except FileNotFoundError:
        raise InputError(f"checkpoint not found: {path}") from None
    except OSError as error:
        raise InputError(f"cannot read checkpoint {path}: {error.strerror}") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise InputError(f"checkpoint {path} is corrupt or truncated: {error}") from None
    return metadata


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise InputError(f"{what} not found: {path}") from None
    except OSError as error:
        raise InputError(f"cannot read {what} {path}: {error.strerror}") from None


def _safetensors_metadata(payload: bytes) -> dict[str, str]:
    header_size = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8:8 + header_size])
    return header.get("__metadata__", {})


def save_resume_state(path: Path, model_state: dict[str, torch.Tensor],
                      optimizer_state: dict, metadata: dict[str, str]) -> None:
    """Write the resume file: model weights, optimizer state and ``metadata``, atomically.

    The optimizer's per-parameter tensors are flattened to ``optimizer.<index>.<name>``;
    its parameter groups (plain numbers and flags) go to the metadata as JSON.
    """
    tensors = {_MODEL_PREFIX + name: t.detach().cpu().contiguous()
               for name, t in model_state.items()}
    for index, state in optimizer_state["state"].items():
        for name, value in state.items():
            tensors[f"{_OPTIMIZER_PREFIX}{index}.{name}"] = \
                torch.as_tensor(value).detach().cpu().contiguous()
    header = {"format": RESUME_FORMAT,
              "optimizer_param_groups": json.dumps(optimizer_state["param_groups"]), **metadata}
    write_atomically(path, *safetensors_parts(tensors, header))


def load_resume_state(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict[str, str]]:
    """Read the resume file: ``(model_state, optimizer_state, metadata)``."""
    tensors, metadata = load_checkpoint(path)
    if metadata.get("format") != RESUME_FORMAT:
        raise InputError(f"{path} is not a resume file")
    model_state = {name.removeprefix(_MODEL_PREFIX): t for name, t in tensors.items()
                   if name.startswith(_MODEL_PREFIX)}
    per_parameter: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = re.fullmatch(re.escape(_OPTIMIZER_PREFIX) + r"(\d+)\.(.+)", name)
        if match:
            per_parameter.setdefault(int(match[1]), {})[match[2]] = tensor
    optimizer_state = {"state": per_parameter,
                       "param_groups": json.loads(metadata.pop("optimizer_param_groups"))}
    return model_state, optimizer_state, metadata
