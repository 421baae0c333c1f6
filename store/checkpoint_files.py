"""Which files in a folder are checkpoints: their suffixes, epoch numbers and SHA-256.

Finding the checkpoints reads no weights (:mod:`store.model_files` and
:mod:`store.checkpoints` do), so it needs no torch: a pass over ONNX files runs without it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from store.errors import InputError

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".pt2", ".onnx")
ONNX_SUFFIXES = (".onnx",)
TORCH_SUFFIXES = tuple(s for s in CHECKPOINT_SUFFIXES if s not in ONNX_SUFFIXES)


@dataclass(frozen=True)
class CheckpointFile:
    """One epoch's checkpoint file."""

    epoch: int
    path: Path


def checkpoint_epoch(name: str) -> int | None:
    """The epoch in a file name: the number after "epoch", else the stem's last number.

    ``epoch_0012.safetensors`` → 12, ``model-epoch=7-step=100.ckpt`` → 7,
    ``ckpt_33.pt`` → 33, ``best.pt`` → None.
    """
    stem = _stem(name)
    after_epoch = re.search(r"epoch[\s_=:.-]*(\d+)", stem, flags=re.IGNORECASE)
    if after_epoch:
        return int(after_epoch[1])
    numbers = re.findall(r"\d+", stem)
    return int(numbers[-1]) if numbers else None


def _stem(name: str) -> str:
    path = PurePosixPath(name)
    return path.stem if path.suffix.lower() in CHECKPOINT_SUFFIXES else path.name


def discover_checkpoints(folder: Path, suffixes: tuple[str, ...] | None = None
                         ) -> tuple[list[CheckpointFile], list[Path]]:
    """Checkpoint files directly in ``folder`` sorted by epoch, and the files passed over.

    A file is passed over when it is hidden, has another suffix (``.tmp`` included) or has
    no epoch number in its name. Two files with the same epoch are an error, except that by
    default an ``.onnx`` file beside a PyTorch checkpoint of its epoch (``trainer run --onnx``
    writes both) is left out. With ``suffixes``, checkpoints of the other kinds are left out
    silently.
    """
    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"checkpoint folder not found: {folder}")
    if not folder.is_dir():
        raise InputError(f"checkpoint folder {folder} is not a folder")
    found: dict[int, Path] = {}
    ignored: list[Path] = []
    for path in sorted(entry for entry in folder.iterdir() if entry.is_file()):
        epoch = checkpoint_epoch(path.name)
        suffix = path.suffix.lower()
        if suffixes is not None and suffix in CHECKPOINT_SUFFIXES and suffix not in suffixes:
            continue
        if path.name.startswith(".") or suffix not in CHECKPOINT_SUFFIXES or epoch is None:
            ignored.append(path)
        elif epoch not in found:
            found[epoch] = path
        elif suffixes is None and {suffix, found[epoch].suffix.lower()} & {".onnx"} and \
                suffix != found[epoch].suffix.lower():
            found[epoch] = path if found[epoch].suffix.lower() == ".onnx" else found[epoch]
        else:
            raise InputError(f"two checkpoints for epoch {epoch}: {found[epoch]} and {path}")
    if not found:
        raise InputError(f"no checkpoint files ({', '.join(suffixes or CHECKPOINT_SUFFIXES)}) "
                         f"with an epoch number in their name in {folder}")
    return [CheckpointFile(epoch, found[epoch]) for epoch in sorted(found)], ignored


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
