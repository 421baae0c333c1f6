"""Where the Grad-CAM gradient is taken, two places against each other: at the layer itself,
after the layer's max pool (analyzer/pool_cut.py), or, after the pool, at the output of the
dense layer that takes the map (analyzer/dense_cut.py). The torch backend as ``analyzer
reaction`` runs it (CPU, channels-last, batch norm folded, ReLU fused) and ONNX Runtime on the
exported graph (``analyzer export-onnx``'s, batches of 256 as ``analyzer reaction`` runs
them), every thesis model (I-VI) at 50x200 and the demo's model at 8x8, random weights and
batch-norm statistics, the same images for both; interleaved rounds (each starting with the
other variant), medians; the second variant's Reactions against the first's.

    OMP_NUM_THREADS=2 .venv-bench/bin/python bench/pool_cut.py --images 256 --rounds 3 --threads 2
    OMP_NUM_THREADS=2 .venv-bench/bin/python bench/pool_cut.py --compare "after the pool" \
        "at the dense layer"
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from bn_fold import cpu_name, max_rel_diff, random_model

from analyzer.onnx_backend import cpu_session
from analyzer.onnx_export import ExportSettings, ReactionGraphExporter
from analyzer.torch_backend import TorchBackend
from store.onnx_files import EMPTY, IMAGES, LOGITS, REACTION, TARGETS
from store.spec import ReactionSpec
from trainer.models import ModelSpec, build_model, gradcam_layer

MODELS = ("model1", "model2", "model3", "model4", "model5", "model6", "small")
# Each place: (cut_after_pool, cut_at_dense) of the backend and the exporter.
PLACES = {"at the layer": (False, False), "after the pool": (True, False),
          "at the dense layer": (True, True)}
ONNX_BATCH = 256  # analyzer reaction's default --batch-size


def model_and_input(name: str) -> tuple[torch.nn.Module, tuple[int, int, int]]:
    """The zoo model (random weights and batch-norm statistics) and its input shape."""
    torch.manual_seed(0)
    if name == "small":
        return build_model(ModelSpec("small", 1, (8, 8), 10)), (1, 8, 8)
    return random_model(name), (1, 50, 200)


def where(backend: TorchBackend) -> str:
    """Where the backend takes the gradient: the pool's and the dense layer's names."""
    return f"{backend.gradient_pool}, {backend.gradient_dense}"


def torch_runner(model: torch.nn.Module, layer: str, place: str, images: torch.Tensor,
                 labels: torch.Tensor) -> tuple[Callable[[], np.ndarray], str]:
    """A call computing every image's Reaction with the torch backend, its first batch (the
    decisions) already made, and where the gradient is taken."""
    cut_after_pool, cut_at_dense = PLACES[place]
    backend = TorchBackend(model, ReactionSpec(layer), "cpu", channels_last=True,
                           fuse_layers=True, cut_after_pool=cut_after_pool,
                           cut_at_dense=cut_at_dense)
    backend.compute(images[:64], labels[:64])
    return (lambda: backend.compute(images, labels).reaction.numpy()), where(backend)


def onnx_runner(model: torch.nn.Module, layer: str, place: str, shape: tuple[int, int, int],
                images: torch.Tensor, labels: torch.Tensor
                ) -> tuple[Callable[[], np.ndarray], str]:
    """A call computing every image's Reaction with ONNX Runtime on the exported graph."""
    cut_after_pool, cut_at_dense = PLACES[place]
    exporter = ReactionGraphExporter(model, ExportSettings(ReactionSpec(layer)),
                                     channels=shape[0], image_size=shape[1:],
                                     graph_cache=False, cut_after_pool=cut_after_pool,
                                     cut_at_dense=cut_at_dense)
    session = cpu_session(exporter.model_bytes())
    batches = [{IMAGES: part.numpy(), TARGETS: part_labels.numpy()}
               for part, part_labels in zip(images.split(ONNX_BATCH),
                                            labels.split(ONNX_BATCH), strict=True)]

    def run() -> np.ndarray:
        return np.concatenate([session.run([LOGITS, REACTION, EMPTY], feed)[1]
                               for feed in batches])

    run()
    return run, where(exporter.backend)


def timed(run: Callable[[], np.ndarray]) -> tuple[float, float, np.ndarray]:
    """Wall and CPU seconds of one call, and its Reactions."""
    wall, cpu = time.perf_counter(), time.process_time()
    reaction = run()
    return time.perf_counter() - wall, time.process_time() - cpu, reaction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--images", type=int, default=256, help="per thesis model")
    parser.add_argument("--small-images", type=int, default=4096, help="for the demo's model")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compare", nargs=2, choices=list(PLACES), metavar="PLACE",
                        default=["at the layer", "after the pool"],
                        help=f"two of: {', '.join(PLACES)}")
    options = parser.parse_args()
    low, high = variants = tuple(options.compare)
    torch.set_num_threads(options.threads)
    print(f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{options.threads} threads, load average {os.getloadavg()}")
    print(f"| model | backend | images | images/s {low} | {high} | × wall | "
          f"images/CPU-s {low} | {high} | × CPU | pool, dense ({high}) | "
          "max rel diff Reaction |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for name in options.models:
        model, shape = model_and_input(name)
        count = options.small_images if name == "small" else options.images
        generator = torch.Generator().manual_seed(1)
        images = torch.rand(count, *shape, generator=generator)
        labels = torch.randint(0, 10, (count,), generator=generator)
        layer = gradcam_layer(name)
        for backend in ("torch", "onnx"):
            runners, places = {}, {}
            for variant in variants:
                if backend == "torch":
                    runners[variant], places[variant] = torch_runner(model, layer, variant,
                                                                     images, labels)
                else:
                    runners[variant], places[variant] = onnx_runner(model, layer, variant,
                                                                    shape, images, labels)
            walls = {variant: [] for variant in variants}
            cpus = {variant: [] for variant in variants}
            reactions = {}
            for round_index in range(options.rounds):
                order = variants if round_index % 2 == 0 else variants[::-1]
                for variant in order:
                    wall, cpu, reactions[variant] = timed(runners[variant])
                    walls[variant].append(wall)
                    cpus[variant].append(cpu)
            wall = {v: statistics.median(walls[v]) for v in variants}
            cpu = {v: statistics.median(cpus[v]) for v in variants}
            diff = max_rel_diff(torch.from_numpy(reactions[high]),
                                torch.from_numpy(reactions[low]))
            print(f"| {name} | {backend} | {count} | {count / wall[low]:.0f} | "
                  f"{count / wall[high]:.0f} | {wall[low] / wall[high]:.2f} | "
                  f"{count / cpu[low]:.0f} | {count / cpu[high]:.0f} | "
                  f"{cpu[low] / cpu[high]:.2f} | {places[high]} | {diff:.1e} |", flush=True)
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
