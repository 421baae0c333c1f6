"""The torch backend's CPU sub-batch budget: the largest activation of a sub-batch under 32 MiB
(glibc's defaults) against larger budgets, in a process that keeps freed memory as `analyzer
reaction` does (trainer/allocator.py), every thesis model side by side.

    OMP_NUM_THREADS=2 .venv/bin/python bench/sub_batch.py --images 256 --rounds 3

Per model (thesis Models I-VI at 1x50x200 and the demo's `small` at 1x8x8, random weights,
13 classes; `small` 10): a `TorchBackend` built as `analyzer reaction` builds a zoo model's
(channels-last, batch norm folded and ReLU fused, the gradient taken after the pool or at the
dense layer where the first batch agrees), then, for each budget in turn (the order rotating
by round), one untimed and one timed `compute` of the same images. Prints the median seconds
per budget, each one's speed against 32 MiB, and the largest difference of its Reactions from
32 MiB's, relative to the largest Reaction.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import analyzer.torch_backend as torch_backend
from analyzer.torch_backend import TorchBackend
from store.spec import ReactionSpec
from trainer.allocator import keep_freed_memory
from trainer.models import ModelSpec, build_model, gradcam_layer

MODELS = ("model1", "model2", "model3", "model4", "model5", "model6", "small")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budgets", default="32,64,128,256", help="MiB, the first the base")
    parser.add_argument("--models", default=",".join(MODELS))
    options = parser.parse_args()
    assert keep_freed_memory(), "glibc did not take the allocator settings"
    budgets = [int(value) for value in options.budgets.split(",")]
    print(f"{options.images} images a model, medians of {options.rounds} rounds, "
          f"{torch.get_num_threads()} threads; seconds (speed against {budgets[0]} MiB, "
          f"largest Reaction difference from it)\n")
    print("| model | " + " | ".join(f"{budget} MiB" for budget in budgets) + " |")
    print("|---|" + "---:|" * len(budgets))
    for name in options.models.split(","):
        print(f"| {name} | " + " | ".join(_measure(name, budgets, options)) + " |")


def _measure(name: str, budgets: list[int], options: argparse.Namespace) -> list[str]:
    torch.manual_seed(0)
    size, classes = ((8, 8), 10) if name == "small" else ((50, 200), 13)
    model = build_model(ModelSpec(name, 1, size, classes)).eval()
    backend = TorchBackend(model, ReactionSpec(gradcam_layer(name)), channels_last=True,
                           fuse_layers=True, cut_after_pool=True, cut_at_dense=True)
    images = torch.rand(options.images, 1, *size)
    labels = torch.randint(0, classes, (options.images,))
    seconds: dict[int, list[float]] = {budget: [] for budget in budgets}
    reactions: dict[int, torch.Tensor] = {}
    for round_index in range(options.rounds):
        shift = round_index % len(budgets)
        for budget in budgets[shift:] + budgets[:shift]:
            torch_backend._KEPT_MEMORY_ACTIVATION_BUDGET = budget << 20
            backend.compute(images, labels)
            began = time.perf_counter()
            reactions[budget] = backend.compute(images, labels).reaction
            seconds[budget].append(time.perf_counter() - began)
    base = statistics.median(seconds[budgets[0]])
    scale = reactions[budgets[0]].abs().max()
    cells = []
    for budget in budgets:
        median = statistics.median(seconds[budget])
        difference = float((reactions[budget] - reactions[budgets[0]]).abs().max() / scale)
        cells.append(f"{median:.3f} ({base / median:.2f}×, {difference:.1e})")
    return cells


if __name__ == "__main__":
    main()
