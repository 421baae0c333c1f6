"""PyTorch backend: batched Grad-CAM with one forward and one ``autograd.grad`` per batch.

The target layer's output is replaced, inside a forward hook, by a detached copy that
requires grad. Parameters are frozen for the duration of the call. So the forward pass
builds an autograd graph only *after* the target layer, and the backward pass stops there:
nothing before the layer is differentiated, and no parameter receives a ``.grad``.
Because every image's score depends on that image alone in eval mode, the gradient of the
summed target scores is every image's own gradient.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from analyzer.autograd_graph import ModuleCall, watching_calls
from analyzer.backends import BackendKind, BackendSetup, BatchResult, LoadedCheckpoint
from analyzer.bn_fold import FoldedNetwork
from analyzer.dense_cut import sole_dense_layer
from analyzer.gradcam import (
    channel_weights,
    channel_weights_after_pool,
    channel_weights_from_dense,
    reaction_from_map,
    target_scores,
    weighted_map,
)
from analyzer.max_pool import IndexFreeMaxPool
from analyzer.pool_cut import sole_max_pool
from store.checkpoint_files import CheckpointFile, sha256_file
from store.errors import InputError, first_line
from store.model_files import LoadedWeights, load_weights_file
from store.spec import ReactionSpec
from trainer.allocator import MMAP_THRESHOLD, freed_memory_kept
from trainer.devices import resolve_device

logger = logging.getLogger(__name__)


def find_layer(model: nn.Module, name: str) -> nn.Module:
    """The sub-module called ``name``; InputError listing close names when there is none."""
    modules = dict(model.named_modules())
    if name in modules and name:
        return modules[name]
    close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.5)
    hint = f"; close names: {', '.join(close)}" if close else ""
    raise InputError(f"layer {name!r} does not exist in the model{hint}")


def check_feature_map(layer: str, output: object) -> None:
    """InputError unless ``layer``'s output is a feature map ``[batch, channels, H, W]``."""
    if not isinstance(output, Tensor) or output.dim() != 4:
        shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise InputError(f"layer {layer!r} gives {shape}, not a feature map "
                         "[batch, channels, height, width]: choose a convolutional layer")


class _ActivationCapture:
    """Forward hook that keeps the layer's output: as a leaf that cuts the graph there
    (``leaf``), or as it is, when the gradient is taken further on (:class:`_LeafCapture`)."""

    def __init__(self, layer_name: str, leaf: bool = True) -> None:
        self.layer_name = layer_name
        self.leaf = leaf
        self.activation: Tensor | None = None
        self.passed_on: Tensor | None = None

    def __call__(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
        check_feature_map(self.layer_name, output)
        if not self.leaf:  # its only consumer (a max pool, a reshape) does not write to it
            self.activation = output.detach()
            return None
        self.activation = output.detach().requires_grad_(True)
        # A copy goes downstream, so an in-place op after the layer cannot alter A.
        self.passed_on = self.activation.clone()
        return self.passed_on


class _LeafCapture:
    """Forward hook on the module after the layer whose output becomes the leaf the gradient
    is taken at: the max pool that alone follows it (:mod:`analyzer.pool_cut`) or the dense
    layer that alone takes its map (:mod:`analyzer.dense_cut`)."""

    def __init__(self) -> None:
        self.leaf: Tensor | None = None
        self.passed_on: Tensor | None = None

    def __call__(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        self.leaf = output.detach().requires_grad_(True)
        self.passed_on = self.leaf.clone()  # an in-place op further on cannot alter the leaf
        return self.passed_on


@contextlib.contextmanager
def _frozen_parameters(model: nn.Module) -> Iterator[None]:
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _computing(network: nn.Module) -> Iterator[None]:
    """How a batch is computed: eval mode, parameters frozen, autograd on."""
    with _eval_mode(network), _frozen_parameters(network), torch.enable_grad():
        yield


# On a CPU, glibc maps every allocation above its mmap threshold (32 MiB at most by default)
# afresh and page-faults it in on each call: sub-batches keep their largest activation under
# it (1.35x faster for Model IV at 50x200 than whole batches). Where the process keeps freed
# memory (trainer/allocator.py: analyzer reaction does), blocks up to 256 MiB are reused, and
# sub-batches under 128 MiB make the thesis models 1.08-1.18x faster still (fewer, larger
# matrix products; docs/BENCHMARKS.md "A larger sub-batch where freed memory is kept").
_CPU_ACTIVATION_BUDGET = 32 * 2**20
_KEPT_MEMORY_ACTIVATION_BUDGET = MMAP_THRESHOLD // 2


def cpu_activation_budget() -> int:
    """The bytes a CPU sub-batch's largest activation may take (see above)."""
    return _KEPT_MEMORY_ACTIVATION_BUDGET if freed_memory_kept() else _CPU_ACTIVATION_BUDGET


class TorchBackend:
    """Compute Reaction for batches of images with a PyTorch model.

    Args:
        model: any ``nn.Module`` classifier returning logits ``[B, classes]``.
        spec: what is computed: the target layer (qualified name in
            ``model.named_modules()``), score, target and weighting.
        device: where the model runs; images passed to :meth:`compute` must be there.
        channels_last: on a CPU, run the model and the images in the channels-last memory
            format (faster convolutions): True for models known to allow it (the zoo's),
            None to decide on the first batch (:meth:`_choose_layout`), False never.
        fuse_layers: compute with a copy of the model in which each eval-mode batch norm
            that provably follows only a conv is folded into it (:mod:`analyzer.bn_fold`),
            and on a CPU each ReLU that provably follows only a conv is fused into it
            (:mod:`analyzer.conv_relu`) and each 2×2 max pool records no argmax where no
            gradient passes (:mod:`analyzer.max_pool`); kept if the first batch gives the same
            results (:meth:`_choose_folding`). The model itself, and so :attr:`model`, stays
            as it is.
        cut_after_pool: take the gradient after the max pool that alone follows the layer
            (:mod:`analyzer.pool_cut`, the same channel weights without the pool's backward)
            if there is one and the first batch gives the same results
            (:meth:`_choose_pool_cut`).
        cut_at_dense: take the gradient at the output of the dense layer that alone takes
            the map (the layer's, or that pool's), flattened (:mod:`analyzer.dense_cut`: the
            same channel weights without the backward's largest matrix product) if there is
            one and the first batch gives the same results (:meth:`_choose_dense_cut`).
    """

    name = "torch"

    def __init__(self, model: nn.Module, spec: ReactionSpec, device: str | torch.device = "cpu",
                 channels_last: bool | None = False, fuse_layers: bool = False,
                 cut_after_pool: bool = False, cut_at_dense: bool = False) -> None:
        self.spec = spec
        self.device = torch.device(device)
        on_cpu = self.device.type == "cpu"
        self.channels_last = bool(channels_last) and on_cpu
        self._layout_undecided = channels_last is None and on_cpu
        if self.device.type == "cuda":  # float32 as on a CPU: no TF32 in convs or matmuls
            torch.backends.cudnn.conv.fp32_precision = "ieee"
            torch.backends.cuda.matmul.fp32_precision = "ieee"
        memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        self.model = model.to(self.device, memory_format=memory_format)
        self.layer = spec.layer
        self.module = find_layer(model, spec.layer)
        self._bytes_per_image: dict[tuple[int, ...], int] = {}
        self._fold_undecided = fuse_layers
        self._folded: FoldedNetwork | None = None
        self._pool_undecided = cut_after_pool
        self._pool: str | None = None
        self._dense_undecided = cut_at_dense
        self._dense: str | None = None

    @property
    def batch_norm_folded(self) -> bool:
        """Whether batches are computed with batch norm folded into the convs."""
        return self._folded is not None and bool(self._folded.folds)

    @property
    def relu_fused(self) -> bool:
        """Whether batches are computed with ReLUs fused into the convs."""
        return self._folded is not None and self._folded.fused_relus > 0

    @property
    def pools_without_indices(self) -> bool:
        """Whether batches are computed with 2×2 max pools that record no argmax."""
        return self._folded is not None and self._folded.index_free_pools > 0

    @property
    def gradient_pool(self) -> str | None:
        """The max pool after which the gradient is taken (None: at the layer itself)."""
        return self._pool

    @property
    def gradient_dense(self) -> str | None:
        """The dense layer at whose output the gradient is taken (None: not at one)."""
        return self._dense

    def _network(self) -> tuple[nn.Module, nn.Module]:
        """The network batches are computed with, and its Grad-CAM layer."""
        if self._folded is not None:
            return self._folded.model, self._folded.module
        return self.model, self.module

    def load_weights(self, state_dict: dict[str, Tensor]) -> None:
        """Load a checkpoint's weights; InputError naming the keys that do not fit."""
        expected = self.model.state_dict()
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        wrong_shape = sorted(key for key in set(expected) & set(state_dict)
                             if expected[key].shape != state_dict[key].shape)
        if missing or unexpected or wrong_shape:
            raise InputError("weights do not fit the model: " + _describe_mismatch(
                missing, unexpected, wrong_shape))
        self.model.load_state_dict(state_dict)
        if self._folded is not None:
            self._folded.refold()

    def compute(self, images: Tensor, labels: Tensor, keep_maps: bool = False) -> BatchResult:
        """Logits, Reaction and empty-map flags of a batch (eval mode, float32).

        Each sub-batch costs one forward and one ``autograd.grad``. On a CPU the batch is cut
        into sub-batches whose largest activation stays under :func:`cpu_activation_budget`;
        every image's result depends on that image alone, so the cut changes no value.
        """
        size = self._sub_batch_size(images)
        pairs = list(zip(images.split(size), labels.split(size), strict=True))
        parts = []
        if pairs and (self._layout_undecided or self._fold_undecided or
                      self._pool_undecided or self._dense_undecided):
            parts.append(self._first_batch(*pairs.pop(0), keep_maps))
        parts += [self.compute_batch(part_images, part_labels, keep_maps)
                  for part_images, part_labels in pairs]
        if len(parts) == 1:
            return parts[0]
        return BatchResult(torch.cat([p.logits for p in parts]),
                           torch.cat([p.reaction for p in parts]),
                           torch.cat([p.empty for p in parts]),
                           torch.cat([p.cam for p in parts]) if keep_maps else None)

    def _first_batch(self, images: Tensor, labels: Tensor, keep_maps: bool) -> BatchResult:
        """The first sub-batch, deciding the memory layout, then folding and fusing, then
        where the gradient is taken (after the pool, then at the dense layer)."""
        if self._layout_undecided:
            reference = self._choose_layout(images, labels, keep_maps)
        else:
            reference = self.compute_batch(images, labels, keep_maps)
        result = reference
        if self._fold_undecided:
            result = self._choose_folding(images, labels, keep_maps, reference)
        if self._pool_undecided:
            result = self._choose_pool_cut(images, labels, keep_maps, reference) or result
        if self._dense_undecided:
            result = self._choose_dense_cut(images, labels, keep_maps, reference) or result
        return result

    def _choose_pool_cut(self, images: Tensor, labels: Tensor, keep_maps: bool,
                         reference: BatchResult) -> BatchResult | None:
        """Find the max pool that alone takes the layer's output (:mod:`analyzer.pool_cut`)
        and compute the first batch with the gradient taken after it; keep that if it gives
        the same results as ``reference`` (rel. 1e-4), and return it. None, and the gradient
        taken at the layer, when there is no such pool (silently) or the results differ."""
        self._pool_undecided = False
        pool = self._probe(images[:1], labels[:1], (nn.MaxPool2d, IndexFreeMaxPool),
                           sole_max_pool)
        if pool is None:
            return None
        self._pool = pool
        candidate, why = self._candidate(images, labels, keep_maps, reference, _MODEL_ERRORS)
        if candidate is not None:
            return candidate
        self._pool = None
        logger.warning(f"the gradient is taken at the layer, not after the max pool {pool!r} "
                       f"that follows it ({why})")
        return None

    def _choose_dense_cut(self, images: Tensor, labels: Tensor, keep_maps: bool,
                          reference: BatchResult) -> BatchResult | None:
        """Find the dense layer that alone takes the map, flattened (:mod:`analyzer
        .dense_cut`), and compute the first batch with the gradient taken at its output;
        keep that if it gives the same results as ``reference`` (rel. 1e-4), and return it.
        None, and the gradient taken where it was, when there is no such layer (silently)
        or the results differ."""
        self._dense_undecided = False
        dense = self._probe(images[:1], labels[:1], (nn.Linear,), sole_dense_layer)
        if dense is None:
            return None
        self._dense = dense
        candidate, why = self._candidate(images, labels, keep_maps, reference, _MODEL_ERRORS)
        if candidate is not None:
            return candidate
        self._dense = None
        logger.warning(f"the gradient is not taken at the output of the dense layer {dense!r} "
                       f"that takes the map ({why})")
        return None

    def _candidate(self, images: Tensor, labels: Tensor, keep_maps: bool,
                   reference: BatchResult, errors: tuple[type[Exception], ...]
                   ) -> tuple[BatchResult | None, str]:
        """The first batch computed as the backend is now set up, if it gives ``reference``'s
        results (:func:`_same_results`); else None and why not (one of ``errors`` raised by
        the computation, or the results differ)."""
        try:
            candidate = self.compute_batch(images, labels, keep_maps)
        except errors as error:
            return None, first_line(error)
        if _same_results(candidate, reference):
            return candidate, ""
        return None, "its results differ"

    def _probe(self, images: Tensor, labels: Tensor, kinds: tuple[type[nn.Module], ...],
               find: Callable[[list[ModuleCall], Tensor, Tensor], str | None]) -> str | None:
        """In a forward of ``images``, the module of one of the types ``kinds`` that ``find``
        reads off the autograd graph as the one that alone takes T: the layer's output, or
        the output of the max pool the gradient is taken after."""
        network, module = self._network()
        capture = _ActivationCapture(self.layer)
        handles = [module.register_forward_hook(capture)]
        pooled = None
        if self._pool is not None:
            pooled = _LeafCapture()
            handles.append(network.get_submodule(self._pool).register_forward_hook(pooled))
        try:
            with watching_calls(network, kinds) as calls, _computing(network):
                _, scores = self._scores(network, images, labels)
                passed_on = (pooled or capture).passed_on
                if passed_on is None:
                    return None
                return find(calls, passed_on, scores)
        finally:
            for handle in handles:
                handle.remove()

    def _scores(self, network: nn.Module, images: Tensor, labels: Tensor
                ) -> tuple[Tensor, Tensor]:
        """Logits and target scores of a forward pass (under the caller's modes and hooks)."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        logits = network(images)
        targets = labels if self.spec.target == "label" else logits.argmax(dim=1)
        return logits, target_scores(logits, targets, self.spec.score)

    def _choose_folding(self, images: Tensor, labels: Tensor, keep_maps: bool,
                        reference: BatchResult) -> BatchResult:
        """Compute the first batch again with batch norm folded and ReLUs fused; keep that
        copy if it gives the model's own results (rel. 1e-4), else compute the model as it
        is, with a note. A model with nothing to fold or fuse is computed as it is, silently."""
        self._fold_undecided = False
        try:
            folded = FoldedNetwork.build(self.model, self.layer, images[:1])
        except _MODEL_ERRORS as error:
            logger.warning(f"batch norm and ReLU are not fused into the convolutions: the "
                           f"model cannot be copied or probed ({first_line(error)})")
            return reference
        if folded is None:
            return reference
        folded.set_memory_format(torch.channels_last if self.channels_last
                                 else torch.contiguous_format)
        self._folded = folded
        # _MODEL_ERRORS: a forward may read a replaced module's attributes
        candidate, why = self._candidate(images, labels, keep_maps, reference, _MODEL_ERRORS)
        if candidate is not None:
            return candidate
        self._folded = None
        logger.warning(f"batch norm and ReLU are not fused into the convolutions ({why}): "
                       f"the model is computed as it is")
        return reference

    def _choose_layout(self, images: Tensor, labels: Tensor, keep_maps: bool) -> BatchResult:
        """Compute a first batch in both memory layouts; keep channels-last if it gives the
        same results (rel. 1e-4), else the default layout, with a note. A model that
        ``.view()``s a feature map fails under channels-last: that is a "no" too."""
        self._layout_undecided = False
        reference = self.compute_batch(images, labels, keep_maps)
        self.model.to(memory_format=torch.channels_last)
        self.channels_last = True
        candidate, why = self._candidate(images, labels, keep_maps, reference, (RuntimeError,))
        if candidate is not None:
            return candidate
        self.model.to(memory_format=torch.contiguous_format)
        self.channels_last = False
        logger.warning(f"the model runs in the default memory layout: channels-last, faster "
                       f"on a CPU, does not suit it ({why})")
        return reference

    def logits(self, images: Tensor) -> Tensor:
        """Logits of a batch, eval mode, without autograd: a forward pass only.

        Cut into sub-batches on a CPU as :meth:`compute` is (the cut changes no value).
        """
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        network, _ = self._network()
        with _eval_mode(network), torch.no_grad():
            return torch.cat([network(part) for part in
                              images.split(self._sub_batch_size(images))])

    def _sub_batch_size(self, images: Tensor) -> int:
        if self.device.type != "cpu" or len(images) <= 1:
            return max(len(images), 1)
        shape = tuple(images.shape[1:])
        if shape not in self._bytes_per_image:
            self._bytes_per_image[shape] = _largest_activation_bytes(self.model, images[:1])
        return max(1, min(len(images), cpu_activation_budget() // self._bytes_per_image[shape]))

    def compute_batch(self, images: Tensor, labels: Tensor, keep_maps: bool = False) -> BatchResult:
        """One forward and one ``autograd.grad`` for the whole batch, uncut.

        This is the computation the ONNX export traces (:mod:`analyzer.onnx_export`), on a
        backend that does not fold batch norm: the graph is the model's own.
        """
        network, module = self._network()
        cut = self._dense or self._pool  # the module whose output the gradient is taken at
        capture = _ActivationCapture(self.layer, leaf=cut is None)
        handles = [module.register_forward_hook(capture)]
        leaf = None
        if cut is not None:
            leaf = _LeafCapture()
            handles.append(network.get_submodule(cut).register_forward_hook(leaf))
        try:
            with _computing(network):
                logits, scores = self._scores(network, images, labels)
                if capture.activation is None:
                    raise InputError(f"layer {self.layer!r} was not used by the forward pass")
                if leaf is not None and leaf.leaf is None:
                    raise InputError(f"{cut!r}, after layer {self.layer!r}, was not used by the "
                                     "forward pass")
                weights = self._channel_weights(network, scores, capture.activation, leaf)
        finally:
            for handle in handles:
                handle.remove()
        activation = capture.activation.detach()
        cam = weighted_map(activation, weights)
        reaction, empty = reaction_from_map(cam)
        return BatchResult(logits.detach(), reaction, empty, cam if keep_maps else None)

    def _channel_weights(self, network: nn.Module, scores: Tensor, activation: Tensor,
                         leaf: _LeafCapture | None) -> Tensor:
        """alpha ``[B, K]``, from the gradient at the layer, or at the output of the pool or
        the dense layer it is taken at (``leaf``)."""
        if leaf is None:
            return channel_weights(_gradient(scores, activation))
        gradient = _gradient(scores, leaf.leaf)
        height, width = activation.shape[-2:]
        if self._dense is None:
            return channel_weights_after_pool(gradient, height, width)
        weight = network.get_submodule(self._dense).weight
        return channel_weights_from_dense(gradient, weight, activation.shape[1], height, width)


# What copying a model, or running its copy, may raise: refused, with a note, not fatal.
_MODEL_ERRORS = (RuntimeError, TypeError, AttributeError, ValueError, KeyError, IndexError,
                 copy.Error)


def _same_results(candidate: BatchResult, reference: BatchResult) -> bool:
    """A batch's logits equal up to float32 rounding (:func:`_close`), and its Reactions
    too (:func:`_differing`) but for one image in fifty, and one in a batch of ten or more:
    where a hidden ReLU's input lies within rounding of 0, another algorithm's rounding may
    flip it, and with it that image's gradient (docs/BENCHMARKS.md, "The gradient at the dense
    layer"); a different computation shows on most images."""
    images = len(reference.reaction)
    allowed = max(images // 50, 1 if images >= 10 else 0)
    return _close(candidate.logits, reference.logits) and \
        _differing(candidate.reaction, reference.reaction) <= allowed


def _scale(reference: Tensor) -> float:
    """The largest finite magnitude (NaN compares unequal, without an error)."""
    finite = torch.nan_to_num(reference.abs(), nan=0.0, posinf=0.0)
    return float(finite.max()) if reference.numel() else 0.0


def _close(candidate: Tensor, reference: Tensor) -> bool:
    """Equal up to float32 rounding of another convolution algorithm (logits: the absolute
    tolerance scaled to the largest, or to 1)."""
    atol = 1e-6 * max(_scale(reference), 1.0)
    return bool(torch.allclose(candidate, reference, rtol=1e-4, atol=atol))


def _differing(candidate: Tensor, reference: Tensor) -> int:
    """How many entries differ by more than float32 rounding: 1e-4 of their own value plus
    1e-6 of the largest, without an absolute floor (Reactions are 1e-7 to 1e-3); NaN differs."""
    tolerance = 1e-4 * reference.abs() + 1e-6 * _scale(reference)
    return int((~((candidate - reference).abs() <= tolerance)).sum())


def _largest_activation_bytes(model: nn.Module, image: Tensor) -> int:
    """Bytes of the largest output of any leaf module for one image (a no-grad probe)."""
    sizes = [image.numel() * image.element_size()]

    def record(module: nn.Module, inputs: tuple, output: object) -> None:
        if isinstance(output, Tensor):
            sizes.append(output.numel() * output.element_size())

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    handles = [leaf.register_forward_hook(record) for leaf in leaves]
    try:
        with torch.no_grad(), _eval_mode(model):
            model(image)
    finally:
        for handle in handles:
            handle.remove()
    return max(sizes)


def _gradient(scores: Tensor, activation: Tensor) -> Tensor:
    """d(sum of scores)/dA; zero when the scores do not depend on the layer at all."""
    if not scores.requires_grad:
        return torch.zeros_like(activation)
    (gradients,) = torch.autograd.grad(scores.sum(), activation, allow_unused=True)
    return torch.zeros_like(activation) if gradients is None else gradients


def _describe_mismatch(missing: list[str], unexpected: list[str], wrong_shape: list[str]) -> str:
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected),
                        ("wrong shape", wrong_shape)):
        if keys:
            shown = ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
            parts.append(f"{label}: {shown}")
    return "; ".join(parts)


class TorchKind(BackendKind):
    """PyTorch checkpoints (weights, or ``.pt2`` programs) on a :class:`TorchBackend`.

    Weights are loaded into one network kept for the whole pass (built once); a checkpoint
    that carries its own network (``.pt2``) gets a backend of its own.
    """

    name = "torch"

    def __init__(self, setup: BackendSetup) -> None:
        super().__init__(setup)
        model = setup.inputs.model
        self._shared = None if model is None else TorchBackend(
            model, setup.spec, setup.device,
            channels_last=True if setup.inputs.model_spec is not None else None,  # zoo: yes
            fuse_layers=True, cut_after_pool=True, cut_at_dense=True)

    @staticmethod
    def device(requested: str) -> str:
        """``auto`` → CUDA when torch sees a GPU, else the CPU."""
        return str(resolve_device(requested))

    def load(self, checkpoint: CheckpointFile) -> LoadedCheckpoint:
        """Read the weights (or program) and hash the file; on a GPU, start copying the
        weights to it (pinned memory, a side stream: the copy overlaps the computation of
        the checkpoint before)."""
        weights = load_weights_file(checkpoint.path)
        staged = _StagedWeights.start(weights, self.setup.device)
        return LoadedCheckpoint(checkpoint, sha256_file(checkpoint.path), staged)

    def backend(self, loaded: LoadedCheckpoint) -> TorchBackend:
        """The shared network with this checkpoint's weights, or its own program."""
        weights = loaded.content.arrived()
        name = loaded.checkpoint.path.name
        if weights.module is not None:
            return TorchBackend(weights.module, self.setup.spec, self.setup.device)
        if (weights.state_dict is None and weights.graph_weights is None) or \
                self._shared is None:
            raise InputError(f"{name}: cannot load it into the model: give --model")
        try:
            self._shared.load_weights(weights.weights_for(self._shared.model.state_dict()))
        except InputError as error:
            raise InputError(f"{name}: {error}") from None
        return self._shared


@dataclass
class _StagedWeights:
    """A checkpoint's weights, on a CUDA device already copied (or being copied) to it.

    The loading thread pins each tensor and copies it with ``non_blocking=True`` on a stream
    of its own, then records an event; :meth:`arrived`, in the computing thread, makes the
    computing stream wait for that event (on the GPU, not the host) and marks the tensors as
    used by it, so the caching allocator cannot hand their memory out early. Elsewhere the
    weights stay as they were read.
    """

    weights: LoadedWeights
    device: torch.device | None = None
    ready: torch.cuda.Event | None = None

    @classmethod
    def start(cls, weights: LoadedWeights, device: str) -> _StagedWeights:
        """Begin the copy of ``weights.state_dict`` to ``device`` (only a CUDA one)."""
        device = torch.device(device)
        if device.type != "cuda" or weights.state_dict is None:
            return cls(weights)
        stream = torch.cuda.Stream(device)
        with torch.cuda.stream(stream):
            moved = {key: value.pin_memory().to(device, non_blocking=True)
                     for key, value in weights.state_dict.items()}
        ready = torch.cuda.Event()
        ready.record(stream)
        return cls(replace(weights, state_dict=moved), device, ready)

    def arrived(self) -> LoadedWeights:
        """The weights, usable by work queued on the current stream from now on."""
        if self.ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self.ready)
            for tensor in self.weights.state_dict.values():
                tensor.record_stream(current)
        return self.weights
