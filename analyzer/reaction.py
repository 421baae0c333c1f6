"""`analyzer reaction`: Reaction, accuracy and loss of every checkpoint over every split.

The images of every split are loaded and preprocessed once and stay on the device; the next
checkpoint is read (and hashed) in a background thread while the current one computes.
Results go into ``/reaction/<split>`` of the run file (or of ``--out``), one checkpoint at a
time, so an interrupted run resumes where it stopped.

Two backends: PyTorch, and ONNX Runtime (:mod:`analyzer.onnx_backend`) for ``.onnx``
checkpoints or ``--backend onnx``, which converts PyTorch checkpoints on the fly; there the
background thread also builds the next checkpoint's inference session.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from analyzer.aggregate import summarise_classes
from analyzer.inputs import (
    AnalysisInputs,
    SplitData,
    find_run_file,
    resolve_inputs,
    resolve_onnx_inputs,
)
from analyzer.torch_backend import TorchBackend
from store.checkpoints import sha256_file
from store.errors import InputError
from store.model_files import (
    CHECKPOINT_SUFFIXES,
    CheckpointFile,
    LoadedWeights,
    discover_checkpoints,
    load_weights_file,
    strip_common_prefix,
)
from store.results import (
    EpochResult,
    check_results_target,
    computed_checkpoints,
    create_results_file,
    prepare_split,
    write_epoch_result,
)
from store.runfile import read_run_info
from trainer.train import resolve_device

if TYPE_CHECKING:
    from analyzer.onnx_backend import OnnxBackend

BACKENDS = ("auto", "torch", "onnx")
_TORCH_SUFFIXES = tuple(s for s in CHECKPOINT_SUFFIXES if s != ".onnx")


@dataclass(frozen=True)
class ReactionOptions:
    """The options of `analyzer reaction` (see its ``--help``)."""

    ckpt_dir: Path
    run: Path | None = None
    out: Path | None = None
    model: str | None = None
    layer: str | None = None
    data: dict[str, Path] = field(default_factory=dict)
    image_size: tuple[int, int] | None = None
    channels: int | None = None
    splits: list[str] | None = None
    epochs: str | None = None
    score: str | None = None  # None: "logit", or what the ONNX checkpoints were exported with
    target: str | None = None  # None: "label", or likewise
    device: str = "auto"
    batch_size: int = 256
    backend: str = "auto"


def parse_epochs(text: str, available: list[int]) -> list[int]:
    """Select epochs: ``"1:1000:10"`` (start:stop:step, stop included), ``"5"``, ``"1,10,100"``.

    Ranges keep the epochs that have a checkpoint; a single epoch without one, or a selection
    that keeps none, is an error.
    """
    chosen: set[int] = set()
    have = set(available)
    for part in text.split(","):
        numbers = part.strip().split(":")
        try:
            values = [int(n) for n in numbers]
        except ValueError:
            raise InputError(f"--epochs: {part!r} is not N, START:STOP or START:STOP:STEP") \
                from None
        if len(values) == 1:
            if values[0] not in have:
                raise InputError(f"no checkpoint for epoch {values[0]}")
            chosen.add(values[0])
        elif len(values) in (2, 3) and (len(values) == 2 or values[2] > 0):
            start, stop, step = values[0], values[1], values[2] if len(values) == 3 else 1
            chosen |= {epoch for epoch in have
                       if start <= epoch <= stop and (epoch - start) % step == 0}
        else:
            raise InputError(f"--epochs: {part!r} is not N, START:STOP or START:STOP:STEP")
    if not chosen:
        raise InputError(f"--epochs {text} selects none of the {len(have)} checkpoints "
                         f"(epochs {min(have, default=0)}–{max(have, default=0)})")
    return sorted(chosen)


def compute_reaction(options: ReactionOptions, progress: bool = True) -> Path:
    """Compute and store Reaction for the selected checkpoints; return the results file."""
    if options.backend not in BACKENDS:
        raise InputError(f"backend must be one of {', '.join(BACKENDS)}, got {options.backend!r}")
    checkpoints, ignored, onnx_files = _discover(options)
    for path in ignored:
        print(f"note: ignoring {path.name} (not a checkpoint with an epoch number)",
              file=sys.stderr)
    axis = {c.epoch for c in checkpoints}
    if options.epochs:
        wanted = set(parse_epochs(options.epochs, [c.epoch for c in checkpoints]))
        checkpoints = [c for c in checkpoints if c.epoch in wanted]
    run_file = find_run_file(options.ckpt_dir, options.run)
    results_path = _results_path(options, run_file)
    if onnx_files:
        options, inputs = _onnx_file_inputs(options, checkpoints[0], run_file)
    else:
        options = replace(options, score=options.score or "logit",
                          target=options.target or "label")
        inputs = resolve_inputs(first_checkpoint=checkpoints[0], run_file=run_file,
                                model=options.model, layer=options.layer, data=options.data,
                                image_size=options.image_size, channels=options.channels,
                                splits=options.splits)
    if not inputs.splits:
        raise InputError("no split with images to analyse")
    backend_name = "onnx" if onnx_files or options.backend == "onnx" else TorchBackend.name
    device = _device(backend_name, options.device)
    load = _loader(backend_name, onnx_files, inputs, options, device)
    _preflight(load, checkpoints[0], inputs, options, device)
    if results_path == run_file:
        axis |= set(range(1, read_run_info(run_file).epochs + 1))
    _prepare_results(results_path, inputs, sorted(axis), options, str(device), backend_name)
    pending = _pending(results_path, inputs.splits, checkpoints)
    if not pending:
        print(f"all {len(checkpoints)} checkpoints already analysed in {results_path}",
              file=sys.stderr)
        return results_path
    _run(pending, load, inputs, results_path, options, device, progress)
    return results_path


def _device(backend_name: str, requested: str) -> torch.device:
    if backend_name == TorchBackend.name:
        return resolve_device(requested)
    from analyzer.onnx_backend import onnx_device

    return onnx_device(requested)


def _discover(options: ReactionOptions) -> tuple[list[CheckpointFile], list[Path], bool]:
    """The checkpoints to analyse, the files passed over, and whether they are ONNX files.

    ``auto`` takes the ONNX files of a folder that has them (``trainer run --onnx`` writes
    both kinds), else the PyTorch ones; ``onnx`` converts PyTorch checkpoints when the folder
    has no ONNX file.
    """
    if options.backend != "torch":
        try:
            found = discover_checkpoints(options.ckpt_dir, suffixes=(".onnx",))
        except InputError as error:
            if not str(error).startswith("no checkpoint files"):
                raise
        else:
            _check_onnx_twins(options, {c.epoch for c in found[0]})
            return found[0], found[1], True
    try:
        checkpoints, ignored = discover_checkpoints(options.ckpt_dir, suffixes=_TORCH_SUFFIXES)
    except InputError as error:
        if options.backend == "torch" and str(error).startswith("no checkpoint files") and \
                any(p.suffix.lower() == ".onnx" for p in Path(options.ckpt_dir).iterdir()):
            raise InputError(f"{options.ckpt_dir} holds ONNX checkpoints only: they run on "
                             "the onnx backend (--backend onnx or auto)") from None
        raise
    return checkpoints, ignored, False


def _check_onnx_twins(options: ReactionOptions, onnx_epochs: set[int]) -> None:
    """A folder with ONNX files for only some of its PyTorch checkpoints: refused with
    ``--backend auto`` (which would silently analyse only those), a note with ``onnx``."""
    try:
        torch_files, _ = discover_checkpoints(options.ckpt_dir, suffixes=_TORCH_SUFFIXES)
    except InputError:
        return  # no PyTorch checkpoints beside them
    missing = sorted({c.epoch for c in torch_files} - onnx_epochs)
    if not missing:
        return
    shown = ", ".join(map(str, missing[:5])) + (", …" if len(missing) > 5 else "")
    if options.backend == "auto":
        raise InputError(f"{options.ckpt_dir} holds ONNX files for only some of its "
                         f"checkpoints ({len(missing)} without one: epochs {shown}): choose "
                         "--backend torch (every PyTorch checkpoint) or --backend onnx (the "
                         "ONNX files only)")
    print(f"note: --backend onnx leaves out {len(missing)} PyTorch checkpoints without an ONNX "
          f"file (epochs {shown})", file=sys.stderr)


def _onnx_file_inputs(options: ReactionOptions, first: CheckpointFile,
                      run_file: Path | None) -> tuple[ReactionOptions, AnalysisInputs]:
    """Score and target from the ONNX files (options that contradict them are refused)."""
    from store.onnx_files import read_onnx_contract

    contract = read_onnx_contract(first.path)
    for name, asked, exported in (("score", options.score, contract.score),
                                  ("target", options.target, contract.target)):
        if asked is not None and asked != exported:
            raise InputError(f"the ONNX checkpoints were exported with {name}={exported}: "
                             f"export them again with 'analyzer export-onnx --{name} {asked}', "
                             "or analyse PyTorch checkpoints with --backend torch")
    options = replace(options, score=contract.score, target=contract.target)
    inputs = resolve_onnx_inputs(contract=contract, run_file=run_file, model=options.model,
                                 layer=options.layer, data=options.data,
                                 image_size=options.image_size, channels=options.channels,
                                 splits=options.splits)
    return options, inputs


def _preflight(load: Callable[[CheckpointFile], _Loaded], first: CheckpointFile,
               inputs: AnalysisInputs, options: ReactionOptions, device: torch.device) -> None:
    """Fail on a model, layer or class-count mismatch before any file is touched."""
    backend = _backend_for(load(first), _initial_backend(inputs, options, device), inputs,
                           options, device)
    split = inputs.splits[0]
    images = torch.as_tensor(split.images[:2], device=device)
    labels = torch.as_tensor(split.identity.labels[:2], device=device)
    _per_image(backend, images, labels, 2, len(inputs.class_names), first)


def _results_path(options: ReactionOptions, run_file: Path | None) -> Path:
    if options.out is not None:
        return Path(options.out)
    if run_file is None:
        raise InputError(f"no run file beside {options.ckpt_dir}: give --run RUN.h5 or "
                         "--out RESULTS.h5")
    return run_file


def _prepare_results(path: Path, inputs: AnalysisInputs, epochs: list[int],
                     options: ReactionOptions, device: str, backend_name: str) -> None:
    """Create or check the results groups, with rows for ``epochs`` (every checkpoint's)."""
    if path.exists():
        check_results_target(path, inputs.class_names,
                             {split.name: split.identity for split in inputs.splits})
    else:
        try:
            create_results_file(path, inputs.class_names)
        except OSError as error:
            raise InputError(f"cannot write {path}: {error.strerror or error}") from None
    settings = {"layer": inputs.layer, "score": options.score, "target": options.target,
                "backend": backend_name}
    for split in inputs.splits:
        prepare_split(path, split.name, epochs=epochs, class_names=inputs.class_names,
                      images=split.identity, settings=settings, device=device)


def _pending(path: Path, splits: list[SplitData],
             checkpoints: list[CheckpointFile]) -> list[tuple[CheckpointFile, list[SplitData]]]:
    """Each checkpoint with the splits whose results it still lacks.

    A checkpoint whose results are stored is hashed again: if the file changed since (another
    training run written over the folder), its stored results are stale and the run stops.
    """
    done = {split.name: computed_checkpoints(path, split.name) for split in splits}
    pending = []
    for checkpoint in checkpoints:
        stored = {done[s.name][checkpoint.epoch] for s in splits
                  if checkpoint.epoch in done[s.name]}
        if stored and stored != {sha256_file(checkpoint.path)}:
            raise InputError(f"{checkpoint.path} changed since its results were stored in "
                             f"{path} (another SHA-256): write the results of the new "
                             "checkpoints to another file with --out")
        todo = [s for s in splits if checkpoint.epoch not in done[s.name]]
        if todo:
            pending.append((checkpoint, todo))
    return pending


@dataclass
class _Loaded:
    checkpoint: CheckpointFile
    weights: LoadedWeights | None
    sha256: str
    ready: OnnxBackend | None = None  # an ONNX Runtime session, built in the background


def _load(checkpoint: CheckpointFile) -> _Loaded:
    return _Loaded(checkpoint, load_weights_file(checkpoint.path), sha256_file(checkpoint.path))


def _loader(backend_name: str, onnx_files: bool, inputs: AnalysisInputs,
            options: ReactionOptions, device: torch.device
            ) -> Callable[[CheckpointFile], _Loaded]:
    """How one checkpoint is read: weights for torch, an inference session for onnx."""
    if backend_name == TorchBackend.name:
        return _load
    from analyzer.onnx_backend import OnnxBackend
    from store.onnx_files import OnnxFile, read_onnx_file

    if onnx_files:
        first: list = []

        def load_onnx(checkpoint: CheckpointFile) -> _Loaded:
            file = read_onnx_file(checkpoint.path)
            first[:] = first or [file]
            if not file.contract.same_computation(first[0].contract):
                raise InputError(f"{checkpoint.path.name} computes Reaction differently from "
                                 f"{first[0].path.name} (layer, score, target, input or "
                                 "classes): analyse them separately")
            return _Loaded(checkpoint, None, file.sha256, OnnxBackend(file, device))
        return load_onnx
    exporter = _exporter(inputs, options)

    def load_converted(checkpoint: CheckpointFile) -> _Loaded:
        from analyzer.onnx_export import checkpoint_bytes

        weights, sha = load_weights_file(checkpoint.path), sha256_file(checkpoint.path)
        if weights.state_dict is None:
            raise InputError(f"{checkpoint.path.name}: --backend onnx converts weights "
                             "files; analyse exported programs with --backend torch")
        payload = checkpoint_bytes(exporter, checkpoint, weights.state_dict, sha)
        file = OnnxFile(checkpoint.path, payload, sha, exporter.contract)
        return _Loaded(checkpoint, None, sha, OnnxBackend(file, device))
    return load_converted


def _exporter(inputs: AnalysisInputs, options: ReactionOptions):
    """The ONNX graph of the network, traced once, for ``--backend onnx`` on torch files."""
    from analyzer.onnx_export import ExportSettings, ReactionGraphExporter

    if inputs.model is None:
        raise InputError("--backend onnx needs the network: give --model, or use "
                         "--backend torch for exported programs")
    settings = ExportSettings(inputs.layer, options.score or "logit", options.target or "label")
    return ReactionGraphExporter(inputs.model, settings, channels=inputs.channels,
                                 image_size=inputs.image_size, class_names=inputs.class_names,
                                 model_spec=inputs.model_spec)


def _initial_backend(inputs: AnalysisInputs, options: ReactionOptions,
                     device: torch.device) -> TorchBackend | None:
    if inputs.model is None or options.backend == "onnx":
        return None
    return TorchBackend(inputs.model, inputs.layer, device, options.score, options.target,
                        channels_last=inputs.model_spec is not None)  # zoo models only


def _prefetched(pending: list[tuple[CheckpointFile, list[SplitData]]],
                load: Callable[[CheckpointFile], _Loaded]
                ) -> Iterator[tuple[_Loaded, list[SplitData]]]:
    """Yield each checkpoint loaded, reading the next one in the background meanwhile."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(load, pending[0][0])
        for index, (_, splits) in enumerate(pending):
            loaded = future.result()
            if index + 1 < len(pending):
                future = pool.submit(load, pending[index + 1][0])
            yield loaded, splits


def _run(pending: list[tuple[CheckpointFile, list[SplitData]]],
         load: Callable[[CheckpointFile], _Loaded], inputs: AnalysisInputs,
         results_path: Path, options: ReactionOptions, device: torch.device,
         progress: bool) -> None:
    on_device = {split.name: (torch.as_tensor(split.images, device=device),
                              torch.as_tensor(split.identity.labels, device=device))
                 for split in inputs.splits}
    backend = _initial_backend(inputs, options, device)
    bar = tqdm(total=len(pending), disable=not progress, unit="ckpt", dynamic_ncols=True)
    images_done, started = 0, time.perf_counter()
    for loaded, splits in _prefetched(pending, load):
        backend = _backend_for(loaded, backend, inputs, options, device)
        for split in splits:
            began = time.perf_counter()
            images, labels = on_device[split.name]
            per_image = _per_image(backend, images, labels, options.batch_size,
                                   len(inputs.class_names), loaded.checkpoint)
            if not np.isfinite(per_image.loss).all():
                tqdm.write(f"note: {loaded.checkpoint.path.name}: the network's outputs are not "
                           f"finite on {split.name} images (diverged training?): its Reaction "
                           "and loss are stored as NaN", file=sys.stderr)
            write_epoch_result(results_path, split.name, _epoch_result(
                loaded, split, per_image, len(inputs.class_names), time.perf_counter() - began))
            images_done += len(labels)
        bar.update()
        bar.set_postfix(epoch=loaded.checkpoint.epoch,
                        images_per_s=f"{images_done / (time.perf_counter() - started):.0f}")
    bar.close()


def _backend_for(loaded: _Loaded, backend: TorchBackend | None, inputs: AnalysisInputs,
                 options: ReactionOptions, device: torch.device) -> TorchBackend | OnnxBackend:
    """The backend with this checkpoint's weights (a new one for a self-contained program)."""
    if loaded.ready is not None:
        return loaded.ready
    weights = loaded.weights
    if weights.module is not None:
        return TorchBackend(weights.module, inputs.layer, device, options.score, options.target)
    if weights.state_dict is None or backend is None:
        raise InputError(f"{loaded.checkpoint.path.name}: cannot load it into the model: "
                         "give --model")
    expected = set(backend.model.state_dict())
    try:
        backend.load_weights(strip_common_prefix(weights.state_dict, expected))
    except InputError as error:
        raise InputError(f"{loaded.checkpoint.path.name}: {error}") from None
    return backend


@dataclass
class _PerImage:
    reaction: np.ndarray
    prediction: np.ndarray
    loss: np.ndarray


def _per_image(backend: TorchBackend | OnnxBackend, images: torch.Tensor, labels: torch.Tensor,
               batch_size: int, num_classes: int, checkpoint: CheckpointFile) -> _PerImage:
    reactions, predictions, losses = [], [], []
    for batch_images, batch_labels in zip(images.split(batch_size), labels.split(batch_size),
                                          strict=True):
        result = backend.compute(batch_images, batch_labels)
        if result.logits.shape[1] != num_classes:
            raise InputError(f"{checkpoint.path.name}: the model gives "
                             f"{result.logits.shape[1]} class scores but the data has "
                             f"{num_classes} classes")
        reactions.append(result.reaction)
        predictions.append(result.logits.argmax(dim=1))
        losses.append(nn.functional.cross_entropy(result.logits, batch_labels,
                                                  reduction="none"))
    return _PerImage(torch.cat(reactions).cpu().numpy(), torch.cat(predictions).cpu().numpy(),
                     torch.cat(losses).cpu().numpy())


def _epoch_result(loaded: _Loaded, split: SplitData, per_image: _PerImage, num_classes: int,
                  seconds: float) -> EpochResult:
    summary = summarise_classes(per_image.reaction, per_image.prediction, per_image.loss,
                                split.identity.labels, num_classes)
    return EpochResult(
        epoch=loaded.checkpoint.epoch, image_reaction=per_image.reaction,
        prediction=per_image.prediction.astype(np.int16),
        class_reaction=summary.class_reaction, accuracy=summary.accuracy, loss=summary.loss,
        empty_maps=summary.empty_maps, model_reaction=summary.model_reaction, seconds=seconds,
        checkpoint_file=loaded.checkpoint.path.name, checkpoint_sha256=loaded.sha256)
