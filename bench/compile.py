"""Would an opt-in ``--compile`` pay? The torch backend eager against the same backend with its
network wrapped by ``torch.compile`` (inductor), same model, images and CPU; interleaved
rounds, medians; the compiled call's start-up (the first call, which compiles) apart.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/compile.py --model model2 \
        --images 128 --rounds 3
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
    """Print the start-up, each variant's images/s, the ratio and the largest difference."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="model2")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    options = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(ModelSpec(options.model, 1, (50, 200), 13)).eval()
    spec = ReactionSpec(gradcam_layer(options.model))
    images = torch.rand(options.images, 1, 50, 200).to(options.device)
    labels = torch.randint(0, 13, (options.images,)).to(options.device)
    eager = TorchBackend(copy.deepcopy(model), spec, options.device, channels_last=True)
    compiled = TorchBackend(copy.deepcopy(model), spec, options.device, channels_last=True)
    compiled.model = torch.compile(compiled.model)
    began = time.perf_counter()
    compiled.compute(images, labels)
    _synchronize(options.device)
    start_up = time.perf_counter() - began
    seconds: dict[str, list[float]] = {"eager": [], "torch.compile": []}
    results = {}
    for _ in range(options.rounds):
        for name, backend in (("eager", eager), ("torch.compile", compiled)):
            began = time.perf_counter()
            results[name] = backend.compute(images, labels)
            _synchronize(options.device)
            seconds[name].append(time.perf_counter() - began)
    reference, other = results["eager"], results["torch.compile"]
    difference = ((other.reaction - reference.reaction).abs()
                  / reference.reaction.abs().clamp_min(1e-30)).max().item()
    print(f"{options.model} 50x200, {options.images} images on {options.device}, "
          f"{torch.get_num_threads()} CPU threads; "
          f"torch.compile's first call (compiling): {start_up:.1f} s")
    base = statistics.median(seconds["eager"])
    for name, times in seconds.items():
        median = statistics.median(times)
        print(f"  {name:<14} {options.images / median:7.1f} images/s  {base / median:5.2f}x")
    print(f"  Reaction max rel. difference {difference:.1e}, same empty maps: "
          f"{bool(torch.equal(other.empty, reference.empty))}; the compile pays back after "
          f"{_payback(start_up, base, statistics.median(seconds['torch.compile']))}")


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _payback(start_up: float, eager: float, compiled: float) -> str:
    saved = eager - compiled
    return "never (not faster)" if saved <= 0 else f"{start_up / saved:.0f} calls of this size"


if __name__ == "__main__":
    main()
