"""Occlusion throughput: `analyzer occlusion`'s batched maps against captum's ``Occlusion``.

Same process, same CPU, same random network (a zoo model with random weights and batch-norm
statistics, eval mode; ``bench/reaction.py``'s), same random images in [0, 1] with random
labels, same square (``--patch``, ``--stride``, fill 0.5). Methods timed, each computing the
target class's softmax probability at every position of every image:

1. ours (torch): :func:`analyzer.occlusion.occlusion_maps` on ``TorchBackend.logits``, as
   ``analyzer occlusion`` runs it on a zoo model on a CPU (channels-last, sub-batches under
   32 MiB of activation), ``--batch`` occluded copies per call.
2. ours (onnx): the same on ``OnnxBackend.logits`` (the exported Reaction graph, of which
   only the path to the logits runs); the export is not timed.
3. captum ``Occlusion(softmax ∘ model).attribute(images, sliding_window_shapes=(1, p, p),
   strides=(1, s, s), baselines=0.5, target=labels, perturbations_per_eval=batch // images)``:
   its batching option, so that its forwards are as large as ours. On the plain model, and on
   a channels-last copy of it (captum's copies go in as they are made; the model's weights
   decide the convolutions' layout).
4. captum with ``perturbations_per_eval=1`` (its default: one forward per position, all images
   in it), and on the channels-last copy with as many as make its forwards as large as our
   backend's CPU sub-batches (activations under 32 MiB; 26 images of Model IV), its best case.

Values: captum returns, per pixel, the mean over the windows covering it of the probability
drop; the same is rebuilt from our map (:func:`attribution_from_map`, not timed) and the
largest difference from ours (torch) printed. Timing: rounds interleave the methods, each
round starting with the next; round 0 (one image) is a warm-up. The table gives the median
over the other rounds of positions (occluded images) per wall-clock second and per process
CPU-second.

    .venv-bench/bin/python bench/occlusion.py --images 2 --patch 10 --stride 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from reaction import CLASSES, IMAGE_SIZE, load, machine, random_images, random_model
from torch import Tensor, nn

from analyzer.occlusion import OcclusionMaps, occlusion_maps, patch_positions
from analyzer.torch_backend import TorchBackend
from store.spec import ReactionSpec
from trainer.models import gradcam_layer

FILL = 0.5


def attribution_from_map(unoccluded: Tensor, probability: Tensor, patch: int, stride: int,
                         size: tuple[int, int]) -> Tensor:
    """captum's per-pixel attribution from a probability map: for every pixel, the mean of
    p(x) − p(x^(r,c)) over the positions (r, c) whose square covers it (0 where none does)."""
    height, width = size
    total = torch.zeros(len(unoccluded), height, width, dtype=torch.float64)
    count = torch.zeros(height, width, dtype=torch.float64)
    drop = (unoccluded[:, None, None] - probability).double()
    for a, r in enumerate(patch_positions(height, patch, stride)):
        for b, c in enumerate(patch_positions(width, patch, stride)):
            total[:, r:r + patch, c:c + patch] += drop[:, a, b, None, None]
            count[r:r + patch, c:c + patch] += 1
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


class Ours:
    """``occlusion_maps`` on one of our backends' ``logits``."""

    def __init__(self, logits: Callable[[Tensor], Tensor], args: argparse.Namespace) -> None:
        self.logits, self.args = logits, args

    def run(self, images: Tensor, labels: Tensor) -> OcclusionMaps:
        return occlusion_maps(self.logits, images, labels, self.args.patch, self.args.stride,
                              FILL, self.args.batch)

    def attribution(self, maps: OcclusionMaps) -> Tensor:
        return attribution_from_map(maps.unoccluded_probability, maps.probability,
                                    self.args.patch, self.args.stride, IMAGE_SIZE)


class Captum:
    """captum's ``Occlusion`` on the softmax of the model."""

    def __init__(self, model: nn.Module, args: argparse.Namespace, per_eval: int | None) -> None:
        from captum.attr import Occlusion

        self.occlusion = Occlusion(lambda x: torch.softmax(model(x), dim=1))
        self.args, self.per_eval = args, per_eval

    def run(self, images: Tensor, labels: Tensor) -> Tensor:
        per_eval = self.per_eval or max(1, self.args.batch // len(images))
        with torch.no_grad():
            return self.occlusion.attribute(
                images, sliding_window_shapes=(1, self.args.patch, self.args.patch),
                strides=(1, self.args.stride, self.args.stride), baselines=FILL,
                target=labels, perturbations_per_eval=per_eval)

    def attribution(self, attributions: Tensor) -> Tensor:
        return attributions[:, 0].double()


def methods(args: argparse.Namespace) -> dict[str, object]:
    """Every method, on its own copy of the same network."""
    from analyzer.onnx_backend import OnnxBackend
    from analyzer.onnx_export import ExportSettings, ReactionGraphExporter
    from store.onnx_files import OnnxFile

    layer = gradcam_layer(args.model)
    torch_backend = TorchBackend(random_model(args.model), ReactionSpec(layer), "cpu",
                                 channels_last=True)
    exporter = ReactionGraphExporter(random_model(args.model), ExportSettings(ReactionSpec(layer)),
                                     channels=1, image_size=IMAGE_SIZE)
    exporter.load_weights(random_model(args.model).state_dict())
    onnx_file = OnnxFile(Path("bench.onnx"), exporter.model_bytes(), "", exporter.contract)
    onnx_backend = OnnxBackend(onnx_file, "cpu", threads=torch.get_num_threads())
    channels_last = random_model(args.model).to(memory_format=torch.channels_last)
    # the sub-batch our backend cuts a batch into on a CPU (activations under 32 MiB)
    sub_batch = torch_backend._sub_batch_size(torch.zeros(args.batch, 1, *IMAGE_SIZE))
    small = max(1, sub_batch // args.images)
    return {
        "ours (torch)": Ours(torch_backend.logits, args),
        "ours (onnx)": Ours(onnx_backend.logits, args),
        f"captum, perturbations_per_eval={max(1, args.batch // args.images)}":
            Captum(random_model(args.model), args, None),
        f"captum channels_last, perturbations_per_eval={max(1, args.batch // args.images)}":
            Captum(channels_last, args, None),
        "captum, perturbations_per_eval=1": Captum(random_model(args.model), args, 1),
        f"captum channels_last, perturbations_per_eval={small} (our CPU sub-batch)":
            Captum(channels_last, args, small),
    }


def timed(method: object, images: Tensor, labels: Tensor) -> tuple[float, float, Tensor]:
    """(wall seconds, process CPU seconds, result) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = method.run(images, labels)
    return time.perf_counter() - wall, time.process_time() - cpu, result


def benchmark(args: argparse.Namespace) -> list[dict]:
    """Interleaved rounds; the median rates of each method and its largest difference from
    ``ours (torch)``'s attribution."""
    images, labels = random_images(args.images)
    positions = args.images * len(patch_positions(IMAGE_SIZE[0], args.patch, args.stride)) * \
        len(patch_positions(IMAGE_SIZE[1], args.patch, args.stride))
    every = methods(args)
    names = list(every)
    for name in names:  # round 0: warm-up on one image
        timed(every[name], images[:1], labels[:1])
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    results: dict[str, Tensor] = {}
    for round_index in range(args.rounds):
        order = names[round_index % len(names):] + names[:round_index % len(names)]
        for name in order:
            seconds, cpu_seconds, results[name] = timed(every[name], images, labels)
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)
        print(f"round {round_index + 1}/{args.rounds} done; {load()}", flush=True)
    rows = []
    attributions = {name: every[name].attribution(results[name]) for name in names}
    reference = attributions["ours (torch)"]
    for name in names:
        difference = float((attributions[name] - reference).abs().max())
        rows.append({"method": name, "positions": positions,
                     "positions_per_s": positions / statistics.median(wall[name]),
                     "positions_per_cpu_s": positions / statistics.median(cpu[name]),
                     "seconds": statistics.median(wall[name]),
                     "max_abs_difference": difference})
    return rows


def table(rows: list[dict]) -> str:
    """Markdown, with each method's speed against ours (torch)."""
    ours = rows[0]["positions_per_s"]
    lines = ["| method | positions/s | positions/CPU-s | × vs ours (torch) | max abs diff |",
             "|---|---:|---:|---:|---:|"]
    for row in rows:
        difference = f"{row['max_abs_difference']:.1e}"
        lines.append(f"| {row['method']} | {row['positions_per_s']:.1f} | "
                     f"{row['positions_per_cpu_s']:.1f} | {row['positions_per_s'] / ours:.2f} | "
                     f"{difference} |")
    captum = max((r for r in rows if r["method"].startswith("captum")),
                 key=lambda r: r["positions_per_s"])
    for row in rows[:2]:
        lines.append(f"\n{row['method']} / fastest captum ({captum['method']}): "
                     f"{row['positions_per_s'] / captum['positions_per_s']:.2f}x in positions/s, "
                     f"{row['positions_per_cpu_s'] / captum['positions_per_cpu_s']:.2f}x in "
                     "positions/CPU-s")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="example: .venv-bench/bin/python bench/occlusion.py "
                                            "--images 2 --patch 10 --stride 5")
    parser.add_argument("--model", choices=["model2", "model4"], default="model4")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--patch", type=int, default=10)
    parser.add_argument("--stride", type=int, default=5)
    parser.add_argument("--batch", type=int, default=256,
                        help="occluded copies per forward (ours; captum: batch // images "
                             "perturbations per eval)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", metavar="PATH", help="also write the rows here as JSON")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.model} 1x{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}, {CLASSES} classes, {args.images} "
          f"images, patch {args.patch}, stride {args.stride}, batch {args.batch}, "
          f"{args.rounds} interleaved rounds; {machine()}; {load()}", flush=True)
    rows = benchmark(args)
    print(table(rows))
    print(load())
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "machine": machine(), "load": load(), "rows": rows},
                      handle, indent=1)


if __name__ == "__main__":
    main()
