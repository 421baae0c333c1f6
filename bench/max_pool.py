"""2x2 max pools without argmax indices (analyzer/max_pool.py) against torch's CPU
``max_pool2d``, which always records them: each of thesis Model II's three pools alone (its
50x200 maps, sub-batches of 27 as the torch backend cuts them), then the torch backend as
``analyzer reaction`` runs the model (batch norm folded, ReLU fused, the gradient at the dense
layer) with and without them, in the channels-last and the default layout; interleaved rounds,
medians, ratios.

    OMP_NUM_THREADS=2 .venv/bin/python bench/max_pool.py --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from bn_fold import cpu_name, max_rel_diff, random_model
from torch import nn

import analyzer.bn_fold
from analyzer.max_pool import IndexFreeMaxPool
from analyzer.torch_backend import TorchBackend
from store.spec import ReactionSpec
from trainer.models import gradcam_layer

POOL_INPUTS = ((27, 32, 48, 198), (27, 64, 22, 97), (27, 128, 9, 46))  # Model II at 50x200
LAYOUTS = {"channels-last": torch.channels_last, "default": torch.contiguous_format}


def medians(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median wall seconds of each call over interleaved rounds (each warmed once)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        call()
    for round_index in range(rounds):
        names = list(calls) if round_index % 2 == 0 else list(calls)[::-1]
        for name in names:
            began = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - began)
    return {name: statistics.median(values) for name, values in times.items()}


def backend(with_index_free_pools: bool, channels_last: bool) -> TorchBackend:
    """Model II's torch backend as ``analyzer reaction`` sets it up, the pools replaced or
    not (the copy is built on the first batch)."""
    torch.manual_seed(0)
    found = analyzer.bn_fold.replaceable_pools
    if not with_index_free_pools:
        analyzer.bn_fold.replaceable_pools = lambda model: []
    try:
        made = TorchBackend(random_model("model2"), ReactionSpec(gradcam_layer("model2")),
                            "cpu", channels_last=channels_last, fuse_layers=True,
                            cut_after_pool=True, cut_at_dense=True)
        made.compute(torch.rand(64, 1, 50, 200), torch.zeros(64, dtype=torch.long))
    finally:
        analyzer.bn_fold.replaceable_pools = found
    assert made.pools_without_indices == with_index_free_pools
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--images", type=int, default=384)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    print(f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{options.threads} threads, load average {os.getloadavg()}")
    print("\n| pool input | layout | max_pool2d ms | without indices ms | × |")
    print("|---|---|---:|---:|---:|")
    pool = IndexFreeMaxPool()
    for shape in POOL_INPUTS:
        for layout, memory_format in LAYOUTS.items():
            maps = torch.rand(shape).contiguous(memory_format=memory_format)
            assert torch.equal(pool(maps), nn.functional.max_pool2d(maps, 2))
            seconds = medians({"torch": lambda maps=maps: nn.functional.max_pool2d(maps, 2),
                               "ours": lambda maps=maps: pool(maps)}, options.rounds * 5)
            print(f"| {list(shape)} | {layout} | {seconds['torch'] * 1e3:.2f} | "
                  f"{seconds['ours'] * 1e3:.2f} | {seconds['torch'] / seconds['ours']:.2f} |",
                  flush=True)
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(options.images, 1, 50, 200, generator=generator)
    labels = torch.randint(0, 13, (options.images,), generator=generator)
    print(f"\n| Model II, {options.images} images, batches of 64 | with indices s | "
          "without s | × | max rel diff Reaction |")
    print("|---|---:|---:|---:|---:|")
    for layout in LAYOUTS:
        backends = {indices: backend(indices, layout == "channels-last")
                    for indices in (False, True)}

        def run(made: TorchBackend) -> torch.Tensor:
            return torch.cat([made.compute(part, part_labels).reaction for part, part_labels
                              in zip(images.split(64), labels.split(64), strict=True)])

        seconds = medians({indices: lambda made=made: run(made)
                           for indices, made in backends.items()}, options.rounds)
        diff = max_rel_diff(run(backends[True]), run(backends[False]))
        print(f"| {layout} layout | {seconds[False]:.3f} | {seconds[True]:.3f} | "
              f"{seconds[False] / seconds[True]:.2f} | {diff:.1e} |", flush=True)
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
