"""Many processes over one pass: shards (``--shard K/N``) and ranks under ``torchrun``.

The work is parallel over checkpoints. A *shard* takes a fixed slice of the selected
checkpoints (sorted by epoch, every N-th from the K-th, so each slice spans the whole run) into
its own results file, for job arrays without a communicator; ``analyzer merge`` joins the files.

Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) the ranks divide the pending
checkpoints the same way: rank 0 plans and broadcasts the plan, every rank computes its slice on
its own device, and the results travel to rank 0 as tensors (no pickle), which alone writes them
through the sink, each checkpoint as it arrives. The messages go over gloo on every machine:
the results are written from host memory, so CUDA ranks would gain nothing from NCCL.

torch is imported by the functions that talk to other ranks, not with the module: a process
on its own (an ONNX pass on the CPU, say) needs no torch.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from analyzer.plan import PendingCheckpoint
from store.checkpoint_files import CheckpointFile
from store.errors import InputError, first_line
from store.results import CheckpointResults, EpochResult

T = TypeVar("T")
# A rank waits for another's checkpoint for at most this long (one checkpoint of a million
# images on a slow GPU takes minutes); a rank that dies ends the job through torchrun sooner.
TIMEOUT = datetime.timedelta(hours=6)
_SHA_BYTES = 64  # a SHA-256 as hex digits
_DEVICE_BYTES = 64  # room for a device's name


def parse_shard(text: str) -> tuple[int, int]:
    """``--shard K/N`` as ``(K, N)``, with 1 <= K <= N."""
    index, _, count = text.partition("/")
    try:
        shard = int(index), int(count)
    except ValueError:
        shard = (0, 0)
    if not 1 <= shard[0] <= shard[1]:
        raise InputError(f"--shard must be K/N with 1 <= K <= N (e.g. 3/32), got {text!r}")
    return shard


def every_nth(items: Sequence[T], index: int, count: int) -> list[T]:
    """Slice ``index`` (0-based) of ``count``: every ``count``-th item from the ``index``-th."""
    return list(items[index::count])


def shard_checkpoints(checkpoints: Sequence[CheckpointFile],
                      shard: tuple[int, int]) -> list[CheckpointFile]:
    """Shard ``K/N`` of the checkpoints, sorted by epoch: every N-th from the K-th."""
    ordered = sorted(checkpoints, key=lambda checkpoint: checkpoint.epoch)
    return every_nth(ordered, shard[0] - 1, shard[1])


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun job."""

    rank: int
    world: int
    local_rank: int

    @property
    def writer(self) -> bool:
        """Rank 0 alone writes the results file and shows progress and notes."""
        return self.rank == 0


def torchrun_ranks(environ: Mapping[str, str] = os.environ) -> Ranks | None:
    """The ranks torchrun set in the environment, or None for a process on its own (a job of
    one rank included)."""
    if "RANK" not in environ or "WORLD_SIZE" not in environ:
        return None
    try:
        ranks = Ranks(int(environ["RANK"]), int(environ["WORLD_SIZE"]),
                      int(environ.get("LOCAL_RANK", "0")))
    except ValueError:
        raise InputError(f"RANK={environ['RANK']!r}, WORLD_SIZE={environ['WORLD_SIZE']!r} are "
                         "not rank numbers (set by torchrun)") from None
    if not 0 <= ranks.rank < ranks.world:
        raise InputError(f"RANK={ranks.rank} is not below WORLD_SIZE={ranks.world}")
    return ranks if ranks.world > 1 else None


def rank_device(requested: str, ranks: Ranks) -> str:
    """This rank's ``--device``: ``cuda:LOCAL_RANK`` for ``cuda``, and for ``auto`` where CUDA
    is available; otherwise the CPU, with one thread unless ``OMP_NUM_THREADS`` says more."""
    if requested.startswith("cuda:"):
        raise InputError(f"--device {requested}: under torchrun every rank takes "
                         "cuda:LOCAL_RANK; give --device cuda or auto")
    import torch

    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return f"cuda:{ranks.local_rank}"
    if "OMP_NUM_THREADS" not in os.environ:  # torchrun sets 1 when it starts several ranks
        os.environ["OMP_NUM_THREADS"] = "1"  # read by the ONNX backend
        torch.set_num_threads(1)
    return requested


@contextlib.contextmanager
def process_group(ranks: Ranks) -> Iterator[None]:
    """Join the job's process group (gloo) for the ``with`` block; on success, leave it
    together with every other rank, so that no message is cut off."""
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", rank=ranks.rank, world_size=ranks.world,
                                timeout=TIMEOUT)
    except (RuntimeError, ValueError) as error:
        raise InputError(f"rank {ranks.rank}: cannot join the torchrun job: "
                         f"{first_line(error)}") from None
    try:
        yield
        _talk(ranks, "the final barrier", dist.barrier)
    finally:
        dist.destroy_process_group()


def _talk(ranks: Ranks, what: str, call: Callable[..., object], *args: object,
          **kwargs: object) -> object:
    """One collective or point-to-point call; a peer that ended is one line, not a traceback."""
    try:
        return call(*args, **kwargs)
    except RuntimeError as error:  # DistBackendError and gloo's own errors
        raise InputError(f"rank {ranks.rank}: {what} failed ({_reason(error)}): another rank "
                         "ended, its error is above") from None


def _reason(error: BaseException) -> str:
    """Gloo's message without its source location and advice: ``Connection closed by peer
    [127.0.0.1]:52098``."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", first_line(error))
    return text.split(". ")[0].rstrip(".")


def gather_devices(device: str, ranks: Ranks) -> list[str]:
    """Every rank's device, each once, sorted (for the results' ``devices`` attribute)."""
    import torch
    import torch.distributed as dist

    mine = torch.zeros(_DEVICE_BYTES, dtype=torch.uint8)
    name = device.encode()[:_DEVICE_BYTES]
    mine[:len(name)] = torch.frombuffer(bytearray(name), dtype=torch.uint8)
    everyone = [torch.zeros_like(mine) for _ in range(ranks.world)]
    _talk(ranks, "sharing the devices", dist.all_gather, everyone, mine)
    return sorted({bytes(t.numpy()).rstrip(b"\0").decode() for t in everyone})


def share_plan(pending: Sequence[PendingCheckpoint] | None,
               checkpoints: Sequence[CheckpointFile], splits: Sequence[str],
               ranks: Ranks) -> list[PendingCheckpoint]:
    """Rank 0's plan on every rank: a count, then one row per checkpoint (its epoch and a 0/1
    column per split still to compute). Other ranks find the epochs among ``checkpoints``."""
    import torch
    import torch.distributed as dist

    count = torch.tensor([len(pending) if ranks.writer and pending else 0])
    _talk(ranks, "receiving the plan", dist.broadcast, count, src=0)
    table = torch.zeros((int(count), 1 + len(splits)), dtype=torch.int64)
    if ranks.writer and pending:
        for row, item in enumerate(pending):
            table[row, 0] = item.checkpoint.epoch
            for column, split in enumerate(splits, start=1):
                table[row, column] = int(split in item.splits)
    _talk(ranks, "receiving the plan", dist.broadcast, table, src=0)
    if ranks.writer:
        return list(pending or [])
    by_epoch = {checkpoint.epoch: checkpoint for checkpoint in checkpoints}
    plan = []
    for epoch, *flags in table.tolist():
        if epoch not in by_epoch:
            raise InputError(f"rank {ranks.rank}: rank 0 planned epoch {epoch}, which has no "
                             "checkpoint here (every rank must see the same folder)")
        plan.append(PendingCheckpoint(by_epoch[epoch], tuple(
            split for split, flag in zip(splits, flags, strict=True) if flag)))
    return plan


def own_share(plan: Sequence[PendingCheckpoint], ranks: Ranks) -> list[PendingCheckpoint]:
    """The checkpoints this rank computes: every ``world``-th of the plan from its rank."""
    return every_nth(plan, ranks.rank, ranks.world)


_CLASS_FIELDS = ("class_reaction", "accuracy", "loss", "empty_maps")


def send_results(result: CheckpointResults, ranks: Ranks) -> None:
    """Send one checkpoint's results to rank 0: one float64 tensor of every split's values
    (float32, int16 and int32 values travel exactly in float64) and one of their SHA-256."""
    import torch
    import torch.distributed as dist

    values: list[np.ndarray] = []
    hashes = b""
    for split_result in result.splits.values():
        values += [split_result.image_reaction, split_result.prediction,
                   *(getattr(split_result, name) for name in _CLASS_FIELDS),
                   np.array([split_result.model_reaction, split_result.seconds])]
        hashes += split_result.checkpoint_sha256.encode().ljust(_SHA_BYTES, b"\0")
    payload = torch.from_numpy(np.concatenate([np.asarray(v, dtype=np.float64).ravel()
                                               for v in values]))
    what = f"sending epoch {result.epoch}"
    _talk(ranks, what, dist.send, payload, dst=0)
    _talk(ranks, what, dist.send, torch.frombuffer(bytearray(hashes), dtype=torch.uint8), dst=0)


def receive_results(pending: PendingCheckpoint, source: int, images: Mapping[str, int],
                    num_classes: int, ranks: Ranks) -> CheckpointResults:
    """On rank 0: the results of one planned checkpoint, as rank ``source`` sent them."""
    import torch
    import torch.distributed as dist

    sizes = {split: 2 * images[split] + len(_CLASS_FIELDS) * num_classes + 2
             for split in pending.splits}
    payload = torch.empty(sum(sizes.values()), dtype=torch.float64)
    hashes = torch.empty(_SHA_BYTES * len(pending.splits), dtype=torch.uint8)
    what = f"receiving epoch {pending.checkpoint.epoch} from rank {source}"
    _talk(ranks, what, dist.recv, payload, src=source)
    _talk(ranks, what, dist.recv, hashes, src=source)
    values, digests = payload.numpy(), bytes(hashes.numpy())
    splits, start = {}, 0
    for index, split in enumerate(pending.splits):
        count = images[split]
        parts = np.split(values[start:start + sizes[split]],
                         np.cumsum([count, count, *[num_classes] * len(_CLASS_FIELDS)]))
        start += sizes[split]
        per_class = dict(zip(_CLASS_FIELDS, parts[2:6], strict=True))
        per_class["empty_maps"] = per_class["empty_maps"].astype(np.int32)
        sha = digests[index * _SHA_BYTES:(index + 1) * _SHA_BYTES].rstrip(b"\0").decode()
        splits[split] = EpochResult(
            epoch=pending.checkpoint.epoch, image_reaction=parts[0].astype(np.float32),
            prediction=parts[1].astype(np.int16), **per_class,
            model_reaction=float(parts[6][0]), seconds=float(parts[6][1]),
            checkpoint_file=pending.checkpoint.path.name, checkpoint_sha256=sha)
    return CheckpointResults(pending.checkpoint.epoch, splits)


def results_in_plan_order(plan: Sequence[PendingCheckpoint], own: Iterator[CheckpointResults],
                          images: Mapping[str, int], num_classes: int,
                          ranks: Ranks) -> Iterator[CheckpointResults]:
    """On rank 0: every planned checkpoint's results in plan order, each as soon as it is
    there: rank 0's own from ``own``, the others received from the rank that computed them."""
    for index, pending in enumerate(plan):
        source = index % ranks.world
        if source == 0:
            yield next(own)
        else:
            yield receive_results(pending, source, images, num_classes, ranks)
