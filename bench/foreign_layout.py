"""A foreign model's memory layout: the torch backend on a copy of thesis Model II (50x200)
built outside the zoo, in the default layout (channels_last=False, before 2026-12-02) and with
the layout chosen on the first batch (channels_last=None), and that with batch norm folded into
the convolutions (fuse_layers=True, as ``analyzer reaction`` runs it since 2026-12-02, also
decided on the first batch), interleaved rounds, medians.

    OMP_NUM_THREADS=2 .venv/bin/python bench/foreign_layout.py --images 384 --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from analyzer.torch_backend import TorchBackend
from store.spec import ReactionSpec
from trainer.models import ModelSpec, build_model, gradcam_layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="model2")
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()
    torch.manual_seed(0)
    zoo = build_model(ModelSpec(options.model, 1, (50, 200), 13))
    spec = ReactionSpec(gradcam_layer(options.model))
    images = torch.rand(options.images, 1, 50, 200)
    labels = torch.randint(0, 13, (options.images,))
    backends = {"default layout": TorchBackend(copy.deepcopy(zoo), spec, channels_last=False),
                "chosen on the first batch": TorchBackend(copy.deepcopy(zoo), spec,
                                                          channels_last=None),
                "chosen, batch norm folded": TorchBackend(copy.deepcopy(zoo), spec,
                                                          channels_last=None,
                                                          fuse_layers=True)}
    seconds: dict[str, list[float]] = {name: [] for name in backends}
    results = {}
    for _ in range(options.rounds):
        for name, backend in backends.items():
            began = time.perf_counter()
            results[name] = backend.compute(images, labels)
            seconds[name].append(time.perf_counter() - began)
    chosen = backends["chosen on the first batch"]
    same = all(torch.allclose(results["default layout"].reaction, results[name].reaction,
                              rtol=1e-4, atol=1e-6) for name in backends)
    print(f"{options.model} 50x200, {options.images} images, {torch.get_num_threads()} threads, "
          f"chosen layout: {'channels-last' if chosen.channels_last else 'default'}, "
          f"batch norm folded: {backends['chosen, batch norm folded'].batch_norm_folded}, "
          f"same Reaction: {same}")
    base = statistics.median(seconds["default layout"][1:])
    for name, times in seconds.items():
        median = statistics.median(times[1:])  # round 1: the choice's double first batch
        print(f"  {name:<26} {options.images / median:7.1f} images/s  "
              f"{base / median:5.2f}x  (first round {times[0]:.2f} s)")


if __name__ == "__main__":
    main()
