"""The training loop: Adam + cross-entropy, one checkpoint and one run-file row per epoch.

Every epoch's randomness (shuffling, dropout) comes from a generator seeded by
``(seed, epoch)``, so a run resumed after a crash repeats exactly what an uninterrupted run
would have done (on the CPU; CUDA kernels may not be bitwise deterministic).
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import platform
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from store.checkpoints import (
    RESUME_FILE,
    checkpoint_name,
    load_resume_state,
    remove_stale_temporaries,
    save_checkpoint,
    save_resume_state,
)
from store.datasets import (
    DataSource,
    SplitPlan,
    load_split,
    open_source,
    parse_image_size,
    plan_splits,
)
from store.errors import InputError
from store.files import folder_owned
from store.h5io import remove_stale_copies
from store.onnx_files import remove_stale_onnx_temporaries
from store.runfile import (
    CHECKPOINT_DIR,
    RUN_FILE,
    TRAINER_LOCK,
    EpochRecord,
    RunInfo,
    create_run_file,
    lengthen_run,
    read_provenance,
    read_run_info,
    update_provenance,
    write_epoch,
)
from trainer.allocator import keep_freed_memory
from trainer.devices import resolve_device
from trainer.models import ModelSpec, build_model, default_image_size, gradcam_layer

logger = logging.getLogger(__name__)

_PACKAGES = ("reaction", "torch", "numpy", "h5py", "safetensors", "scikit-learn")


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; the defaults are the thesis's (METHOD.md §3) on the embedded digits."""

    data: str = "digits"
    test: str | None = None
    model: str = "small"
    epochs: int = 1000
    batch_size: int = 90
    learning_rate: float = 1e-4
    val_fraction: float = 0.1
    seed: int = 0
    image_size: str | None = None
    channels: int = 1
    onnx: bool = False  # also write epoch_NNNN.onnx with the Grad-CAM graph (docs/ONNX.md)

    def validate(self) -> None:
        """Reject impossible numbers with one clear line."""
        if self.epochs < 1:
            raise InputError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not self.learning_rate > 0:
            raise InputError(f"--lr must be positive, got {self.learning_rate}")
        if self.channels not in (1, 3):
            raise InputError(f"--channels must be 1 or 3, got {self.channels}")


@dataclass(frozen=True)
class SavedCheckpoint:
    """One epoch's checkpoint, just written, and what a writer needs to derive a file from it."""

    path: Path  # checkpoints/epoch_NNNN.safetensors
    epoch: int
    sha256: str
    model: nn.Module  # the live network, holding this epoch's weights: read it, do not change it
    layer: str  # the zoo model's Grad-CAM layer
    channels: int
    image_size: tuple[int, int]
    class_names: list[str]
    model_spec: str  # the zoo spec JSON stored in the checkpoint


class CheckpointWriter(Protocol):
    """Writes a companion file of each epoch's checkpoint (``trainer run --onnx``: its ONNX twin).

    ``name`` says which file it writes; ``"onnx"`` is the writer that ``TrainConfig.onnx`` asks
    for. It runs after the checkpoint is saved and before the epoch is committed to the run
    file, so a reader that sees a committed epoch finds its companion files whole.
    """

    name: str

    def write(self, saved: SavedCheckpoint) -> None:
        """Write the companion file of ``saved`` (atomically, beside it)."""


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The random stream of one epoch, a pure function of the run's seed and the epoch."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


@dataclass
class _Session:
    """What the loop needs in memory: the model, its optimizer, and the data on the device."""

    config: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    num_classes: int
    metadata: dict[str, str]
    image_size: tuple[int, int] = (0, 0)
    writers: Sequence[CheckpointWriter] = ()


def train(config: TrainConfig | None, out: Path, *, resume: bool = False, force: bool = False,
          device: str = "auto", progress: bool = True, command: str = "",
          checkpoint_writers: Sequence[CheckpointWriter] = ()) -> Path:
    """Train ``config`` into ``out``; return the run file's path.

    Args:
        config: training settings. With ``resume``: None for the run's own, or settings
            that equal them (see :func:`resume_config`) but for a larger ``epochs``, which
            lengthens the run.
        out: output folder: ``run.h5``, ``checkpoints/epoch_NNNN.safetensors``, resume file.
        resume: continue the run in ``out`` from its last complete epoch; with a ``config``
            a trainer that began in ``out`` but was killed before creating its run file,
            start the run.
        force: start over even if ``out`` already holds a run.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        progress: show a progress bar.
        command: the command line, for provenance.
        checkpoint_writers: called with each epoch's checkpoint, in order, before the epoch
            is committed; the run's ``onnx`` setting requires (and alone allows) one named
            ``"onnx"``, e.g. ``analyzer.onnx_export.OnnxTwinWriter()``.

    On glibc this raises the process's allocator thresholds for good
    (:func:`trainer.allocator.keep_freed_memory`): faster epochs, the peak memory kept.
    """
    out = Path(out)
    run_path = out / RUN_FILE
    torch_device = resolve_device(device)
    if resume and config is not None and not run_path.exists() \
            and (out / TRAINER_LOCK).exists():  # a trainer began here, killed before its run
        logger.warning(f"nothing to resume in {out} yet: starting the run")
        resume = False
    if resume:
        config = resume_config(out, None if config is None else asdict(config))
    elif config is None:
        raise InputError("train() needs a TrainConfig for a new run")
    else:
        _refuse_existing_run(run_path, force)
        config.validate()
    _check_writers(config, checkpoint_writers)
    keep_freed_memory()  # for the whole process: every batch reuses the last one's buffers
    source, plan, session = _load_session(config, torch_device)
    session.writers = tuple(checkpoint_writers)
    with folder_owned(out, TRAINER_LOCK, f"another trainer is running in {out}"):
        if resume:
            _check_same_splits(plan, run_path)
            _restore(session, out, run_path)
            if config.epochs > read_run_info(run_path).epochs:
                lengthen_run(run_path, config.epochs, config=asdict(config))
        else:
            _refuse_existing_run(run_path, force)  # again: a trainer may have just finished
            _start_new_run(config, source, plan, session, out, command)
        if read_run_info(run_path).completed_epochs < config.epochs:
            _loop(session, out, run_path, torch_device, progress)
            update_provenance(run_path, finished=_now())
        elif not read_provenance(run_path).get("finished"):  # killed after its last commit
            update_provenance(run_path, finished=_now())
    return run_path


def _refuse_existing_run(run_path: Path, force: bool) -> None:
    if run_path.exists() and not force:
        raise InputError(f"{run_path.parent} already holds a run: use --resume to continue it "
                         "or --force to start over")


OPTIONS = {"data": "--data", "test": "--test", "model": "--model", "epochs": "--epochs",
           "batch_size": "--batch-size", "learning_rate": "--lr",
           "val_fraction": "--val-fraction", "seed": "--seed", "image_size": "--image-size",
           "channels": "--channels", "onnx": "--onnx"}  # TrainConfig field -> trainer option


def resume_config(out: Path, given: Mapping[str, object] | None = None) -> TrainConfig:
    """The settings of the run in ``out``, which ``train(..., resume=True)`` continues with.

    Args:
        out: the run folder.
        given: settings the caller names again (``trainer run --resume`` passes the options
            typed on its command line). Each must equal the run's own, except ``epochs``,
            which may be larger: the run is lengthened to it.

    Raises:
        InputError: naming the option, the run's value and the given one, for a setting that
            differs, or an ``epochs`` below the run's.
    """
    run_path = Path(out) / RUN_FILE
    if not run_path.exists():
        raise InputError(f"nothing to resume: {run_path} does not exist")
    info = read_run_info(run_path)
    stored = TrainConfig(**info.config)
    given = dict(given or {})
    for name, value in given.items():
        if name != "epochs" and not _same_setting(name, getattr(stored, name), value, info):
            raise InputError(f"{OPTIONS[name]} {_shown(value)} differs from this run's "
                             f"{_shown(getattr(stored, name))} ({run_path}): --resume "
                             f"continues a run with its own settings; drop {OPTIONS[name]} "
                             "or start another run with --out")
    epochs = int(given.get("epochs", stored.epochs))
    if epochs < stored.epochs:
        raise InputError(f"--epochs {epochs} is below this run's {stored.epochs} "
                         f"({run_path}): a run is lengthened, never shortened; analyse "
                         "fewer epochs with 'analyzer reaction --epochs'")
    return replace(stored, epochs=epochs)


def _same_setting(name: str, stored: object, given: object, info: RunInfo) -> bool:
    """Whether ``given`` names the run's setting ``stored``: equal values, the same folder
    spelled another way, or the image size the run actually has."""
    if stored == given:
        return True
    if name in ("data", "test") and isinstance(stored, str) and isinstance(given, str):
        return Path(stored).exists() and Path(stored).resolve() == Path(given).resolve()
    if name == "image_size" and isinstance(given, str):
        actual = tuple(json.loads(info.model)["image_size"])
        return parse_image_size(given) == (parse_image_size(stored) if stored else actual)
    return False


def _shown(value: object) -> str:
    """A setting as the user would type it (``none`` unset, ``on``/``off`` for a flag)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value is None else str(value)


def _check_writers(config: TrainConfig, writers: Sequence[CheckpointWriter]) -> None:
    """Refuse a run whose ``onnx`` setting and ONNX writer disagree (the twins would be lost)."""
    has_onnx = any(writer.name == "onnx" for writer in writers)
    if config.onnx and not has_onnx:
        raise InputError("the run writes ONNX twins (onnx=True) but no ONNX checkpoint writer "
                         "was given: pass checkpoint_writers=[OnnxTwinWriter()] "
                         "(analyzer.onnx_export)")
    if has_onnx and not config.onnx:
        raise InputError("an ONNX checkpoint writer was given to a run with onnx=False")


def _load_session(config: TrainConfig,
                  device: torch.device) -> tuple[DataSource, SplitPlan, _Session]:
    """Validate every input (data, image size, model) and load the data onto the device."""
    source = open_source(config.data, config.test)
    size = (parse_image_size(config.image_size) if config.image_size
            else source.native_size or default_image_size(config.model))
    plan = plan_splits(source, config.val_fraction, config.seed)
    spec = ModelSpec(config.model, config.channels, size, len(source.class_names))
    torch.manual_seed(config.seed)
    model = build_model(spec).to(device)
    train_set = load_split(source, plan, "train", config.channels, size)
    val_set = load_split(source, plan, "val", config.channels, size)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    metadata = {"model": spec.to_json(), "classes": json.dumps(source.class_names)}
    return source, plan, _Session(config, model, optimizer,
                       torch.as_tensor(train_set.images, device=device),
                       torch.as_tensor(train_set.labels, device=device),
                       torch.as_tensor(val_set.images, device=device),
                       torch.as_tensor(val_set.labels, device=device),
                       len(source.class_names), metadata, tuple(size))


def _start_new_run(config: TrainConfig, source: DataSource, plan: SplitPlan,
                   session: _Session, out: Path, command: str) -> None:
    checkpoints = out / CHECKPOINT_DIR
    try:
        checkpoints.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create {checkpoints}: {error.strerror}") from None
    if not os.access(out, os.W_OK) or not os.access(checkpoints, os.W_OK):
        raise InputError(f"output folder {out} is not writable")
    for stale in [*checkpoints.glob("epoch_*.safetensors"), *checkpoints.glob("epoch_*.onnx")]:
        stale.unlink()
    (out / RESUME_FILE).unlink(missing_ok=True)
    create_run_file(out / RUN_FILE, config=asdict(config), model_json=session.metadata["model"],
                    class_names=plan.class_names, split_ids=plan.ids, split_labels=plan.labels,
                    data_description=source.description,
                    provenance=_provenance(config, command))


def _provenance(config: TrainConfig, command: str) -> dict[str, str]:
    versions = {}
    for package in _PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {"command": command or " ".join(sys.argv), "seed": str(config.seed),
            "host": socket.gethostname(), "user": getpass.getuser(),
            "python": platform.python_version(), "platform": platform.platform(),
            "packages": json.dumps(versions), "started": _now(), "finished": "",
            "resumes": "[]"}


def _now() -> str:
    """Local time in ISO 8601 with its UTC offset, e.g. ``2026-11-27T00:02:57+01:00``."""
    return datetime.now().astimezone().isoformat(timespec="seconds")


def _check_same_splits(plan: SplitPlan, run_path: Path) -> None:
    """Refuse to resume on data that no longer gives the run's recorded splits."""
    recorded = read_run_info(run_path).split_ids
    for split, ids in plan.ids.items():
        if recorded.get(split) != ids:
            raise InputError(f"the {split} images differ from those recorded in {run_path}: "
                             "the data changed since the run started, cannot resume")


def _restore(session: _Session, out: Path, run_path: Path) -> None:
    """Load the resume file; finish its epoch's commit if the crash came just before it."""
    if not (out / CHECKPOINT_DIR).is_dir():
        raise InputError(f"cannot resume: {out / CHECKPOINT_DIR}, the run's checkpoint folder, "
                         "is missing")
    remove_stale_temporaries(out / CHECKPOINT_DIR)
    remove_stale_onnx_temporaries(out / CHECKPOINT_DIR)
    remove_stale_temporaries(out)  # the resume file's
    remove_stale_copies(run_path)
    completed = read_run_info(run_path).completed_epochs
    if completed == 0 and not (out / RESUME_FILE).exists():
        return
    model_state, optimizer_state, metadata = load_resume_state(out / RESUME_FILE)
    resume_epoch = int(metadata["epoch"])
    if resume_epoch == completed + 1:
        write_epoch(run_path, EpochRecord.from_json(metadata["record"]))
    elif resume_epoch != completed:
        raise InputError(f"resume file is at epoch {resume_epoch} but {run_path} has "
                         f"{completed} complete epochs: cannot resume safely")
    session.model.load_state_dict(model_state)
    session.optimizer.load_state_dict(optimizer_state)


def _loop(session: _Session, out: Path, run_path: Path, device: torch.device,
          progress: bool) -> None:
    config = session.config
    start = read_run_info(run_path).completed_epochs + 1
    if start > 1 and start <= config.epochs:
        resumes = json.loads(read_provenance(run_path).get("resumes", "[]"))
        resumed = {"epoch": start, "epochs": config.epochs, "time": _now()}
        update_provenance(run_path, resumes=json.dumps([*resumes, resumed]))
    bar = tqdm(range(start, config.epochs + 1), initial=start - 1, total=config.epochs,
               disable=not progress, unit="epoch", dynamic_ncols=True)
    for epoch in bar:
        began = time.perf_counter()
        train_loss, train_accuracy = _train_one_epoch(session, epoch, device)
        val_class_loss, val_class_accuracy, val_loss, val_accuracy = _validate(session)
        saved = time.perf_counter()
        file_name = checkpoint_name(epoch)
        path = out / CHECKPOINT_DIR / file_name
        sha = save_checkpoint(path, session.model.state_dict(),
                              {**session.metadata, "epoch": str(epoch)})
        _write_companions(session, path, epoch, sha)
        checkpoint_seconds = time.perf_counter() - saved
        record = EpochRecord(epoch, train_loss, train_accuracy, val_loss, val_accuracy,
                             val_class_loss, val_class_accuracy,
                             time.perf_counter() - began, checkpoint_seconds, time.time(),
                             file_name, sha)
        save_resume_state(out / RESUME_FILE, session.model.state_dict(),
                          session.optimizer.state_dict(),
                          {"epoch": str(epoch), "record": record.to_json()})
        write_epoch(run_path, record)
        bar.set_postfix(loss=f"{train_loss:.4f}", acc=f"{train_accuracy:.3f}",
                        val_loss=f"{val_loss:.4f}", val_acc=f"{val_accuracy:.3f}")


def _write_companions(session: _Session, path: Path, epoch: int, sha256: str) -> None:
    """Hand the checkpoint just saved to every checkpoint writer (before the commit)."""
    if not session.writers:
        return
    saved = SavedCheckpoint(path, epoch, sha256, session.model,
                            gradcam_layer(session.config.model), session.config.channels,
                            session.image_size, json.loads(session.metadata["classes"]),
                            session.metadata["model"])
    for writer in session.writers:
        writer.write(saved)


def _train_one_epoch(session: _Session, epoch: int, device: torch.device) -> tuple[float, float]:
    """One pass over the shuffled training split; returns (mean loss, accuracy)."""
    model, optimizer = session.model, session.optimizer
    generator = epoch_generator(session.config.seed, epoch)
    order = torch.randperm(len(session.train_labels), generator=generator).to(device)
    torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))  # dropout stream
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for batch in order.split(session.config.batch_size):
        images, labels = session.train_images[batch], session.train_labels[batch]
        logits = model(images)
        loss = nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(batch)
        correct += (logits.argmax(1) == labels).sum()
    count = len(session.train_labels)
    return float(loss_sum) / count, float(correct) / count


@torch.no_grad()
def _validate(session: _Session) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Per-class and overall loss and accuracy on the validation split, in eval mode."""
    if len(session.val_labels) == 0:
        nan = np.full(session.num_classes, np.nan)
        return nan, nan, float("nan"), float("nan")
    session.model.eval()
    losses, hits = [], []
    for images, labels in zip(session.val_images.split(512), session.val_labels.split(512),
                              strict=True):
        logits = session.model(images)
        losses.append(nn.functional.cross_entropy(logits, labels, reduction="none"))
        hits.append((logits.argmax(1) == labels).double())
    loss, hit, labels = torch.cat(losses).double(), torch.cat(hits), session.val_labels
    counts = torch.bincount(labels, minlength=session.num_classes).double()
    with np.errstate(invalid="ignore", divide="ignore"):
        class_loss = (torch.bincount(labels, loss, session.num_classes) / counts).cpu().numpy()
        class_accuracy = (torch.bincount(labels, hit, session.num_classes) / counts).cpu().numpy()
    return class_loss, class_accuracy, float(loss.mean()), float(hit.mean())
