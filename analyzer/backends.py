"""The backend interface of the analysis engine, and the registry of backend kinds.

A *backend* is one checkpoint's network, ready to compute: ``compute(images, labels)`` gives
the logits and every image's Reaction for a batch on the backend's device. A *backend kind*
builds backends from the checkpoints of a pass in two steps, so that the engine can prepare the
next checkpoint while the current one computes:

* :meth:`BackendKind.load` reads (and hashes) a checkpoint; it may run in a background thread.
* :meth:`BackendKind.backend` turns what was loaded into a :class:`Backend`, in the thread that
  computes.

A new backend is one module with a :class:`BackendKind` subclass and one line in ``KINDS``.

This module imports no torch (it is imported where a tensor is made), so that a pass whose
backend takes NumPy arrays (ONNX Runtime on the CPU) runs without it.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np

from store.checkpoint_files import ONNX_SUFFIXES, TORCH_SUFFIXES, CheckpointFile
from store.spec import ReactionSpec

if TYPE_CHECKING:
    from torch import Tensor

    from analyzer.inputs import AnalysisInputs

    # A batch's values: torch tensors on the device, or NumPy arrays for a backend that
    # takes them (BackendKind.to_device); a backend answers in the type it was given.
    Array = Tensor | np.ndarray


@dataclass
class BatchResult:
    """What one batch yields: logits and, per image, the Reaction and empty-map flag."""

    logits: Array
    reaction: Array
    empty: Array
    cam: Array | None = None


class Backend(Protocol):
    """One checkpoint's network on a device (see the module docstring)."""

    name: str

    def compute(self, images: Array, labels: Array, keep_maps: bool = False) -> BatchResult:
        """Logits ``[B, classes]``, Reaction ``[B]``, empty flags ``[B]`` and, with
        ``keep_maps``, the raw Grad-CAM maps ``[B, h, w]`` of a batch on the device."""
        ...

    def logits(self, images: Array) -> Array:
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
        device: where the backends compute, as torch names it (``cpu``, ``cuda``,
            ``cuda:1``).
        native: the checkpoints are this kind's own files (ONNX files for ``onnx``); False
            when the kind converts PyTorch checkpoints.
        graph_cache: a kind that converts may keep what it converts once (the ONNX graph) in
            the persistent cache (store/graph_cache.py).
    """

    inputs: AnalysisInputs
    spec: ReactionSpec
    device: str
    native: bool = True
    graph_cache: bool = True


class BackendKind(ABC):
    """Builds a :class:`Backend` for each checkpoint of one pass."""

    name: ClassVar[str]

    def __init__(self, setup: BackendSetup) -> None:
        self.setup = setup

    @staticmethod
    @abstractmethod
    def device(requested: str) -> str:
        """The device for ``--device REQUESTED`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``)."""

    def to_device(self, array: np.ndarray) -> Array:
        """``array`` as this kind's backends take it: by default a torch tensor on the
        pass's device (put there once for the whole pass)."""
        import torch  # here, not at the top: a kind that takes NumPy arrays needs no torch

        return torch.as_tensor(array, device=self.setup.device)

    @abstractmethod
    def load(self, checkpoint: CheckpointFile) -> LoadedCheckpoint:
        """Read and hash one checkpoint (thread-safe: may run beside a computing backend)."""

    @abstractmethod
    def backend(self, loaded: LoadedCheckpoint) -> Backend:
        """The backend of a loaded checkpoint (called in the computing thread)."""


@dataclass(frozen=True)
class RegisteredKind:
    """A backend kind as the registry knows it, without importing it.

    Attributes:
        target: ``module:class`` of its :class:`BackendKind`, imported on first use.
        native_suffixes: the checkpoint files it reads itself.
        converts_torch: it can also run PyTorch checkpoints.
    """

    target: str
    native_suffixes: tuple[str, ...]
    converts_torch: bool = False


# The order is ``--backend auto``'s preference: the first kind whose own checkpoint files are
# in the folder. Choosing the files imports no backend (onnxruntime and torch are slow to
# import, and a pass over ONNX files needs no torch).
KINDS = {
    "onnx": RegisteredKind("analyzer.onnx_backend:OnnxKind", ONNX_SUFFIXES, converts_torch=True),
    "torch": RegisteredKind("analyzer.torch_backend:TorchKind", TORCH_SUFFIXES),
}
BACKENDS = ("auto", *KINDS)


def backend_kind(name: str) -> type[BackendKind]:
    """The registered backend kind called ``name``."""
    module, _, attribute = KINDS[name].target.partition(":")
    return getattr(importlib.import_module(module), attribute)
