"""Setting up a pass over checkpoints: which files, which backend kind, what is computed.

Shared by ``analyzer reaction`` and ``analyzer cam``, so both read the same files with the same
backend and compute the same Reaction: on a ``trainer run --onnx`` folder the heat maps' titles
show exactly the values stored.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from analyzer.backends import BACKENDS, KINDS, BackendKind, BackendSetup, backend_kind
from analyzer.inputs import AnalysisInputs, find_run_file, resolve_onnx_inputs
from store.checkpoint_files import (
    ONNX_SUFFIXES,
    TORCH_SUFFIXES,
    CheckpointFile,
    discover_checkpoints,
)
from store.errors import InputError
from store.spec import ReactionSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PassRequest:
    """What the user asked for (None: as the files or the run say).

    ``awaiting`` marks a follower: checkpoints whose ONNX twin is not written yet are waited
    for instead of refused. ``onnx_weights`` lets the torch backend read a folder of ONNX
    checkpoints as the weights of the PyTorch network they were exported from (for analyses
    that need the network itself, such as the deconvnet of ``analyzer features``).
    """

    ckpt_dir: Path
    run: Path | None = None
    model: str | None = None
    layer: str | None = None
    data: dict[str, Path] = field(default_factory=dict)
    image_size: tuple[int, int] | None = None
    channels: int | None = None
    splits: list[str] | None = None
    score: str | None = None
    target: str | None = None
    device: str = "auto"
    backend: str = "auto"
    awaiting: bool = False
    onnx_weights: bool = False
    graph_cache: bool = True


@dataclass
class Pass:
    """A pass, ready to run: its checkpoints, inputs, spec and backend kind."""

    checkpoints: list[CheckpointFile]
    ignored: list[Path]
    run_file: Path | None
    inputs: AnalysisInputs
    spec: ReactionSpec
    kind: BackendKind
    suffixes: tuple[str, ...]  # the checkpoint files the pass reads

    @property
    def backend_name(self) -> str:
        """The backend kind's name (``torch``, ``onnx``)."""
        return self.kind.name


def set_up_pass(request: PassRequest, defaults: Mapping[str, str] | None = None) -> Pass:
    """Choose the files and the backend, resolve the inputs and the spec, pick the device.

    Args:
        request: the user's options.
        defaults: settings (layer, score, target) to use where the request names none
            (``cam`` passes the stored results' settings); otherwise the model's layer, the
            logit score and the label target.
    """
    if request.backend not in BACKENDS:
        raise InputError(f"backend must be one of {', '.join(BACKENDS)}, got "
                         f"{request.backend!r}")
    kind_name, native, checkpoints, ignored = _choose_files(request)
    run_file = find_run_file(request.ckpt_dir, request.run)
    kind = backend_kind(kind_name)
    defaults = defaults or {}
    if native and kind.name != "torch":
        inputs, spec = _contract_inputs(request, checkpoints[0], run_file)
    else:
        from analyzer.network import resolve_inputs  # torch: only for PyTorch checkpoints

        inputs = resolve_inputs(first_checkpoint=checkpoints[0], run_file=run_file,
                                model=request.model, layer=request.layer or defaults.get("layer"),
                                data=request.data, image_size=request.image_size,
                                channels=request.channels, splits=request.splits)
        spec = ReactionSpec(inputs.layer, request.score or defaults.get("score", "logit"),
                            request.target or defaults.get("target", "label"))
    device = kind.device(request.device)
    suffixes = KINDS[kind_name].native_suffixes if native else ONNX_SUFFIXES \
        if kind_name == "torch" else TORCH_SUFFIXES
    return Pass(checkpoints, ignored, run_file, inputs, spec,
                kind(BackendSetup(inputs, spec, device, native, request.graph_cache)), suffixes)


def _choose_files(request: PassRequest
                  ) -> tuple[str, bool, list[CheckpointFile], list[Path]]:
    """The backend kind, whether the files are its own, the checkpoints and the files passed
    over. ``auto`` takes the first kind (in registry order) whose own files are in the
    folder; a kind that converts PyTorch checkpoints runs them when it finds none of its own.
    """
    names = list(KINDS) if request.backend == "auto" else [request.backend]
    for name in names:
        found = _discover(request.ckpt_dir, KINDS[name].native_suffixes)
        if found is not None:
            if name != "torch":
                _check_twins(request, name, {c.epoch for c in found[0]})
            return name, True, *found
    if request.backend != "auto" and KINDS[names[0]].converts_torch:
        found = _discover(request.ckpt_dir, TORCH_SUFFIXES)
        if found is not None:
            return names[0], False, *found
    if request.backend == "torch" and request.onnx_weights:
        found = _discover(request.ckpt_dir, ONNX_SUFFIXES)
        if found is not None:
            return "torch", False, *found
    if request.backend == "torch" and any(
            path.suffix.lower() == ".onnx" for path in Path(request.ckpt_dir).iterdir()):
        raise InputError(f"{request.ckpt_dir} holds ONNX checkpoints only: they run on the "
                         "onnx backend (--backend onnx or auto)")
    discover_checkpoints(request.ckpt_dir, suffixes=TORCH_SUFFIXES)  # raises its own error
    raise InputError(f"no checkpoint files in {request.ckpt_dir}")


def _discover(folder: Path, suffixes: tuple[str, ...]
              ) -> tuple[list[CheckpointFile], list[Path]] | None:
    try:
        return discover_checkpoints(folder, suffixes=suffixes)
    except InputError as error:
        if str(error).startswith("no checkpoint files"):
            return None
        raise


def _check_twins(request: PassRequest, kind: str, epochs: set[int]) -> None:
    """A folder with files of this kind for only some of its PyTorch checkpoints: refused
    with ``--backend auto`` (which would silently analyse only those), a note otherwise.

    A follower waits for the twins of the checkpoints after the last one written.
    """
    found = _discover(request.ckpt_dir, TORCH_SUFFIXES)
    if found is None:
        return
    missing = sorted({c.epoch for c in found[0]} - epochs)
    if request.awaiting:
        missing = [epoch for epoch in missing if epoch < max(epochs)]
    if not missing:
        return
    shown = ", ".join(map(str, missing[:5])) + (", …" if len(missing) > 5 else "")
    if request.backend == "auto":
        raise InputError(f"{request.ckpt_dir} holds {kind.upper()} files for only some "
                         f"of its checkpoints ({len(missing)} without one: epochs {shown}): "
                         f"choose --backend torch (every PyTorch checkpoint) or --backend "
                         f"{kind} (the {kind.upper()} files only)")
    logger.warning(f"--backend {kind} leaves out {len(missing)} PyTorch checkpoints "
                   f"without an {kind.upper()} file (epochs {shown})")


def _contract_inputs(request: PassRequest, first: CheckpointFile,
                     run_file: Path | None) -> tuple[AnalysisInputs, ReactionSpec]:
    """Inputs and spec from the ONNX files (options that contradict them are refused)."""
    from store.onnx_files import read_onnx_contract

    contract = read_onnx_contract(first.path)
    for name, asked in (("score", request.score), ("target", request.target)):
        exported = getattr(contract.spec, name)
        if asked is not None and asked != exported:
            raise InputError(f"the ONNX checkpoints were exported with {name}={exported}, not "
                             f"{asked}: export them again with 'analyzer export-onnx --{name} "
                             f"{asked}', or analyse PyTorch checkpoints with --backend torch")
    inputs = resolve_onnx_inputs(contract=contract, run_file=run_file, model=request.model,
                                 layer=request.layer, data=request.data,
                                 image_size=request.image_size, channels=request.channels,
                                 splits=request.splits)
    return inputs, contract.spec
