"""Batch norm folded and ReLU fused into the convolutions: the torch backend as the zoo runs it
(CPU, channels-last) without ``fuse_layers``, with it but no ReLU fused (batch norm folded
only), and with it (folded and fused, as ``analyzer reaction`` runs), every thesis model (I-VI)
at 50x200, random weights and batch-norm statistics, interleaved rounds, medians of CPU
seconds; every variant's Reactions against the unfolded model run in float64 (the first
``--checked`` images). Each backend's first-batch decision is made before the timed rounds.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bn_fold.py --images 128 --rounds 5 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import statistics
import time

import torch
from torch import nn

import analyzer.bn_fold
from analyzer.backends import BatchResult
from analyzer.torch_backend import TorchBackend
from store.spec import ReactionSpec
from trainer.models import ModelSpec, build_model, gradcam_layer

MODELS = ("model1", "model2", "model3", "model4", "model5", "model6")
VARIANTS = ("unfolded", "folded", "fused")


def random_model(name: str) -> nn.Module:
    """Zoo model ``name`` at 50x200, 13 classes, with non-trivial batch-norm statistics."""
    model = build_model(ModelSpec(name, 1, (50, 200), 13))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
    return model


def max_rel_diff(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest |candidate - reference| / max |reference|."""
    scale = float(reference.abs().max()) or 1.0
    return float((candidate - reference).abs().max()) / scale


def cpu_name() -> str:
    """The CPU's model name (``lscpu``'s), else the machine type."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def float64_error(result: BatchResult, exact: torch.Tensor) -> float:
    """Largest |Reaction - float64 Reaction| / |float64 Reaction| over the checked images."""
    got = result.reaction[:len(exact)].double()
    return float(((got - exact).abs() / exact.abs().clamp(min=1e-30)).max())


@contextlib.contextmanager
def no_relu_fused(variant: str):
    """For the "folded" variant, the computing copy is built with no ReLU to fuse."""
    fusable = analyzer.bn_fold.fusable_relus
    if variant == "folded":
        analyzer.bn_fold.fusable_relus = lambda *_: []
    try:
        yield
    finally:
        analyzer.bn_fold.fusable_relus = fusable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checked", type=int, default=64)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    torch.manual_seed(0)
    images = torch.rand(options.images, 1, 50, 200)
    labels = torch.randint(0, 13, (options.images,))
    backends, float64 = {}, {}
    for name in options.models:
        model, spec = random_model(name), ReactionSpec(gradcam_layer(name))
        float64[name] = TorchBackend(copy.deepcopy(model).double(), spec, "cpu")
        for variant in VARIANTS:
            backend = TorchBackend(copy.deepcopy(model), spec, "cpu", channels_last=True,
                                   fuse_layers=variant != "unfolded")
            with no_relu_fused(variant):
                backend.compute(images[:4], labels[:4])  # the first-batch decision
            backends[name, variant] = backend
    print(f"{cpu_name()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {options.images} images of 1x50x200, "
          f"{options.rounds} interleaved rounds; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    seconds: dict[tuple[str, str], list[float]] = {key: [] for key in backends}
    results = {}
    for _ in range(options.rounds):
        for key, backend in backends.items():
            began = time.process_time()
            results[key] = backend.compute(images, labels)
            seconds[key].append(time.process_time() - began)
    print("| model | folded pairs | fused ReLUs | unfolded images/CPU-s | folded | folded, "
          "fused | folded / unfolded | fused / folded | fused / unfolded "
          "| Reaction: max diff / max (fused) | logits: max diff / max (fused) "
          "| float64 error unfolded | float64 error fused |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    checked = slice(0, options.checked)
    for name in options.models:
        plain, folded, fused = (backends[name, variant] for variant in VARIANTS)
        assert not plain.batch_norm_folded and folded.batch_norm_folded
        assert not folded.relu_fused and fused.relu_fused
        rates = {v: options.images / statistics.median(seconds[name, v]) for v in VARIANTS}
        a, b = results[name, "unfolded"], results[name, "fused"]
        exact = float64[name].compute(images[checked].double(), labels[checked]).reaction
        print(f"| {name} | {len(fused._folded.folds)} | {fused._folded.fused_relus} "
              f"| {rates['unfolded']:.1f} | {rates['folded']:.1f} | {rates['fused']:.1f} "
              f"| {rates['folded'] / rates['unfolded']:.2f}x "
              f"| {rates['fused'] / rates['folded']:.2f}x "
              f"| {rates['fused'] / rates['unfolded']:.2f}x "
              f"| {max_rel_diff(b.reaction, a.reaction):.1e} "
              f"| {max_rel_diff(b.logits, a.logits):.1e} "
              f"| {float64_error(a, exact):.1e} | {float64_error(b, exact):.1e} |")
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
