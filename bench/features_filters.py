"""Time `analyzer features` per checkpoint and its one-backward projection against a loop.

For one zoo model with random weights and random images on one CPU: the search for the
strongest activation of K channels over N images (forward up to the layer only), in batches
of --batch and as the command runs it (sub-batches under glibc's mmap threshold and the
channels-last layout of the Reaction backend), the projection of all K channels in one
backward against K backward passes, one per channel (the two must agree), and the
receptive-field probe. Interleaved rounds, medians.
Results: docs/BENCHMARKS.md.

    python bench/features_filters.py --model model4 --images 1000 --channels 16 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from analyzer.deconvnet import project_to_pixels, receptive_fields, strongest_activations
from analyzer.torch_backend import TorchBackend, find_layer
from store.spec import ReactionSpec
from trainer.models import ModelSpec, build_model, default_image_size, gradcam_layer


def timed(function, *args) -> tuple[float, object]:
    """Seconds and result of ``function(*args)``."""
    began = time.perf_counter()
    value = function(*args)
    return time.perf_counter() - began, value


def one_per_channel(model, module, layer, picked, channels, rows, cols) -> torch.Tensor:
    """The projections with one backward pass per channel (the loop a plain tool runs)."""
    return torch.cat([project_to_pixels(model, module, layer, picked[k:k + 1],
                                        channels[k:k + 1], rows[k:k + 1], cols[k:k + 1]).pixels
                      for k in range(len(channels))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="model4")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    torch.manual_seed(0)
    size = default_image_size(options.model)
    model = build_model(ModelSpec(options.model, 1, size, 13)).eval()
    layer = gradcam_layer(options.model)
    module = find_layer(model, layer)
    images = torch.rand(options.images, 1, *size)
    channels = torch.arange(options.channels)
    backend = TorchBackend(model, ReactionSpec(layer, "logit", "label"), "cpu",
                           channels_last=True)
    sub_batch = backend._sub_batch_size(images[:options.batch])
    last = images.contiguous(memory_format=torch.channels_last)
    rounds: dict[str, list[float]] = {f"search, batch {options.batch}": [],
                                      f"search as the command (batch {sub_batch}, "
                                      "channels-last)": [],
                                      "projection, one backward": [],
                                      "projection, a backward per channel": [],
                                      "receptive fields": []}
    shape = tuple(images.shape[1:])
    for _ in range(options.repeats):
        seconds, best = timed(strongest_activations, model, module, layer, images, channels,
                              options.batch)
        rounds[f"search, batch {options.batch}"].append(seconds)
        model.to(memory_format=torch.channels_last)
        seconds, fast = timed(strongest_activations, model, module, layer, last, channels,
                              sub_batch)
        model.to(memory_format=torch.contiguous_format)
        rounds[f"search as the command (batch {sub_batch}, channels-last)"].append(seconds)
        assert torch.equal(fast.image, best.image)
        where = (images[best.image], channels, best.row, best.col)
        seconds, batched = timed(project_to_pixels, model, module, layer, *where)
        rounds["projection, one backward"].append(seconds)
        seconds, looped = timed(one_per_channel, model, module, layer, *where)
        rounds["projection, a backward per channel"].append(seconds)
        assert torch.allclose(batched.pixels, looped, rtol=1e-4, atol=1e-6)
        seconds, _ = timed(receptive_fields, model, module, layer, shape, *where[1:])
        rounds["receptive fields"].append(seconds)
    print(f"{options.model} at {size[0]}x{size[1]}, layer {layer}, {options.images} images, "
          f"{options.channels} channels, {options.threads} thread(s), "
          f"{options.repeats} interleaved rounds (median s)")
    for name, values in rounds.items():
        print(f"  {name:<52} {statistics.median(values):8.4f} s")
    ratio = statistics.median(rounds["projection, a backward per channel"]) / \
        statistics.median(rounds["projection, one backward"])
    print(f"  one backward for all channels: {ratio:.2f}x faster than one per channel")


if __name__ == "__main__":
    main()
