"""Roofline of every thesis model: FLOPs and bytes of a Reaction pass against this CPU's limits.

For each zoo model (Models I-VI at 1x50x200, 13 classes, and the demo's ``small`` at 1x8x8,
10 classes) this script, in one run:

1. counts analytically, per image and per layer, what the torch backend computes
   (``TorchBackend.compute_batch``): the whole forward in eval mode (the layers before the
   Grad-CAM layer without autograd, the capture's clone of the layer's output, the layers after
   it with a graph), the backward from the summed target logits down to the layer's activation
   only (frozen parameters: the input gradients of the dense layers, the ReLU masks, the
   pool's scatter; no weight gradient, nothing before the layer), then the Grad-CAM map
   (channel means of the gradient, the weighted sum, its ReLU) and Reaction (sum and count).
   FLOPs: 2 per multiply-add of a convolution or matrix product, 1 per other elementwise
   operation (bias, batch norm's scale and shift = 2, ReLU, pooling's comparisons, sums).
   Bytes: every float32 tensor a layer reads and writes (eager execution: nothing fused, each
   layer a trip through memory), the pool's int64 indices where a graph is kept, and the
   layer's weights once per batch of ``--batch`` images. The multiply-add FLOPs are checked
   against ``torch.utils.flop_counter.FlopCounterMode`` on a real ``compute_batch`` call and
   every layer's output size against the model's real forward;
2. measures the two ceilings with the same thread count: float32 FMA peak
   (``bench/fma_peak.c``) and memory bandwidth (``bench/stream.c``, a STREAM triad over
   3 x 512 MiB: DRAM, the roofline's; and over 3 x 8 MiB: the last-level cache, what a layer
   whose input and output stay within ~24 MiB could get; at 3 x 32 MiB, the size of the torch
   backend's sub-batches, the triad already runs at DRAM speed here);
3. times, interleaved rounds, medians (``bench/reaction.py``'s ``time_settings``), same random
   weights and images: ``TorchBackend`` (ours, channels-last as ``analyzer reaction`` runs zoo
   models), ``OnnxBackend`` on the exported graph (ours), captum's ``LayerGradCam`` and
   torchcam's ``GradCAM``; and checks that their Reactions agree with ours.

The table per model gives GFLOP/image, MB/image, FLOP/byte, the roofline limit in images/s
(min(peak / FLOPs, bandwidth / bytes), the whole pass as one kernel) and the tighter per-layer
limit (each layer at the slower of its compute and memory times, summed: the best that eager
execution, one layer after another, can reach; and the same with conv, batch norm and ReLU
fused, as ONNX Runtime runs them), each tool's images/s by the wall clock and by CPU time
(images per CPU-second x threads, as the FMA peak is counted: what the tool does with the
cores to itself on a shared machine) and the latter's share of the limits; then the layers
below the ridge point (memory-bound). The demo's model runs at batch 256 (``--demo-batch``,
``analyzer reaction``'s default), the thesis models at 64 (``--batch``).

    .venv-bench/bin/python bench/roofline.py                      # ~10 min on 2 busy cores
    OMP_NUM_THREADS=1 .venv-bench/bin/python bench/roofline.py --threads 1   # steadier; ~7 min
    .venv-bench/bin/python bench/roofline.py --models model4 --layers   # one model, every layer
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import astuple, dataclass
from functools import partial
from pathlib import Path

import torch
from reaction import (
    CLASSES,
    IMAGE_SIZE,
    METHODS,
    OnnxOurs,
    Setting,
    laid_out,
    load,
    machine,
    max_relative_reaction_difference,
    random_images,
    random_model,
    raw_maps,
    time_settings,
)
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from analyzer import torch_backend
from analyzer.gradcam import reaction_from_map
from analyzer.torch_backend import TorchBackend
from store.spec import ReactionSpec
from trainer.models import gradcam_layer

BENCH = Path(__file__).resolve().parent
FLOAT = 4  # bytes of a float32
INDEX = 8  # bytes of an int64 pooling index
THESIS = ["model1", "model2", "model3", "model4", "model5", "model6"]
DEMO = "small"  # `trainer run`'s default model, on the embedded 8x8 digits (10 classes)
DEMO_SHAPE = ((8, 8), 10)
TOOLS = ["ours", "onnx", "captum", "torchcam"]
TITLES = {"ours": "torch (ours)", "onnx": "onnx (ours)", "captum": "captum LayerGradCam",
          "torchcam": "torchcam GradCAM"}


# --- the analytic count ----------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """One step of the pass, per image: FLOPs (``macs``: those of multiply-adds) and bytes."""

    name: str
    phase: str  # "forward", "backward" or "grad-cam"
    flops: float
    macs: float
    bytes: float
    out_numel: int = 0  # forward only: the layer's output elements, checked against torch


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for side in shape:
        total *= side
    return total


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _out_shape(module: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A leaf module's output shape for one image of ``shape`` ((C, H, W) or (N,))."""
    if isinstance(module, nn.Conv2d | nn.MaxPool2d):
        kernel, stride = _pair(module.kernel_size), _pair(module.stride)
        padding, dilation = _pair(module.padding), _pair(module.dilation)
        sides = tuple((side + 2 * pad - dil * (k - 1) - 1) // step + 1 for side, k, step, pad, dil
                      in zip(shape[1:], kernel, stride, padding, dilation, strict=True))
        channels = module.out_channels if isinstance(module, nn.Conv2d) else shape[0]
        return (channels, *sides)
    if isinstance(module, nn.Flatten):
        return (_numel(shape),)
    if isinstance(module, nn.Linear):
        return (module.out_features,)
    return shape


def count_layers(model: nn.Module, layer: str, in_shape: tuple[int, ...], classes: int,
                 batch: int) -> list[Layer]:
    """Every step of ``TorchBackend.compute_batch`` on ``model`` (a zoo ConvNet), per image,
    weights spread over ``batch`` images. See the module docstring for what is counted."""
    forward, backward = [], []
    shape, graph = in_shape, False  # graph: past the Grad-CAM layer, autograd records
    for name, module in model.named_modules():
        if next(module.children(), None) is not None:
            continue
        out = _out_shape(module, shape)
        n_in, n_out = _numel(shape), _numel(out)
        moved = FLOAT * (n_in + n_out)
        title = f"{name} {type(module).__name__}"
        if isinstance(module, nn.Conv2d):
            weights = module.weight.numel() + (module.out_channels if module.bias is not None
                                               else 0)
            macs = 2 * module.weight[0].numel() * n_out
            bias = n_out if module.bias is not None else 0
            forward.append(Layer(f"{title} {shape[0]}->{out[0]}", "forward", macs + bias, macs,
                                 moved + FLOAT * weights / batch, n_out))
        elif isinstance(module, nn.BatchNorm2d):
            forward.append(Layer(title, "forward", 2 * n_out, 0,
                                 moved + FLOAT * 4 * shape[0] / batch, n_out))
        elif isinstance(module, nn.ReLU):
            forward.append(Layer(title, "forward", n_out, 0, moved, n_out))
            if graph:
                backward.append(Layer(f"{title} backward", "backward", n_out, 0,
                                      3 * FLOAT * n_out))
        elif isinstance(module, nn.MaxPool2d):
            window = _numel(_pair(module.kernel_size))
            forward.append(Layer(title, "forward", (window - 1) * n_out, 0,
                                 moved + (INDEX * n_out if graph else 0), n_out))
            if graph:  # zero the input's gradient, read gradient and indices, scatter
                backward.append(Layer(f"{title} backward", "backward", n_out, 0,
                                      FLOAT * n_in + (2 * FLOAT + INDEX) * n_out))
        elif isinstance(module, nn.Flatten):  # a copy: the map is channels-last
            forward.append(Layer(f"{title} (copy, channels-last)", "forward", 0, 0, moved,
                                 n_out))
        elif isinstance(module, nn.Linear):
            weights = module.weight.numel() + (module.out_features if module.bias is not None
                                               else 0)
            macs = 2 * module.weight.numel()
            forward.append(Layer(f"{title} {n_in}->{n_out}", "forward", macs + n_out, macs,
                                 moved + FLOAT * weights / batch, n_out))
            if graph:
                backward.append(Layer(f"{title} backward", "backward", macs, macs,
                                      moved + FLOAT * module.weight.numel() / batch))
        elif isinstance(module, nn.Dropout):
            forward.append(Layer(f"{title} (eval: the input itself)", "forward", 0, 0, 0,
                                 n_out))
        else:
            raise ValueError(f"no count for {title}")
        if name == layer:
            forward.append(Layer(f"{name} capture (clone)", "forward", 0, 0, moved))
            graph, cam_shape = True, out
        shape = out
    channels, area = cam_shape[0], _numel(cam_shape[1:])
    scores = [Layer("target scores (gather, sum)", "forward", classes, 0,
                    FLOAT * (classes + 1)),
              Layer("target scores backward (one-hot)", "backward", 0, 0, FLOAT * classes)]
    cam = [Layer("alpha = gradient mean over H, W", "grad-cam", channels * area, 0,
                 FLOAT * (channels * area + channels)),
           Layer("sum_k alpha_k A^k (einsum)", "grad-cam", 2 * channels * area,
                 2 * channels * area, FLOAT * (channels * area + channels + area)),
           Layer("ReLU of the map", "grad-cam", area, 0, 2 * FLOAT * area),
           Layer("Reaction: sum, count of L > 0", "grad-cam", 2 * area, 0, 2 * FLOAT * area)]
    return forward + scores + backward[::-1] + cam


def check_counts(model: nn.Module, layer: str, layers: list[Layer],
                 in_shape: tuple[int, ...], classes: int) -> None:
    """Raise unless the count agrees with torch: each forward layer's output size with the real
    forward, and the multiply-add FLOPs with FlopCounterMode on a real compute_batch."""
    sizes: list[int] = []
    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(lambda m, i, o: sizes.append(o.numel())) for m in leaves]
    images = torch.rand(2, *in_shape)
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    counted = [lay.out_numel * 2 for lay in layers if lay.out_numel]
    if counted != sizes:
        raise AssertionError(f"layer sizes: counted {counted}, torch {sizes}")
    backend = TorchBackend(model, ReactionSpec(layer), "cpu", channels_last=True)
    with FlopCounterMode(display=False) as counter:
        backend.compute_batch(images, torch.randint(0, classes, (2,)))
    measured, ours = counter.get_total_flops() / 2, sum(lay.macs for lay in layers)
    if measured != ours:
        raise AssertionError(f"multiply-add FLOPs per image: counted {ours}, torch {measured}")


# --- the ceilings ----------------------------------------------------------------------------


def compiled(source: str, flags: list[str], folder: Path) -> Path:
    """``bench/<source>`` built with gcc into ``folder``."""
    if shutil.which("gcc") is None:
        raise SystemExit("gcc is needed to build bench/fma_peak.c and bench/stream.c")
    binary = folder / Path(source).stem
    subprocess.run(["gcc", *flags, "-march=native", "-pthread", str(BENCH / source), "-o",
                    str(binary)], check=True)
    return binary


def _measure(command: list[str], pattern: str, runs: int = 3) -> float:
    """The best of ``runs`` runs of a ceiling program: the number ``pattern`` finds."""
    values = []
    for _ in range(runs):
        line = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        values.append(float(re.search(pattern, line).group(1)))
    return max(values)


@dataclass(frozen=True)
class Ceilings:
    """This machine's float32 FMA peak (GFLOP/s per CPU-second x threads: what the threads
    reach with their cores to themselves) and triad bandwidths (GB/s, best pass)."""

    peak: float
    dram: float
    cache: float

    def __str__(self) -> str:
        return (f"FMA peak {self.peak:.1f} GFLOP/s, triad {self.dram:.1f} GB/s (3 x 512 MiB, "
                f"DRAM), {self.cache:.1f} GB/s (3 x 8 MiB, cache)")

    @property
    def ridge(self) -> float:
        """FLOP per byte above which a kernel is compute-bound (DRAM bandwidth)."""
        return self.peak / self.dram


def measure_ceilings(threads: int) -> Ceilings:
    """FMA peak and triad bandwidths at ``threads`` threads, best of three runs each. The
    peak is counted per CPU-second: on a shared machine the wall clock also counts the time
    other processes held the cores (one busy core here: 120 GFLOP/s by the wall clock, 214
    per CPU-second); a triad's best of 20 passes is one the others did not interrupt."""
    with tempfile.TemporaryDirectory() as folder:
        fma = compiled("fma_peak.c", ["-O2"], Path(folder))
        stream = compiled("stream.c", ["-O3"], Path(folder))
        return Ceilings(_measure([str(fma), str(threads)], r"([0-9.]+) per CPU-second"),
                        _measure([str(stream), str(threads), "512"], r"([0-9.]+) GB/s"),
                        _measure([str(stream), str(threads), "8"], r"([0-9.]+) GB/s"))


# --- the roofline of a model -----------------------------------------------------------------


@dataclass(frozen=True)
class Roofline:
    """Per image: FLOPs and bytes of the pass, and the limits they set on images/s."""

    flops: float
    bytes: float
    limit: float  # min(peak / flops, bandwidth / bytes): the pass as one kernel
    layer_limit: float  # 1 / sum over layers of max(flops / peak, bytes / bandwidth)
    cache_layer_limit: float  # the same with the last-level cache's bandwidth
    fused_layer_limit: float  # per-layer, DRAM, conv+BN+ReLU fused (:func:`fused`)
    fused_bytes: float


def roofline(layers: list[Layer], ceilings: Ceilings) -> Roofline:
    """The limits that ``layers`` (per image) set on images/s under ``ceilings``."""
    flops, moved = sum(lay.flops for lay in layers), sum(lay.bytes for lay in layers)

    def per_layer(steps: list[Layer], bandwidth: float) -> float:
        seconds = sum(max(lay.flops / (ceilings.peak * 1e9), lay.bytes / (bandwidth * 1e9))
                      for lay in steps)
        return 1 / seconds

    merged = fused(layers)
    return Roofline(flops, moved, min(ceilings.peak * 1e9 / flops, ceilings.dram * 1e9 / moved),
                    per_layer(layers, ceilings.dram), per_layer(layers, ceilings.cache),
                    per_layer(merged, ceilings.dram), sum(lay.bytes for lay in merged))


def memory_bound(layers: list[Layer], ceilings: Ceilings) -> list[tuple[Layer, float]]:
    """The layers below the ridge point, each with its share of the per-layer roofline time,
    largest first."""
    times = {lay: max(lay.flops / ceilings.peak, lay.bytes / ceilings.dram) for lay in layers}
    total = sum(times.values())
    bound = [(lay, times[lay] / total) for lay in layers
             if lay.bytes and lay.flops / lay.bytes < ceilings.ridge]
    return sorted(bound, key=lambda pair: -pair[1])


def fused(layers: list[Layer]) -> list[Layer]:
    """The steps as a runtime that fuses each conv with its batch norm and ReLU runs them (ONNX
    Runtime does): a batch norm's, a forward ReLU's and the capture's FLOPs join the step before
    them, their traffic disappears."""
    kept: list[Layer] = []
    for lay in layers:
        if kept and lay.phase == "forward" and re.search(r"BatchNorm2d$|ReLU$|capture", lay.name):
            last = kept.pop()
            kept.append(Layer(last.name, last.phase, last.flops + lay.flops, last.macs + lay.macs,
                              last.bytes, last.out_numel))
        else:
            kept.append(lay)
    return kept


# --- timing ----------------------------------------------------------------------------------


def model_shape(name: str) -> tuple[tuple[int, int], int]:
    """(image size, classes) of the benchmark's workload for zoo model ``name``."""
    return DEMO_SHAPE if name == DEMO else (IMAGE_SIZE, CLASSES)


def available_tools() -> tuple[list[str], dict[str, str]]:
    """The tools that import here, and why each other one does not."""
    tools, missing = [], {}
    for tool, module in (("ours", "analyzer.torch_backend"), ("onnx", "onnxruntime"),
                         ("captum", "captum.attr"), ("torchcam", "torchcam.methods")):
        try:
            __import__(module)
            tools.append(tool)
        except ImportError as error:
            missing[tool] = str(error)
    return tools, missing


def time_model(name: str, tools: list[str], images: int, batch: int,
               rounds: int) -> dict[str, tuple[float, float, float]]:
    """Per tool: median images/s, images per CPU-second, and max relative Reaction difference
    from ours, on one random model and one set of random images."""
    size, classes = model_shape(name)
    model, layer = random_model(name, size, classes), gradcam_layer(name)
    pictures, labels = random_images(images, size, classes)
    methods = {**METHODS, "onnx": partial(OnnxOurs, image_size=size)}
    settings = [Setting(tool, batch) for tool in tools]
    rates = time_settings(settings, {"plain": model}, layer, pictures, labels, rounds, methods)
    reactions = {setting.method: reaction_from_map(
        raw_maps(setting, {"plain": model}, layer, pictures, labels, methods))[0]
        for setting in settings}
    reference = reactions.get("ours")
    return {setting.method: (*rates[setting], float("nan") if reference is None else
                             max_relative_reaction_difference(reactions[setting.method],
                                                              reference))
            for setting in settings}


def what_helps(name: str, images: int, batch: int,
               rounds: int) -> dict[str, tuple[float, float]]:
    """Images per CPU-second of the torch backend as ``analyzer reaction`` runs a zoo model, with
    batch norm folded into the convolutions and in-place ReLUs (bench/reaction.py's
    ``laid_out``: the traffic that fusion removes), with sub-batches whose largest activation
    stays under 8 MiB instead of 32 (a layer's input and output then fit in the cache), and
    both; interleaved rounds, medians, and the largest relative Reaction difference from the
    first."""
    size, classes = model_shape(name)
    model, layer = random_model(name, size, classes), gradcam_layer(name)
    pictures, labels = random_images(images, size, classes)
    folded = laid_out(model, "channels_last+folded")
    variants = {"sub-batches under 32 MiB (glibc's defaults)": (model, 32),
                "BN folded, ReLU in-place": (folded, 32), "sub-batches under 8 MiB": (model, 8),
                "both": (folded, 8)}
    backends = {title: TorchBackend(copy.deepcopy(net), ReactionSpec(layer), "cpu",
                                    channels_last=True) for title, (net, _) in variants.items()}
    seconds: dict[str, list[float]] = {title: [] for title in variants}
    results = {}
    for round_index in range(rounds + 1):
        for title, backend in backends.items():
            torch_backend._CPU_ACTIVATION_BUDGET = variants[title][1] * 2**20
            began = time.process_time()
            results[title] = torch.cat([backend.compute(x, y).reaction for x, y in
                                        zip(pictures.split(batch), labels.split(batch),
                                            strict=True)])
            if round_index:
                seconds[title].append(time.process_time() - began)
    torch_backend._CPU_ACTIVATION_BUDGET = 32 * 2**20
    first = results["sub-batches under 32 MiB (glibc's defaults)"]
    return {title: (images / statistics.median(times),
                    max_relative_reaction_difference(results[title], first))
            for title, times in seconds.items()}


# --- the report ------------------------------------------------------------------------------


def layer_table(layers: list[Layer], ceilings: Ceilings) -> str:
    """Every layer: MFLOP, KB per image, FLOP/byte, and which ceiling binds it."""
    lines = ["| step | phase | MFLOP/image | KB/image | FLOP/byte | bound |",
             "|---|---|---:|---:|---:|---|"]
    for lay in layers:
        intensity = lay.flops / lay.bytes if lay.bytes else float("inf")
        bound = "compute" if intensity >= ceilings.ridge else "memory"
        lines.append(f"| {lay.name} | {lay.phase} | {lay.flops / 1e6:.3f} | {lay.bytes / 1e3:.1f}"
                     f" | {intensity:.2f} | {bound if lay.bytes or lay.flops else '-'} |")
    return "\n".join(lines)


def model_report(name: str, layers: list[Layer], ceilings: Ceilings,
                 rates: dict[str, tuple[float, float, float]], missing: dict[str, str],
                 batch: int, threads: int) -> str:
    """The per-model table and its memory-bound layers. Shares of the limits are of the rate
    by CPU time (images per CPU-second x threads), as the FMA peak is counted."""
    line = roofline(layers, ceilings)
    size, classes = model_shape(name)
    bound = "compute" if line.flops / line.bytes >= ceilings.ridge else "memory"
    out = [f"### {name} (1x{size[0]}x{size[1]}, {classes} classes, batch {batch})", "",
           f"{line.flops / 1e9:.4f} GFLOP/image, {line.bytes / 1e6:.2f} MB/image (eager; "
           f"{line.fused_bytes / 1e6:.2f} with conv+BN+ReLU fused), "
           f"{line.flops / line.bytes:.1f} FLOP/byte ({bound}-bound as a whole; ridge "
           f"{ceilings.ridge:.1f}); roofline limit {line.limit:.0f} images/s, per-layer limit "
           f"{line.layer_limit:.0f} ({line.cache_layer_limit:.0f} with every layer at the "
           f"cache's bandwidth, {line.fused_layer_limit:.0f} fused)", "",
           f"| tool | images/s | images/CPU-s x {threads} | GFLOP/s | % of roofline limit "
           "| % of per-layer limit | % of fused per-layer limit "
           "| max rel diff Reaction vs ours |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for tool in TOOLS:
        if tool not in rates:
            out.append(f"| {TITLES[tool]} | n/a ({missing.get(tool, 'not run')}) "
                       "| | | | | | |")
            continue
        wall, cpu, difference = rates[tool]
        rate = cpu * threads
        out.append(f"| {TITLES[tool]} | {wall:.1f} | {rate:.1f} | {rate * line.flops / 1e9:.1f} "
                   f"| {rate / line.limit:.0%} | {rate / line.layer_limit:.0%} "
                   f"| {rate / line.fused_layer_limit:.0%} | {difference:.1e} |")
    heavy = [(lay, share) for lay, share in memory_bound(layers, ceilings) if share >= 0.02]
    if heavy:
        out += ["", "memory-bound steps with >= 2 % of the per-layer roofline time: " + "; ".join(
            f"{lay.name} ({lay.phase}, {lay.flops / lay.bytes:.2f} FLOP/B, {share:.0%})"
            for lay, share in heavy)]
    return "\n".join(out)


def summary(rows: list[tuple[str, Roofline, dict]], ceilings: Ceilings, threads: int) -> str:
    """One line per model: its roofline and each tool's rate by CPU time (images per
    CPU-second x threads) with its share of the per-layer limit."""
    head = "| model | GFLOP/img | MB/img | FLOP/B | bound | limit img/s | per-layer limit |"
    lines = [head + "".join(f" {TITLES[t]} |" for t in TOOLS),
             "|---|---:|---:|---:|---|---:|---:|" + "---:|" * len(TOOLS)]
    for name, line, rates in rows:
        bound = "compute" if line.flops / line.bytes >= ceilings.ridge else "memory"
        rate = {tool: cpu * threads for tool, (_, cpu, _) in rates.items()}
        cells = "".join(f" {rate[t]:.0f} ({rate[t] / line.layer_limit:.0%}) |" if t in rate
                        else " n/a |" for t in TOOLS)
        lines.append(f"| {name} | {line.flops / 1e9:.4f} | {line.bytes / 1e6:.2f} "
                     f"| {line.flops / line.bytes:.1f} | {bound} | {line.limit:.0f} "
                     f"| {line.layer_limit:.0f} |{cells}")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[*THESIS, DEMO],
                        choices=[*THESIS, DEMO])
    parser.add_argument("--images", type=int, default=128, help="per thesis model")
    parser.add_argument("--demo-images", type=int, default=2048,
                        help="for the demo's model (8x8 images are fast)")
    parser.add_argument("--batch", type=int, default=64, help="per thesis model")
    parser.add_argument("--demo-batch", type=int, default=256,
                        help="for the demo's model (analyzer reaction's default batch size)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after a warm-up")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--layers", action="store_true", help="also print every layer's count")
    parser.add_argument("--what-helps", action="store_true",
                        help="instead: the torch backend with batch norm folded and with smaller "
                             "sub-batches (images per CPU-second)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.what_helps:
        print(f"{machine()}; {load()}")
        for name in args.models:
            print(f"{name}: " + "; ".join(f"{title} {rate:.1f} images/CPU-s (rel diff {diff:.0e})"
                                           for title, (rate, diff) in what_helps(
                                               name, args.images, args.batch, args.rounds).items()),
                  flush=True)
        print(load())
        return
    print(f"{machine()}; {load()}", flush=True)
    start = measure_ceilings(args.threads)
    print(f"ceilings at the start: {start}", flush=True)
    tools, missing = available_tools()
    measured = []
    for name in args.models:
        size, classes = model_shape(name)
        model, layer = random_model(name, size, classes), gradcam_layer(name)
        images, batch = ((args.demo_images, args.demo_batch) if name == DEMO
                         else (args.images, args.batch))
        layers = count_layers(model, layer, (1, *size), classes, batch)
        check_counts(model, layer, layers, (1, *size), classes)
        rates = time_model(name, tools, images, batch, args.rounds)
        print(f"{name}: " + ", ".join(f"{TITLES[t]} {r[0]:.1f} images/s"
                                       for t, r in rates.items()), flush=True)
        measured.append((name, layers, rates, batch))
    end = measure_ceilings(args.threads)
    ceilings = Ceilings(*(max(a, b) for a, b in zip(astuple(start), astuple(end), strict=True)))
    print(f"ceilings at the end: {end}; {load()}")
    print(f"roofline ceilings (the better of the two; {args.threads} thread(s)): {ceilings}; "
          f"ridge {ceilings.ridge:.1f} FLOP/byte\n")
    for name, layers, rates, batch in measured:
        print(model_report(name, layers, ceilings, rates, missing, batch, args.threads))
        if args.layers:
            print("\n" + layer_table(layers, ceilings))
        print()
    print(summary([(name, roofline(layers, ceilings), rates)
                   for name, layers, rates, _ in measured], ceilings, args.threads))
    print(f"tools: images per CPU-second x {args.threads} (% of the per-layer limit)")
    print(f"medians of {args.rounds} interleaved rounds; same random weights and images per "
          f"model; {args.images} images per thesis model, {args.demo_images} for {DEMO}")


if __name__ == "__main__":
    main()
