"""`analyzer reaction`: Reaction, accuracy and loss of every checkpoint over every split.

The pass is the engine's three parts in a row (see docs/ENGINE.md):

* *plan* (:mod:`analyzer.plan`): the checkpoints and splits that still lack results; with
  ``--follow``, also each checkpoint written later, once it is complete;
* *compute* (:mod:`analyzer.compute`): one complete result per checkpoint from a backend
  (:mod:`analyzer.backends`: PyTorch or ONNX Runtime);
* *sink* (:class:`store.results.ResultsSink`): stores one result, in place, in
  ``/reaction/<split>`` of the run file or of ``--out``.

Ctrl-C or SIGTERM stops at once; the checkpoint being computed is stored whole or not at all,
and a rerun continues.

``--shard K/N`` analyses one slice of the checkpoints into its own file; under ``torchrun`` the
ranks divide the pending checkpoints and rank 0 alone writes (:mod:`analyzer.distributed`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from analyzer.backends import LoadedCheckpoint
from analyzer.compute import SplitsOnDevice, compute_results, per_image_results
from analyzer.distributed import (
    Ranks,
    gather_devices,
    own_share,
    process_group,
    rank_device,
    results_in_plan_order,
    send_results,
    shard_checkpoints,
    share_plan,
    torchrun_ranks,
)
from analyzer.inputs import find_run_file
from analyzer.pass_setup import Pass, PassRequest, set_up_pass
from analyzer.plan import (
    CheckpointWatcher,
    EpochSelection,
    FollowState,
    PendingCheckpoint,
    plan_pending,
)
from analyzer.start_up import start_up
from analyzer.stopping import StopRequested, StopSignals
from store.checkpoint_files import CHECKPOINT_SUFFIXES, CheckpointFile
from store.errors import InputError
from store.results import ResultsSink
from store.runfile import RUN_FILE, read_run_info
from trainer.allocator import keep_freed_memory

logger = logging.getLogger(__name__)


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
    follow: bool = False  # go on with the checkpoints written after the start
    idle: float | None = None  # with follow: stop after this long without a new checkpoint
    poll: float = 0.5  # with follow: seconds between looks at the folder
    shard: tuple[int, int] | None = None  # (K, N): the K-th of N slices of the checkpoints
    graph_cache: bool = True  # --backend onnx on PyTorch checkpoints: the exported graph cached


@dataclass
class ReactionSummary:
    """What a pass did: the results file, checkpoints stored, and whether it was stopped."""

    path: Path
    analysed: int = 0
    already: int = 0
    stopped: bool = False
    reason: str = ""
    writer: bool = True  # False on the ranks of a torchrun job other than rank 0


def compute_reaction(options: ReactionOptions, progress: bool = True) -> ReactionSummary:
    """Compute and store Reaction for the selected checkpoints (and, with ``follow``, for
    those written later); return what was done."""
    if options.idle is not None and not options.follow:
        raise InputError("--idle applies to --follow only")
    if options.idle is not None and options.idle <= 0:
        raise InputError(f"--idle must be positive, got {options.idle:g}")
    if options.shard is not None and options.follow:
        raise InputError("--shard applies to a post-hoc pass, not to --follow")
    if options.shard is not None and options.out is None:
        raise InputError("--shard needs --out SHARD.h5: each shard writes its own results "
                         "file, joined afterwards by 'analyzer merge'")
    ranks = torchrun_ranks()
    if ranks is not None and options.follow:
        raise InputError("--follow runs in one process: start it without torchrun")
    selection = EpochSelection(options.epochs)
    signals = StopSignals()
    keep_freed_memory()  # no page faults for every batch's tensors (trainer/allocator.py)
    # Under torchrun, SIGTERM keeps its default action: torchrun ends the job with it while a
    # rank waits inside a message, which a Python handler would only see afterwards.
    with signals if ranks is None else contextlib.nullcontext(), \
            process_group(ranks) if ranks is not None else contextlib.nullcontext():
        try:
            if options.follow:
                _wait_for_first_checkpoint(options, selection, signals.requested)
            with start_up() as started:  # no garbage collection while the pass sets up
                analysis = set_up_pass(_request(options, ranks))
                prepared = _prepare(options, analysis, selection)
                started.done()
                return _analyse(options, prepared, selection, signals,
                                progress and (ranks is None or ranks.writer), ranks)
        except StopRequested:
            path = options.out or options.run or Path(options.ckpt_dir).parent / RUN_FILE
            return ReactionSummary(Path(path), stopped=True,
                                   reason="stopped before the first checkpoint")


def _request(options: ReactionOptions, ranks: Ranks | None) -> PassRequest:
    device = options.device if ranks is None else rank_device(options.device, ranks)
    return PassRequest(ckpt_dir=options.ckpt_dir, run=options.run, model=options.model,
                       layer=options.layer, data=options.data, image_size=options.image_size,
                       channels=options.channels, splits=options.splits, score=options.score,
                       target=options.target, device=device, backend=options.backend,
                       awaiting=options.follow, graph_cache=options.graph_cache)


@dataclass
class _Prepared:
    """A pass set up and checked: what its checkpoints loop needs."""

    analysis: Pass
    checkpoints: list[CheckpointFile]  # those selected
    data: SplitsOnDevice
    first: LoadedCheckpoint  # the preflight's checkpoint, not loaded again


def _prepare(options: ReactionOptions, analysis: Pass, selection: EpochSelection
             ) -> _Prepared:
    """Select the checkpoints, put the images on the device and run the preflight."""
    for path in analysis.ignored:
        logger.warning(f"ignoring {path.name} (not a checkpoint with an epoch number)")
    inputs = analysis.inputs
    if not inputs.splits:
        raise InputError("no split with images to analyse")
    checkpoints = analysis.checkpoints
    if options.epochs and not options.follow:
        wanted = set(selection.choose([c.epoch for c in checkpoints]))
        checkpoints = [c for c in checkpoints if c.epoch in wanted]
    else:
        checkpoints = [c for c in checkpoints if c.epoch in selection]
    if options.shard is not None:
        checkpoints = shard_checkpoints(checkpoints, options.shard)
        if not checkpoints:
            logger.warning(f"shard {options.shard[0]}/{options.shard[1]} holds none of the "
                           "checkpoints (more shards than checkpoints)")
    run_file = analysis.run_file
    if options.follow and run_file is not None:  # only epochs committed to the run file
        committed = read_run_info(run_file).completed_epochs
        checkpoints = [c for c in checkpoints if c.epoch <= committed]
    data = SplitsOnDevice(inputs.splits, analysis.kind)
    first = _preflight(analysis, checkpoints[0] if checkpoints else analysis.checkpoints[0],
                       data)
    return _Prepared(analysis, checkpoints, data, first)


def _analyse(options: ReactionOptions, prepared: _Prepared, selection: EpochSelection,
             signals: StopSignals, progress: bool, ranks: Ranks | None) -> ReactionSummary:
    analysis, checkpoints, data, first = (prepared.analysis, prepared.checkpoints,
                                          prepared.data, prepared.first)
    run_file, inputs = analysis.run_file, analysis.inputs
    results_path = _results_path(options, run_file)
    split_names = [split.name for split in inputs.splits]
    device = str(analysis.kind.setup.device)
    if ranks is not None:
        devices = gather_devices(device, ranks)
        if not ranks.writer:
            return _compute_share(options, analysis, data, results_path, checkpoints,
                                  split_names, ranks, first)
    with _open_sink(results_path, analysis, checkpoints,
                    devices if ranks is not None else [device]) as sink:
        return _store_pass(options, analysis, sink, checkpoints, data, selection, signals,
                           progress, ranks, first)


def _store_pass(options: ReactionOptions, analysis: Pass, sink: ResultsSink,
                checkpoints: list[CheckpointFile], data: SplitsOnDevice,
                selection: EpochSelection, signals: StopSignals, progress: bool,
                ranks: Ranks | None, first: LoadedCheckpoint) -> ReactionSummary:
    """Rank 0 or the only process: plan what ``sink`` lacks, compute it, store it
    (``first``: the preflight's checkpoint, not loaded again)."""
    inputs, run_file, results_path = analysis.inputs, analysis.run_file, sink.path
    split_names = [split.name for split in inputs.splits]
    pending = plan_pending(checkpoints, split_names, sink.done, results_path)
    if ranks is not None:
        share_plan(pending, checkpoints, split_names, ranks)
    summary = ReactionSummary(results_path, already=len(checkpoints) - len(pending))
    if not pending and not options.follow:
        logger.warning(f"all {len(checkpoints)} checkpoints already analysed in "
                       f"{results_path}")
        return summary
    watcher = None
    plan: Iterable[PendingCheckpoint] = pending
    if options.follow:
        watcher = CheckpointWatcher(options.ckpt_dir, analysis.suffixes, selection,
                                    {c.epoch for c in checkpoints},
                                    run_file, options.idle, signals.requested, options.poll)
        watcher.state.trained = max((c.epoch for c in checkpoints), default=0)
        if run_file is not None:
            watcher.state.planned = read_run_info(run_file).epochs
        plan = _followed(pending, watcher, split_names)
    bar = _ProgressBar(progress, len(pending), watcher, sink)
    results = compute_results(plan if ranks is None else own_share(pending, ranks),
                              analysis.kind, data, len(inputs.class_names), options.batch_size,
                              first)
    if ranks is not None:
        images = {split.name: len(split.identity.ids) for split in inputs.splits}
        results = results_in_plan_order(pending, results, images, len(inputs.class_names),
                                        ranks)
    try:
        for result in results:
            with signals.writing():
                sink.store(result)
            summary.analysed += 1
            bar.advance(sum(len(r.image_reaction) for r in result.splits.values()))
    except StopRequested:
        signals.requested.set()  # ends a watcher waiting in the background thread
        summary.stopped, summary.reason = True, "stopped by a signal"
    finally:
        bar.close()
    if watcher is not None and not summary.stopped:
        summary.reason = "training finished" if watcher.state.finished else \
            f"no new checkpoint for {options.idle:g} s"
        if run_file != results_path:  # rows grown ahead of the last checkpoint
            sink.trim([c.epoch for c in checkpoints] + sorted(watcher.seen))
    return summary


def _compute_share(options: ReactionOptions, analysis: Pass, data: SplitsOnDevice,
                   results_path: Path, checkpoints: list[CheckpointFile], split_names: list[str],
                   ranks: Ranks, first: LoadedCheckpoint) -> ReactionSummary:
    """A rank other than 0: compute this rank's share of rank 0's plan and send each result
    to rank 0."""
    plan = own_share(share_plan(None, checkpoints, split_names, ranks), ranks)
    summary = ReactionSummary(results_path, writer=False)
    for result in compute_results(plan, analysis.kind, data, len(analysis.inputs.class_names),
                                  options.batch_size, first):
        send_results(result, ranks)
        summary.analysed += 1
    return summary


def _followed(pending: list[PendingCheckpoint], watcher: CheckpointWatcher,
              splits: list[str]) -> Iterator[PendingCheckpoint]:
    """The checkpoints planned at the start, then each new one the watcher yields."""
    yield from pending
    for checkpoint in watcher:
        yield PendingCheckpoint(checkpoint, tuple(splits))


def _wait_for_first_checkpoint(options: ReactionOptions, selection: EpochSelection,
                               stop: threading.Event) -> None:
    """A follower started before the trainer wrote anything waits for its first checkpoint
    (and, with a run file, for that epoch's commit), or until ``--idle`` runs out."""
    watcher = CheckpointWatcher(options.ckpt_dir, CHECKPOINT_SUFFIXES, selection, set(), None,
                                options.idle, stop, options.poll)
    started, announced = time.monotonic(), False
    while True:
        watcher.run_file = find_run_file(options.ckpt_dir, None) if options.run is None \
            else options.run
        if watcher.poll_once():
            return
        if not announced:
            logger.warning(f"waiting for the first checkpoint in {options.ckpt_dir}")
            announced = True
        if options.idle is not None and time.monotonic() - started > options.idle:
            raise InputError(f"no checkpoint in {options.ckpt_dir} after {options.idle:g} s "
                             "(--idle)")
        if stop.wait(options.poll):
            raise StopRequested("stopped while waiting")


def _preflight(analysis: Pass, first: CheckpointFile, data: SplitsOnDevice
               ) -> LoadedCheckpoint:
    """Fail on a model, layer or class-count mismatch before any file is touched; return the
    checkpoint loaded for it (the pass computes it without reading it again)."""
    loaded = analysis.kind.load(first)
    backend = analysis.kind.backend(loaded)
    name = analysis.inputs.splits[0].name
    images, labels = data.tensors[name]
    per_image_results(backend, images[:2], labels[:2], 2, len(analysis.inputs.class_names),
                      first)
    return loaded


def _results_path(options: ReactionOptions, run_file: Path | None) -> Path:
    if options.out is not None:
        return Path(options.out)
    if run_file is None:
        raise InputError(f"no run file beside {options.ckpt_dir}: give --run RUN.h5 or "
                         "--out RESULTS.h5")
    return run_file


def _open_sink(path: Path, analysis: Pass, checkpoints: list[CheckpointFile],
               devices: list[str]) -> ResultsSink:
    """The sink, wanting a row for every checkpoint (and the run's planned epochs in its run
    file, whose epoch axis is the training's), recording ``devices`` as computing rows."""
    axis = {c.epoch for c in analysis.checkpoints} | {c.epoch for c in checkpoints}
    planned: list[int] = []
    if analysis.run_file is not None and path == analysis.run_file:
        planned = list(range(1, read_run_info(path).epochs + 1))
    settings = {**analysis.spec.attributes(), "backend": analysis.backend_name}
    return ResultsSink(path, devices=devices, class_names=analysis.inputs.class_names,
                       images={split.name: split.identity for split in analysis.inputs.splits},
                       settings=settings, epochs=sorted(axis | set(planned)), planned=planned)


class _ProgressBar:
    """Checkpoints analysed; when following, the epochs analysed, trained and planned, and
    how many epochs the analysis lags behind the training."""

    def __init__(self, enabled: bool, pending: int, watcher: CheckpointWatcher | None,
                 sink: ResultsSink) -> None:
        self.watcher = watcher
        self.sink = sink
        self.images = 0
        self.started = time.perf_counter()
        self.bar = tqdm(total=pending, disable=not enabled, unit="ckpt", dynamic_ncols=True)
        if watcher is not None:
            watcher.on_poll = self._show_follow

    def advance(self, images: int) -> None:
        """One more checkpoint stored."""
        self.images += images
        self.bar.update()
        if self.watcher is None:
            rate = self.images / max(time.perf_counter() - self.started, 1e-9)
            self.bar.set_postfix(images_per_s=f"{rate:.0f}")
        else:
            self._show_follow(self.watcher.state)

    def _show_follow(self, state: FollowState) -> None:
        done = min((len(epochs) for epochs in self.sink.done.values()), default=0)
        newest = max((max(epochs, default=0) for epochs in self.sink.done.values()), default=0)
        total = max(state.planned or 0, state.trained, done)
        if self.bar.total != total:
            self.bar.total = total
        self.bar.set_postfix_str(f"analysed {done}, trained {state.trained}/"
                                 f"{state.planned or '?'}, lag {max(state.trained - newest, 0)}"
                                 " epochs")

    def close(self) -> None:
        """Leave the bar as it is."""
        self.bar.close()
