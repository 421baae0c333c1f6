"""The backend interface of the analysis engine, and the registry of backend kinds.

A *backend* is one checkpoint's network, ready to compute: ``compute(images, labels)`` gives
the logits and every image's Reaction for a batch on the backend's device. A *backend kind*
builds backends from the checkpoints of a pass in two steps, so that the engine can prepare the
next checkpoint while the current one computes:

* :meth:`BackendKind.load` reads (and hashes) a checkpoint; it may run in a background thread.
* :meth:`BackendKind.backend` turns what was loaded into a :class:`Backend`, in the thread that
  computes.

A new backend is one module with a :class:`BackendKind` subclass and one line in ``_KINDS``.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch
from torch import Tensor

from store.model_files import CheckpointFile
from store.spec import ReactionSpec

if TYPE_CHECKING:
    from analyzer.inputs import AnalysisInputs


@dataclass
class BatchResult:
    """What one batch yields: logits and, per image, the Reaction and empty-map flag."""

    logits: Tensor
    reaction: Tensor
    empty: Tensor
    cam: Tensor | None = None


class Backend(Protocol):
    """One checkpoint's network on a device (see the module docstring)."""

    name: str

    def compute(self, images: Tensor, labels: Tensor, keep_maps: bool = False) -> BatchResult:
        """Logits ``[B, classes]``, Reaction ``[B]``, empty flags ``[B]`` and, with
        ``keep_maps``, the raw Grad-CAM maps ``[B, h, w]`` of a batch on the device."""
        ...

    def logits(self, images: Tensor) -> Tensor:
        """Logits ``[B, classes]`` of a batch on the device: a forward pass only (no
        gradient, no map), for analyses such as occlusion that need nothing else."""
        ...


@dataclass
class LoadedCheckpoint:
    """A checkpoint read from disk: its SHA-256 and what its backend kind made of it."""

    checkpoint: CheckpointFile
    sha256: str
    content: object


@dataclass(frozen=True)
class BackendSetup:
    """What every backend of a pass shares.

    Attributes:
        inputs: the network (None when each checkpoint carries its own), classes and splits.
        spec: what is computed (layer, score, target, weighting).
        device: where the backends compute.
        native: the checkpoints are this kind's own files (ONNX files for ``onnx``); False
            when the kind converts PyTorch checkpoints.
        graph_cache: a kind that converts may keep what it converts once (the ONNX graph) in
            the persistent cache (store/graph_cache.py).
    """

    inputs: AnalysisInputs
    spec: ReactionSpec
    device: torch.device
    native: bool = True
    graph_cache: bool = True


class BackendKind(ABC):
    """Builds a :class:`Backend` for each checkpoint of one pass."""

    name: ClassVar[str]
    native_suffixes: ClassVar[tuple[str, ...]]  # the checkpoint files this kind reads itself
    converts_torch: ClassVar[bool] = False  # it can also run PyTorch checkpoints

    def __init__(self, setup: BackendSetup) -> None:
        self.setup = setup

    @staticmethod
    @abstractmethod
    def device(requested: str) -> torch.device:
        """The device for ``--device REQUESTED`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``)."""

    @abstractmethod
    def load(self, checkpoint: CheckpointFile) -> LoadedCheckpoint:
        """Read and hash one checkpoint (thread-safe: may run beside a computing backend)."""

    @abstractmethod
    def backend(self, loaded: LoadedCheckpoint) -> Backend:
        """The backend of a loaded checkpoint (called in the computing thread)."""


# name → "module:class", imported on first use (onnxruntime is slow to import). The order is
# ``--backend auto``'s preference: the first kind whose own checkpoint files are in the folder.
_KINDS = {
    "onnx": "analyzer.onnx_backend:OnnxKind",
    "torch": "analyzer.torch_backend:TorchKind",
}
BACKENDS = ("auto", *_KINDS)


def backend_kind(name: str) -> type[BackendKind]:
    """The registered backend kind called ``name``."""
    module, _, attribute = _KINDS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)
