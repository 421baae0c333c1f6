"""Reaction throughput: our batched backend vs a per-image loop vs three Grad-CAM libraries.

Same process, same CPU, same random model (a zoo model with random weights and random
batch-norm running statistics, eval mode), same random images in [0, 1] with random labels.
Methods timed:

1. thesis loop: one image at a time, forward, ``.backward()`` of the target logit through the
   whole network (parameter gradients included), layer output and gradient from hooks. Timed
   on the first 32 images only, to keep the run short.
2. reaction (ours): ``TorchBackend.compute`` on batches (one ``autograd.grad`` stopping at the
   layer; no graph before it).
3. pytorch-grad-cam ``GradCAM`` with ``ClassifierOutputTarget``, its normal call on batches
   (it upsamples to the input size and min-max normalises each map).
4. captum ``LayerGradCam.attribute(..., relu_attributions=True)`` on batches.
5. torchcam ``GradCAM``: ``model(images)`` then ``extractor(class_idx=..., scores=...)`` on
   batches, with its default per-image normalisation.
6. onnx (ours): the model exported with its gradient graph (docs/ONNX.md; traced once per
   model, not timed) run by ``OnnxBackend`` on ONNX Runtime's CPU provider, one session per
   round with as many threads as torch. After the table: the achieved GFLOP/s (forward conv
   and linear FLOPs per image × images/s) against a measured float32 ``torch.matmul`` rate.

Values: every method's *raw* map at the layer's resolution is compared with ours
(``compute(..., keep_maps=True).cam``), and so is the Reaction computed from it (docs/METHOD.md §2).
pytorch-grad-cam only returns normalised, upsampled maps; its raw map is rebuilt from its own
pieces after the normal call: the activations and gradients its hooks kept
(``cam.activations_and_grads``) go through its ``get_cam_image`` (which calls its
``get_cam_weights``), then its ``np.maximum(cam, 0)``: exactly what it does before
``scale_cam_image``. torchcam gives raw maps with ``normalized=False``; captum's are raw.

Timing: rounds interleave the methods (so that a slow spell of a shared machine hits all of
them), each round starting with the next method (a method's speed depends on what the one
before it left in the memory allocator); round 0 is a one-batch warm-up. The table gives the
median over the other rounds of images per wall-clock second and per process CPU-second (the
latter is the steadier one on a busy machine with ``--threads 1``).

Memory: each method runs once on one batch in a fresh subprocess (after a two-image warm-up).
"Extra" memory is the peak resident set during that call minus the resident set just before
it (model, images and libraries already loaded); the peak counter is reset through
``/proc/self/clear_refs`` (Linux). The reference is a plain ``torch.no_grad()`` forward of the
same batch measured the same way; the goal is ours ≤ 2× its extra.

``--variants`` times ours, captum, torchcam and the no-grad forward at a quarter of the batch
size, in ``channels_last``, and with batch norm folded into the convolutions, to show where
the time goes on a CPU (see docs/BENCHMARKS.md).

    .venv-bench/bin/python bench/reaction.py --model model4 --images 256
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from analyzer.gradcam import grad_cam_map, reaction_from_map
from analyzer.torch_backend import TorchBackend, find_layer
from store.spec import ReactionSpec
from trainer.models import ModelSpec, build_model, gradcam_layer

IMAGE_SIZE = (50, 200)
CLASSES = 13
SEED = 0
LOOP_IMAGES = 32  # the thesis loop is timed on this many images


# --- the shared workload ------------------------------------------------------------------


def random_model(name: str, image_size: tuple[int, int] = IMAGE_SIZE,
                 classes: int = CLASSES) -> nn.Module:
    """A zoo model with random weights and random batch-norm statistics, in eval mode."""
    torch.manual_seed(SEED)
    model = build_model(ModelSpec(name, 1, image_size, classes))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.8, 1.2)
                module.bias.normal_(0.0, 0.1)
    return model.eval()


def random_images(count: int, image_size: tuple[int, int] = IMAGE_SIZE,
                  classes: int = CLASSES) -> tuple[Tensor, Tensor]:
    """Images in [0, 1], shape [count, 1, *image_size] (1x50x200), and random labels."""
    generator = torch.Generator().manual_seed(SEED + 1)
    images = torch.rand(count, 1, *image_size, generator=generator)
    labels = torch.randint(0, classes, (count,), generator=generator)
    return images, labels


# --- the methods: run() is what is timed, raw_map() gives the layer-resolution map ----------


class Method:
    """One way of computing Grad-CAM; ``close`` removes whatever hooks it left on the model."""

    title = ""

    def __init__(self, model: nn.Module, layer: str) -> None:
        self.model = model
        self.layer = layer
        self.module = find_layer(model, layer)

    def run(self, images: Tensor, labels: Tensor) -> None:
        raise NotImplementedError

    def raw_map(self, images: Tensor, labels: Tensor) -> Tensor:
        """ReLU(Σ_k alpha_k A^k) at the layer's resolution, ``[B, H, W]``, unnormalised."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class NoGradForward(Method):
    """The reference for memory: a plain forward without autograd."""

    title = "no-grad forward (reference)"

    def run(self, images: Tensor, labels: Tensor) -> None:
        with torch.no_grad():
            self.model(images)


class ThesisLoop(Method):
    """One image at a time; ``.backward()`` of the target logit through the whole network."""

    title = "thesis loop (per image)"

    def run(self, images: Tensor, labels: Tensor) -> None:
        for image, label in zip(images, labels, strict=True):
            reaction_from_map(self._one_map(image[None], int(label)))

    def raw_map(self, images: Tensor, labels: Tensor) -> Tensor:
        return torch.cat([self._one_map(image[None], int(label))
                          for image, label in zip(images, labels, strict=True)])

    def _one_map(self, image: Tensor, label: int) -> Tensor:
        kept: dict[str, Tensor] = {}

        def keep(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            kept["activation"] = output
            output.register_hook(lambda gradient: kept.update(gradient=gradient))

        handle = self.module.register_forward_hook(keep)
        try:
            logits = self.model(image)
            self.model.zero_grad()
            logits[0, label].backward()
        finally:
            handle.remove()
        return grad_cam_map(kept["activation"].detach(), kept["gradient"])


def once_per_model(cache: dict, model: nn.Module, key: tuple, make: Callable[[], object]
                   ) -> object:
    """``make()``, made once per model and ``key`` and kept in ``cache`` for later rounds
    (what is made once per pass is not what is timed); the model is kept with it, so that
    its ``id``, part of the cache's key, cannot pass to another model."""
    cache_key = (id(model), *key)
    if cache_key not in cache:
        cache[cache_key] = (model, make())
    return cache[cache_key][1]


# (id(model), layer) -> (model, TorchBackend): the first batch's decisions (folding, where
# the gradient is taken), made once per pass by `analyzer reaction`
_DECIDED: dict = {}


class Ours(Method):
    """``analyzer.torch_backend.TorchBackend`` on batches."""

    title = "reaction (ours)"

    def __init__(self, model: nn.Module, layer: str) -> None:
        super().__init__(model, layer)
        # as `analyzer reaction` runs zoo models (channels-last, batch norm folded and ReLU
        # fused into the convs, the gradient at the first dense layer's output); on its own
        # copy, so peers keep their layout; decided on the first batch it computes (the
        # warm-up round of time_settings), kept for the later rounds
        self.backend = once_per_model(_DECIDED, model, (layer,), lambda: TorchBackend(
            copy.deepcopy(model), ReactionSpec(layer), "cpu", channels_last=True,
            fuse_layers=True, cut_after_pool=True, cut_at_dense=True))

    def run(self, images: Tensor, labels: Tensor) -> None:
        self.backend.compute(images, labels)

    def raw_map(self, images: Tensor, labels: Tensor) -> Tensor:
        return self.backend.compute(images, labels, keep_maps=True).cam


_EXPORTED: dict = {}  # (id(model), layer, size) -> (model, OnnxFile): the trace


class OnnxOurs(Method):
    """``analyzer.onnx_backend.OnnxBackend`` on the exported graph (``--backend onnx``)."""

    title = "onnx (ours)"

    def __init__(self, model: nn.Module, layer: str,
                 image_size: tuple[int, int] = IMAGE_SIZE) -> None:
        from pathlib import Path

        from analyzer.onnx_backend import OnnxBackend
        from analyzer.onnx_export import ExportSettings, ReactionGraphExporter
        from store.onnx_files import OnnxFile

        super().__init__(model, layer)

        def export() -> OnnxFile:
            settings = ExportSettings(ReactionSpec(layer), with_maps=True)
            exporter = ReactionGraphExporter(model, settings,
                                             channels=1, image_size=image_size)
            exporter.load_weights(model.state_dict())
            return OnnxFile(Path("bench.onnx"), exporter.model_bytes(), "", exporter.contract)

        exported = once_per_model(_EXPORTED, model, (layer, image_size), export)
        self.backend = OnnxBackend(exported, "cpu", threads=torch.get_num_threads())

    def run(self, images: Tensor, labels: Tensor) -> None:
        self.backend.compute(images, labels)

    def raw_map(self, images: Tensor, labels: Tensor) -> Tensor:
        return self.backend.compute(images, labels, keep_maps=True).cam


class PytorchGradCam(Method):
    """pytorch-grad-cam's ``GradCAM``: normalised maps upsampled to the input size."""

    title = "pytorch-grad-cam GradCAM"

    def __init__(self, model: nn.Module, layer: str) -> None:
        from pytorch_grad_cam import GradCAM

        super().__init__(model, layer)
        self.cam = GradCAM(model=model, target_layers=[self.module])

    @staticmethod
    def _targets(labels: Tensor) -> list:
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        return [ClassifierOutputTarget(int(label)) for label in labels]

    def run(self, images: Tensor, labels: Tensor) -> None:
        self.cam(input_tensor=images, targets=self._targets(labels))

    def raw_map(self, images: Tensor, labels: Tensor) -> Tensor:
        import numpy as np

        targets = self._targets(labels)
        self.cam(input_tensor=images, targets=targets)
        kept = self.cam.activations_and_grads
        cam = self.cam.get_cam_image(images, self.module, targets, kept.activations[0].numpy(),
                                     kept.gradients[0].numpy())
        return torch.from_numpy(np.maximum(cam, 0))

    def close(self) -> None:
        self.cam.activations_and_grads.release()


class CaptumLayerGradCam(Method):
    """captum's ``LayerGradCam``: raw maps at the layer's resolution."""

    title = "captum LayerGradCam"

    def __init__(self, model: nn.Module, layer: str) -> None:
        from captum.attr import LayerGradCam

        super().__init__(model, layer)
        self.gradcam = LayerGradCam(model, self.module)

    def run(self, images: Tensor, labels: Tensor) -> None:
        self.raw_map(images, labels)

    def raw_map(self, images: Tensor, labels: Tensor) -> Tensor:
        cam = self.gradcam.attribute(images, target=labels, relu_attributions=True)
        return cam.detach().squeeze(1)


class TorchCam(Method):
    """torchcam's ``GradCAM``: one ``autograd.grad`` to the layer, maps normalised per image."""

    title = "torchcam GradCAM"

    def __init__(self, model: nn.Module, layer: str) -> None:
        from torchcam.methods import GradCAM

        super().__init__(model, layer)
        self.extractor = GradCAM(model, target_layer=layer)

    def run(self, images: Tensor, labels: Tensor) -> None:
        self._maps(images, labels, normalized=True)

    def raw_map(self, images: Tensor, labels: Tensor) -> Tensor:
        return self._maps(images, labels, normalized=False)

    def _maps(self, images: Tensor, labels: Tensor, normalized: bool) -> Tensor:
        scores = self.model(images)
        (cam,) = self.extractor(class_idx=labels.tolist(), scores=scores, normalized=normalized)
        return cam

    def close(self) -> None:
        self.extractor.remove_hooks()


METHODS: dict[str, type[Method]] = {
    "nograd": NoGradForward,
    "thesis": ThesisLoop,
    "ours": Ours,
    "onnx": OnnxOurs,
    "pytorch-grad-cam": PytorchGradCam,
    "captum": CaptumLayerGradCam,
    "torchcam": TorchCam,
}
COMPARED = ["thesis", "ours", "onnx", "pytorch-grad-cam", "captum", "torchcam"]
OURS = ("ours", "onnx", "nograd")  # never "the fastest other"


# --- settings: a method run at a batch size on a model layout --------------------------------

LAYOUTS = ("plain", "channels_last", "channels_last+folded")


@dataclass(frozen=True)
class Setting:
    """A method at a batch size on a layout of the model (``plain``: as built)."""

    method: str
    batch: int
    layout: str = "plain"

    def label(self, default_batch: int) -> str:
        title = METHODS[self.method].title
        if self.batch == default_batch and self.layout == "plain":
            return title
        return f"{title}, batch {self.batch}, {self.layout}"


def laid_out(model: nn.Module, layout: str) -> nn.Module:
    """A copy of ``model`` in ``layout``; ``+folded`` folds each BatchNorm into its conv
    (eval-mode batch norm is an affine map per channel) and makes every ReLU in-place."""
    model = copy.deepcopy(model)
    if layout.endswith("+folded"):
        features = model.features
        for index in range(len(features) - 1):
            conv, norm = features[index], features[index + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                features[index] = fuse_conv_bn_eval(conv, norm)
                features[index + 1] = nn.Identity()  # keeps the layer names, hence gradcam_layer
        for module in features:
            if isinstance(module, nn.ReLU):
                module.inplace = True
    if layout.startswith("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    return model.eval()


def batches(images: Tensor, labels: Tensor, setting: Setting) -> list[tuple[Tensor, Tensor]]:
    """The setting's batches; the per-image loop gets only the first ``LOOP_IMAGES`` images (its
    rate is per image, and a pass over all images would take most of the run)."""
    if setting.method == "thesis":
        images, labels = images[:LOOP_IMAGES], labels[:LOOP_IMAGES]
    memory_format = torch.contiguous_format if setting.layout == "plain" else torch.channels_last
    return [(x.contiguous(memory_format=memory_format), y)
            for x, y in zip(images.split(setting.batch), labels.split(setting.batch), strict=True)]


# --- measuring ----------------------------------------------------------------------------


def timed_pass(method: Method, work: list[tuple[Tensor, Tensor]]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) for one pass over ``work``."""
    wall, cpu = time.perf_counter(), time.process_time()
    for images, labels in work:
        method.run(images, labels)
    return time.perf_counter() - wall, time.process_time() - cpu


def time_settings(settings: list[Setting], models: dict[str, nn.Module], layer: str,
                  images: Tensor, labels: Tensor, repeats: int,
                  methods: dict | None = None) -> dict[Setting, tuple]:
    """Median (images/s, images per CPU-second) of each setting.

    Rounds interleave the settings, so that a slow spell of a shared machine hits all of them,
    and each round starts one setting later, because a method's speed depends on what the
    one before it left in the memory allocator (page faults); round 0 is the warm-up (one
    batch each). Each method is built and closed within its turn, so that no library's hooks
    stay on the model while another method runs. ``methods`` maps a setting's method to
    what builds it from (model, layer); default :data:`METHODS`.
    """
    methods = METHODS if methods is None else methods
    work = {setting: batches(images, labels, setting) for setting in settings}
    seconds: dict[Setting, list[tuple[float, float]]] = {setting: [] for setting in settings}
    for round_index in range(repeats + 1):
        start = round_index % len(settings)
        for setting in settings[start:] + settings[:start]:
            method = methods[setting.method](models[setting.layout], layer)
            try:
                turn = work[setting] if round_index else work[setting][:1]
                elapsed = timed_pass(method, turn)
            finally:
                method.close()
            if round_index:
                seconds[setting].append(elapsed)
    counts = {setting: sum(len(labels) for _, labels in work[setting]) for setting in settings}
    return {setting: (counts[setting] / statistics.median(wall for wall, _ in times),
                      counts[setting] / statistics.median(cpu for _, cpu in times))
            for setting, times in seconds.items()}


def raw_maps(setting: Setting, models: dict[str, nn.Module], layer: str, images: Tensor,
             labels: Tensor, methods: dict | None = None) -> Tensor | None:
    """The setting's raw maps over its batches, or None for a method that makes none
    (``methods`` as in :func:`time_settings`)."""
    method = (METHODS if methods is None else methods)[setting.method](models[setting.layout],
                                                                       layer)
    try:
        return torch.cat([method.raw_map(x, y) for x, y in batches(images, labels, setting)])
    except NotImplementedError:
        return None
    finally:
        method.close()


def max_relative_map_difference(maps: Tensor, reference: Tensor) -> float:
    """max over images of max_ij |L - L_ours| / max_ij L_ours (ours empty: |L| / 1e-38)."""
    scale = reference.flatten(1).amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny)
    difference = (maps.to(reference.dtype) - reference).abs().flatten(1).amax(dim=1)
    return float((difference / scale).max())


def max_relative_reaction_difference(reaction: Tensor, reference: Tensor) -> float:
    """max over images of |R - R_ours| / R_ours; where ours is an empty map (R_ours = 0),
    0 if the other map is empty too and infinity otherwise."""
    scale = reference.abs().clamp(min=torch.finfo(torch.float32).tiny)
    relative = (reaction.to(reference.dtype) - reference).abs() / scale
    ours_empty = reference == 0
    relative[ours_empty] = torch.where(reaction[ours_empty] == 0, 0.0, torch.inf).to(
        relative.dtype)
    return float(relative.max())


def _status_kib() -> dict[str, int]:
    with open("/proc/self/status") as status:
        return {key: int(value.split()[0]) for key, value in
                (line.split(":", 1) for line in status) if key in ("VmRSS", "VmHWM")}


def measure_extra_memory(setting: Setting, model_name: str) -> float | None:
    """Peak RSS during one call on one batch minus RSS just before it, in MiB (this process)."""
    model = laid_out(random_model(model_name), setting.layout)
    images, labels = batches(*random_images(setting.batch), setting)[0]
    method = METHODS[setting.method](model, gradcam_layer(model_name))
    method.run(images[:2], labels[:2])
    gc.collect()
    before = _status_kib()["VmRSS"]
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM, the peak resident set, to the current one
    except OSError:
        return None
    method.run(images, labels)
    return (_status_kib()["VmHWM"] - before) / 1024


def extra_memory_in_subprocess(setting: Setting, args: argparse.Namespace) -> float | None:
    command = [sys.executable, __file__, "--model", args.model, "--threads", str(args.threads),
               "--memory-of", setting.method, "--batch", str(setting.batch),
               "--layout", setting.layout]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["extra_mib"]


@dataclass
class Row:
    setting: Setting
    method: str
    images_per_s: float
    images_per_cpu_s: float
    vs_ours: float
    empty_maps: str
    map_difference: float | None
    reaction_difference: float | None
    extra_mib: float | None
    extra_vs_nograd: float | None


def benchmark(settings: list[Setting], args: argparse.Namespace) -> list[Row]:
    """Time every setting, compare its maps with ours (plain layout) and measure its memory."""
    model, layer = random_model(args.model), gradcam_layer(args.model)
    images, labels = random_images(args.images)
    models = {layout: laid_out(model, layout) for layout in {s.layout for s in settings}}
    rates = time_settings(settings, models, layer, images, labels, args.repeats)
    ours = Setting("ours", args.batch)
    models.setdefault("plain", model)
    our_maps = raw_maps(ours, models, layer, images, labels)
    our_reaction, _ = reaction_from_map(our_maps)
    ours_rate = rates[ours][0] if ours in rates else float("nan")
    memory = {setting: extra_memory_in_subprocess(setting, args) for setting in settings}
    rows = []
    for setting in settings:
        maps = raw_maps(setting, models, layer, images, labels)
        nograd = memory.get(Setting("nograd", setting.batch, setting.layout))
        extra = memory[setting]
        rows.append(Row(
            setting, setting.label(args.batch), *rates[setting], rates[setting][0] / ours_rate,
            "n/a" if maps is None else f"{int(reaction_from_map(maps)[1].sum())}/{len(maps)}",
            None if maps is None else max_relative_map_difference(maps, our_maps[:len(maps)]),
            None if maps is None else max_relative_reaction_difference(
                reaction_from_map(maps)[0], our_reaction[:len(maps)]),
            extra, None if extra is None or not nograd else extra / nograd))
    return rows


# --- the report ---------------------------------------------------------------------------


def _number(value: float | None, form: str) -> str:
    return "n/a" if value is None else format(value, form)


def table(rows: list[Row]) -> str:
    lines = ["| method | images/s | images/CPU-s | × vs ours | empty maps | max rel diff map "
             "| max rel diff Reaction | peak extra MiB | × no-grad fwd |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row.method} | {row.images_per_s:.1f} | {row.images_per_cpu_s:.1f} "
                     f"| {row.vs_ours:.2f} | {row.empty_maps} "
                     f"| {_number(row.map_difference, '.1e')} "
                     f"| {_number(row.reaction_difference, '.1e')} "
                     f"| {_number(row.extra_mib, '.0f')} | {_number(row.extra_vs_nograd, '.2f')} |")
    return "\n".join(lines)


def summary(rows: list[Row]) -> str:
    """Per batch size and layout: ours against the fastest other Grad-CAM, and memory."""
    lines = []
    for ours in (row for row in rows if row.setting.method == "ours"):
        peers = [row for row in rows if row.setting.method not in OURS
                 and (row.setting.batch, row.setting.layout)
                 == (ours.setting.batch, ours.setting.layout)]
        where = _where(ours)
        if peers:
            fastest = max(peers, key=lambda row: row.images_per_s)
            lines.append(f"{where}: ours / fastest other ({METHODS[fastest.setting.method].title})"
                         f": {ours.images_per_s / fastest.images_per_s:.2f}x in images/s, "
                         f"{ours.images_per_cpu_s / fastest.images_per_cpu_s:.2f}x in "
                         "images/CPU-s (goal >= 1.5x)")
        if ours.extra_vs_nograd is not None:
            lines.append(f"{where}: ours extra memory / no-grad forward's: "
                         f"{ours.extra_vs_nograd:.2f}x (goal <= 2x)")
    return "\n".join([*lines, *_best_against_default(rows)])


def _best_against_default(rows: list[Row]) -> list[str]:
    """Our fastest setting against the fastest other used as plainly as ours was by default."""
    ours = [row for row in rows if row.setting.method == "ours"]
    default = max(row.setting.batch for row in ours)
    peers = [row for row in rows if row.setting.method not in OURS
             and row.setting.batch == default and row.setting.layout == "plain"]
    if len(ours) < 2 or not peers:
        return []
    best = max(ours, key=lambda row: row.images_per_s)
    fastest = max(peers, key=lambda row: row.images_per_s)
    return [f"fastest ours ({_where(best)}) / fastest other at batch {default}, plain "
            f"({METHODS[fastest.setting.method].title}): "
            f"{best.images_per_s / fastest.images_per_s:.2f}x in images/s, "
            f"{best.images_per_cpu_s / fastest.images_per_cpu_s:.2f}x in images/CPU-s"]


def _where(row: Row) -> str:
    return f"batch {row.setting.batch}, {row.setting.layout}"


def forward_gflop(model_name: str) -> float:
    """GFLOP of one image's forward pass: 2 × multiply-adds of every Conv2d and Linear."""
    model = random_model(model_name)
    flops = []

    def count(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        weight = module.weight
        per_output = weight[0].numel() if isinstance(module, nn.Conv2d) else weight.shape[1]
        flops.append(2 * per_output * output[0].numel())

    handles = [m.register_forward_hook(count) for m in model.modules()
               if isinstance(m, nn.Conv2d | nn.Linear)]
    with torch.no_grad():
        model(torch.zeros(1, 1, *IMAGE_SIZE))
    for handle in handles:
        handle.remove()
    return sum(flops) / 1e9


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """The best float32 ``torch.matmul`` rate of this CPU with the current threads."""
    left, right = torch.rand(size, size), torch.rand(size, size)
    torch.matmul(left, right)
    best = min(timed(lambda: torch.matmul(left, right)) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def timed(work) -> float:
    began = time.perf_counter()
    work()
    return time.perf_counter() - began


def flops_lines(rows: list[Row], model_name: str) -> str:
    """Achieved GFLOP/s of ours and of the ONNX backend against the measured matmul rate."""
    per_image, peak = forward_gflop(model_name), matmul_gflops()
    lines = [f"forward: {per_image:.3f} GFLOP per image; torch.matmul 2048x2048 float32: "
             f"{peak:.1f} GFLOP/s"]
    for row in rows:
        if row.setting.method in ("ours", "onnx", "nograd"):
            rate = per_image * row.images_per_s
            lines.append(f"{row.method}: {rate:.1f} GFLOP/s = {rate / peak:.0%} of matmul")
    onnx = [row for row in rows if row.setting.method == "onnx"]
    peers = [row for row in rows if row.setting.method not in OURS]
    if onnx and peers:
        fastest = max(peers, key=lambda row: row.images_per_s)
        lines.append(f"onnx (ours) / fastest other ({fastest.method}): "
                     f"{onnx[0].images_per_s / fastest.images_per_s:.2f}x in images/s, "
                     f"{onnx[0].images_per_cpu_s / fastest.images_per_cpu_s:.2f}x in "
                     "images/CPU-s (goal >= 3x)")
        needed = 3 * fastest.images_per_s
        lines.append(f"3x {fastest.method} = {needed:.1f} images/s = "
                     f"{needed * per_image:.1f} GFLOP/s of forward work alone = "
                     f"{needed * per_image / peak:.0%} of matmul (the FMA peak: "
                     "bench/fma_peak.c)")
    return "\n".join(lines)


def variant_settings(batch: int) -> list[Setting]:
    """Ours and the fastest peers at the batch size and at a quarter of it (so that the
    largest activation of the zoo models at 1x50x200 stays under 32 MiB, glibc's largest
    threshold for serving memory with a fresh mmap), plain and in channels_last."""
    small = max(1, batch // 4)
    return [Setting("nograd", batch), Setting("ours", batch), Setting("captum", batch),
            Setting("torchcam", batch),
            Setting("nograd", small), Setting("ours", small), Setting("captum", small),
            Setting("torchcam", small),
            Setting("nograd", small, "channels_last"), Setting("ours", small, "channels_last"),
            Setting("captum", small, "channels_last"),
            Setting("torchcam", small, "channels_last"),
            Setting("nograd", small, "channels_last+folded"),
            Setting("ours", small, "channels_last+folded")]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def load() -> str:
    try:
        return "load average " + " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "load average n/a"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="example: .venv-bench/bin/python bench/reaction.py "
                                            "--model model4 --images 256")
    parser.add_argument("--model", choices=["model2", "model4"], default="model4")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--variants", action="store_true",
                        help="instead: ours and the fastest peers at batch/4, in channels_last, "
                             "and with batch norm folded into the convolutions")
    parser.add_argument("--json", metavar="PATH", help="also write the results here as JSON")
    parser.add_argument("--memory-of", choices=list(METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--layout", choices=LAYOUTS, default="plain", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_of:
        extra = measure_extra_memory(Setting(args.memory_of, args.batch, args.layout), args.model)
        print(json.dumps({"extra_mib": extra}))
        return
    print(f"{args.model}, {args.images} images of 1x50x200, batch {args.batch}, median of "
          f"{args.repeats} interleaved rounds; {machine()}; {load()}", flush=True)
    settings = (variant_settings(args.batch) if args.variants
                else [Setting(name, args.batch) for name in ["nograd", *COMPARED]])
    rows = benchmark(settings, args)
    print(table(rows))
    print(summary(rows))
    if not args.variants:
        print(flops_lines(rows, args.model))
    print(load())
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"args": vars(args), "machine": machine(), "load": load(),
                       "rows": [asdict(row) for row in rows]}, out, indent=1)


if __name__ == "__main__":
    main()
