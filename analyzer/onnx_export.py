"""Export CNN checkpoints to ONNX files that compute Reaction themselves (docs/ONNX.md).

The graph is the torch backend's own computation of a batch: one forward pass, the target
scores, the gradient of their sum with respect to the layer's activation
(``torch.autograd.grad``), the Grad-CAM map and the Reaction. ``make_fx`` traces that
computation, backward pass included, into plain ATen operations with a symbolic batch size,
and ``torch.onnx.export(dynamo=True)`` turns the trace into ONNX with a dynamic batch
dimension.

The weights are inputs of the trace and become initializers named after the model's
``state_dict``, so one trace serves every epoch of a run: writing an epoch's file only fills in
its weights. The first file written is checked against the PyTorch backend with ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from analyzer.graph_keys import structure_digest, trace_digest
from analyzer.torch_backend import TorchBackend
from store.checkpoint_files import TORCH_SUFFIXES, CheckpointFile, discover_checkpoints
from store.errors import InputError
from store.graph_cache import GraphCache, default_cache_dir
from store.model_files import load_weights_file, strip_common_prefix
from store.onnx_files import (
    CAM,
    EMPTY,
    IMAGES,
    LOGITS,
    ONNX_FORMAT,
    ONNX_FORMAT_VERSION,
    REACTION,
    TARGETS,
    OnnxContract,
    OnnxFile,
    contract_of,
    onnx_name,
    read_onnx_contract,
    write_onnx_file,
)
from store.spec import ReactionSpec

if TYPE_CHECKING:
    from analyzer.network import NetworkInputs
    from trainer.train import SavedCheckpoint

logger = logging.getLogger(__name__)

OPSET = 18
_EXAMPLE_BATCH = 2  # traced with a symbolic batch; 0 and 1 would be specialised
_MAX_BYTES = 2**31 - 2**26  # protobuf's 2 GiB limit, with room for the graph itself


@dataclass(frozen=True)
class ExportSettings:
    """What the exported graph computes, and whether it also outputs the raw maps."""

    spec: ReactionSpec
    with_maps: bool = False


class _ReactionGraph(nn.Module):
    """``forward(images, targets)`` → logits, reaction, empty[, cam], via the torch backend.

    It traces the backend's one-batch computation: ``compute`` itself may cut a CPU batch
    into sub-batches, a decision on the batch size that a graph with a dynamic batch leaves
    to the runtime.
    """

    def __init__(self, backend: TorchBackend, with_maps: bool) -> None:
        super().__init__()
        self.model = backend.model
        self.backend = backend
        self.with_maps = with_maps

    def forward(self, images: Tensor, targets: Tensor) -> tuple[Tensor, ...]:
        result = self.backend.compute_batch(images, targets, keep_maps=self.with_maps)
        outputs = (result.logits, result.reaction, result.empty)
        return (*outputs, result.cam) if self.with_maps else outputs


class ReactionGraphExporter:
    """Trace a network once; then write the ONNX file of any checkpoint of it in milliseconds.

    Args:
        model: the network (copied; the original is left alone).
        settings: what the graph computes (layer, score, target, weighting), and whether it
            outputs the maps.
        channels, image_size: the input the graph takes, ``[batch, channels, H, W]``.
        class_names: stored in the files' metadata when known.
        model_spec: the zoo spec JSON (``trainer models``), stored when the model is a zoo one.
        graph_cache: read and store the exported graph in the persistent cache
            (:mod:`store.graph_cache`; its folder from the environment), keyed on the trace.
        cut_after_pool: take the gradient after the max pool that alone follows the layer,
            where there is one (:mod:`analyzer.pool_cut`: the same results, no pool indices
            or scatter in the graph); False: at the layer itself (bench/pool_cut.py times
            both).
        cut_at_dense: take the gradient at the output of the dense layer that alone takes
            the map, flattened, where there is one (:mod:`analyzer.dense_cut`: the same
            results, no product of the gradient with the dense layer's whole weight).
    """

    def __init__(self, model: nn.Module, settings: ExportSettings, *, channels: int,
                 image_size: tuple[int, int], class_names: list[str] | None = None,
                 model_spec: str | None = None, graph_cache: bool = True,
                 cut_after_pool: bool = True, cut_at_dense: bool = True) -> None:
        self.settings = settings
        self.channels, self.image_size = channels, tuple(image_size)
        network = copy.deepcopy(model).cpu().float()
        self.backend = TorchBackend(network, settings.spec, "cpu", cut_after_pool=cut_after_pool,
                                    cut_at_dense=cut_at_dense)
        if cut_after_pool or cut_at_dense:
            _decide_where_the_gradient_is_taken(self.backend, self.channels, self.image_size)
        self._metadata = _file_metadata(settings, self.channels, self.image_size, class_names,
                                        model_spec)
        cache = GraphCache(default_cache_dir() if graph_cache else None)
        graph = _ReactionGraph(self.backend, settings.with_maps)
        exported = _trace_and_export(graph, settings, self.channels, self.image_size, cache)
        self._use(exported)
        if exported.cached and not self._reproduces_the_network():
            logger.warning(f"graph cache: the graph in {cache.path(exported.key)} does not "
                           "reproduce this network: exported again (please report this model)")
            self._use(_trace_and_export(graph, settings, self.channels, self.image_size, cache,
                                        read_cache=False))
        self._verified = False

    def _use(self, exported: _Exported) -> None:
        self._template, self._weight_names = exported.model, exported.weight_names
        self._template.metadata_props.extend(_entries(self._metadata))
        self.contract: OnnxContract = contract_of(self._template, Path("exported graph"))
        self._weightless: bytes | None = None

    def _reproduces_the_network(self) -> bool:
        """Whether the graph, given the network's weights as they are, computes what the
        PyTorch backend does (the check of a graph read from the cache)."""
        from analyzer.onnx_backend import OnnxBackend

        file = OnnxFile(Path("cached graph"), self.weightless_template, "", self.contract)
        try:
            self._compare(OnnxBackend(file, initializers=self.weight_arrays()).session)
        except InputError:
            return False
        return True

    def load_weights(self, state_dict: dict[str, Tensor]) -> None:
        """Put a checkpoint's weights in (InputError naming the keys that do not fit)."""
        expected = set(self.backend.model.state_dict())
        self.backend.load_weights(strip_common_prefix(state_dict, expected))

    def model_bytes(self, *, epoch: int | None = None, source_sha256: str = "",
                    source_file: str = "") -> bytes:
        """The ONNX file of the weights loaded last, serialized."""
        import onnx
        from onnx import numpy_helper

        model = onnx.ModelProto()
        model.CopyFrom(self._template)
        tensors = _named_tensors(self.backend.model)
        size = sum(tensors[name].numel() * tensors[name].element_size()
                   for name in self._weight_names)
        if size > _MAX_BYTES:
            raise InputError(f"the weights take {size / 2**30:.1f} GiB: single-file ONNX "
                             "export is limited to 2 GiB")
        model.graph.initializer.extend(
            numpy_helper.from_array(tensors[name].detach().cpu().numpy(), name)
            for name in self._weight_names)
        per_file = {"epoch": "" if epoch is None else str(epoch),
                    "source_sha256": source_sha256, "source_file": source_file}
        model.metadata_props.extend(_entries({k: v for k, v in per_file.items() if v}))
        payload = model.SerializeToString()
        if not self._verified:
            self.check_once(_checked_session(payload))
        return payload

    @property
    def weightless_template(self) -> bytes:
        """The graph serialised once with every weight a placeholder without data, for an
        ONNX Runtime session given the weights as external initializers
        (:meth:`weight_arrays`, ``SessionOptions.add_external_initializers``).
        """
        if self._weightless is None:
            import onnx

            model = onnx.ModelProto()
            model.CopyFrom(self._template)
            tensors = _named_tensors(self.backend.model)
            model.graph.initializer.extend(_placeholder(name, tensors[name])
                                           for name in self._weight_names)
            self._weightless = model.SerializeToString()
        return self._weightless

    def weight_arrays(self) -> dict[str, np.ndarray]:
        """Copies of the weights loaded last, by initializer name (the network's tensors are
        overwritten by the next :meth:`load_weights`; a session may keep using these)."""
        tensors = _named_tensors(self.backend.model)
        return {name: tensors[name].detach().cpu().numpy().copy() for name in self._weight_names}

    def check_once(self, session: object) -> None:
        """The self-check of the first session (compared with the PyTorch backend on the
        weights loaded last); later calls do nothing."""
        if not self._verified:
            self._compare(session)
            self._verified = True

    def _compare(self, session: object) -> None:
        """Run ``session`` and the PyTorch backend on the same random images (InputError if
        they differ)."""
        _verify(session, self.backend, self.channels, self.image_size, self.contract.num_classes)


def _decide_where_the_gradient_is_taken(backend: TorchBackend, channels: int,
                                        image_size: tuple[int, int]) -> None:
    """Compute a first batch of random images, so that the backend decides where the
    gradient is taken (:mod:`analyzer.pool_cut`, :mod:`analyzer.dense_cut`) before the trace.
    A model that cannot compute them fails here, as it would in the trace."""
    generator = torch.Generator().manual_seed(2)
    images = torch.rand(_EXAMPLE_BATCH, channels, *image_size, generator=generator)
    try:
        backend.compute(images, torch.zeros(_EXAMPLE_BATCH, dtype=torch.long))
    except InputError:
        raise
    except Exception as error:  # a network that does not take these images
        raise _cannot_export(error) from None


def _cannot_export(error: Exception) -> InputError:
    """The one-line error for a model that torch cannot compute, trace or export."""
    lines = str(error).strip().splitlines()
    return InputError(f"cannot export the model to ONNX: {type(error).__name__}: "
                      f"{lines[0] if lines else ''}")


def _placeholder(name: str, tensor: Tensor):
    """An initializer that declares ``tensor``'s name, type and shape, its data external (never
    read: ONNX Runtime is given the data as an external initializer)."""
    from onnx import TensorProto, helper

    placeholder = TensorProto(name=name, dims=list(tensor.shape),
                              data_type=helper.np_dtype_to_tensor_dtype(
                                  tensor.detach().cpu().numpy().dtype))
    placeholder.data_location = TensorProto.EXTERNAL
    placeholder.external_data.add(key="location", value="weights-given-at-session-build")
    return placeholder


def _file_metadata(settings: ExportSettings, channels: int, image_size: tuple[int, int],
                   class_names: list[str] | None, model_spec: str | None) -> dict[str, str]:
    import json

    metadata = {"format": ONNX_FORMAT, "format_version": ONNX_FORMAT_VERSION,
                **settings.spec.attributes(),
                "image_size": f"{image_size[0]}x{image_size[1]}", "channels": str(channels)}
    if class_names is not None:
        metadata["classes"] = json.dumps(list(class_names))
    if model_spec is not None:
        metadata["model"] = model_spec
    return metadata


def _entries(metadata: dict[str, str]) -> list:
    from onnx import StringStringEntryProto

    return [StringStringEntryProto(key=key, value=value) for key, value in metadata.items()]


def _named_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer by qualified name (non-persistent buffers too)."""
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    return tensors


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's warnings, log lines and prints; errors still propagate."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript",
                                                    "torch._dynamo", "torch.fx")]
    levels = [quieted.level for quieted in loggers]
    for quieted in loggers:
        quieted.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for quieted, level in zip(loggers, levels, strict=True):
            quieted.setLevel(level)


@dataclass
class _Trace:
    """``make_fx``'s graph of the Reaction computation and the example inputs it was traced
    with (the weights by name, the order of the graph's inputs after images and targets)."""

    module: nn.Module
    images: Tensor
    targets: Tensor
    weights: dict[str, Tensor]
    with_maps: bool


@dataclass
class _Exported:
    """The ONNX ModelProto of a Reaction graph without weights, the names of its weights, its
    key in the graph cache (None: not cacheable) and whether it was read from there."""

    model: object
    weight_names: list[str]
    key: str | None
    cached: bool


def _trace_and_export(graph: _ReactionGraph, settings: ExportSettings, channels: int,
                      image_size: tuple[int, int], cache: GraphCache,
                      read_cache: bool = True) -> _Exported:
    """The graph from the cache when it holds one under the network's key (and
    ``read_cache``), else traced and exported, and stored under that key."""
    try:
        with _quiet():
            trace = None
            key = _graph_key("structure", structure_digest(graph.model, _traced_sources()),
                             graph, settings, channels, image_size)
            if key is None:  # a network the structure digest cannot vouch for
                trace = _trace(graph, channels, image_size)
                key = _graph_key("trace", trace_digest(trace.module), graph, settings,
                                 channels, image_size)
            model = _cached_graph(cache, key, graph.with_maps) if read_cache else None
            cached = model is not None
            if not cached:
                model = _to_onnx(trace or _trace(graph, channels, image_size)).model_proto
    except InputError:
        raise
    except Exception as error:  # torch's tracers and exporter raise many types
        raise _cannot_export(error) from None
    model, names = _weights_as_initializers(model, list(_graph_weights(graph)))
    if key is not None and not cached:
        cache.put(key, model.SerializeToString())
    return _Exported(model, names, key, cached)


_GRAPH_CACHE_VERSION = 4  # raise when what the key covers or the stored graph changes


def _traced_sources() -> list:
    """The modules of this project whose code the graph computes around the network."""
    import sys

    from analyzer import autograd_graph, dense_cut, gradcam, pool_cut, torch_backend
    from store import spec

    return [torch_backend, gradcam, autograd_graph, pool_cut, dense_cut, spec,
            sys.modules[__name__]]


def _graph_key(kind: str, digest: bytes | None, graph: _ReactionGraph,
               settings: ExportSettings, channels: int, image_size: tuple[int, int]) -> str | None:
    """SHA-256 of everything the exported graph depends on: the network's ``digest``
    (:mod:`analyzer.graph_keys`, of the given ``kind``), every weight's name, shape and dtype,
    the settings, the input, the versions of torch, onnx and onnxscript, the opset. None (no
    caching) without a digest."""
    import hashlib
    import json
    from importlib import metadata

    if digest is None:
        return None
    described = {"version": _GRAPH_CACHE_VERSION, "digest": kind, "opset": OPSET,
                 "batch": _EXAMPLE_BATCH, "torch": torch.__version__,
                 "onnx": metadata.version("onnx"), "onnxscript": metadata.version("onnxscript"),
                 "spec": settings.spec.attributes(), "with_maps": settings.with_maps,
                 "gradient_pool": graph.backend.gradient_pool,
                 "gradient_dense": graph.backend.gradient_dense,
                 "channels": channels, "image_size": list(image_size),
                 "weights": [[name, list(tensor.shape), str(tensor.dtype)]
                             for name, tensor in _graph_weights(graph).items()]}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode() + digest).hexdigest()


def _cached_graph(cache: GraphCache, key: str | None, with_maps: bool):
    """The ModelProto stored under ``key``; None when there is none, or it does not parse or
    does not have the graph's outputs (then it is rewritten)."""
    payload = cache.get(key) if key is not None else None
    if payload is None:
        return None
    import onnx

    try:
        model = onnx.load_model_from_string(payload)
    except Exception as error:  # protobuf's DecodeError and onnx's own
        logger.debug(f"graph cache: ignoring an entry that is not an ONNX model ({error})")
        return None
    if [value.name for value in model.graph.output] != _outputs(with_maps) or \
            not model.graph.node:
        logger.debug("graph cache: ignoring an entry that is not a Reaction graph")
        return None
    return model


def _outputs(with_maps: bool) -> list[str]:
    """The Reaction graph's output names, in order."""
    return [LOGITS, REACTION, EMPTY] + ([CAM] if with_maps else [])


def _graph_weights(graph: _ReactionGraph) -> dict[str, Tensor]:
    """The network's parameters and buffers by ``state_dict`` name: the trace's inputs after
    the images and targets."""
    return {name.removeprefix("model."): tensor for name, tensor in
            _named_tensors(graph).items()}


def _trace(graph: _ReactionGraph, channels: int, image_size: tuple[int, int]) -> _Trace:
    """``make_fx`` of the graph's forward, the weights as inputs, only the batch symbolic."""
    from torch.fx.experimental.proxy_tensor import make_fx

    tensors = _graph_weights(graph)
    names = list(tensors)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(_EXAMPLE_BATCH, channels, *image_size, generator=generator)
    targets = torch.zeros(_EXAMPLE_BATCH, dtype=torch.long)

    def reaction_graph(images: Tensor, targets: Tensor, *weights: Tensor) -> tuple[Tensor, ...]:
        prefixed = {f"model.{name}": weight for name, weight in zip(names, weights, strict=True)}
        return torch.func.functional_call(graph, prefixed, (images, targets))

    traced = make_fx(reaction_graph, tracing_mode="symbolic")(
        *_batch_symbolic(images, targets, *tensors.values()))
    return _Trace(traced.eval(), images, targets, tensors, graph.with_maps)


def _to_onnx(trace: _Trace, optimize: bool = True):
    """``torch.onnx.export(dynamo=True)`` of the trace, the batch dynamic; ``optimize``: with
    onnxscript's optimiser (constant folding, redundant nodes removed; bench/onnx_convert.py
    times it apart with ``optimize=False`` and ``program.optimize()``)."""
    names = list(trace.weights)
    batch = torch.export.Dim("batch", min=1)
    return torch.onnx.export(
        trace.module, (trace.images, trace.targets, *trace.weights.values()), dynamo=True,
        input_names=[IMAGES, TARGETS, *names], output_names=_outputs(trace.with_maps),
        dynamic_shapes=({0: batch}, {0: batch}, *[None] * len(names)),
        opset_version=OPSET, optimize=optimize, verbose=False, report=False)


def _batch_symbolic(images: Tensor, targets: Tensor, *weights: Tensor) -> list[Tensor]:
    """Fake copies of the trace's inputs whose only symbolic size is the batch.

    ``make_fx(tracing_mode="symbolic")`` on real tensors makes every size symbolic, every
    weight's included, and spends ten times longer reasoning about their shapes than this
    (docs/BENCHMARKS.md, "Fixed cost"); the exported graph is the same.
    """
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import (
        DimDynamic,
        ShapeEnv,
        StatelessSymbolicContext,
    )

    mode = FakeTensorMode(shape_env=ShapeEnv())

    def fake(index: int, tensor: Tensor, batched: bool) -> Tensor:
        sizes = [DimDynamic.DYNAMIC if batched and axis == 0 else DimDynamic.STATIC
                 for axis in range(tensor.dim())]
        return mode.from_tensor(tensor, source=ConstantSource(f"input{index}"),
                                symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes))

    return [fake(0, images, True), fake(1, targets, True),
            *(fake(index, weight, False) for index, weight in enumerate(weights, start=2))]


def _weights_as_initializers(model, names: list[str]) -> tuple[object, list[str]]:
    """Drop the weight inputs from the graph's inputs; the used ones return as initializers."""
    used = {name for node in model.graph.node for name in node.input}
    weights = set(names)
    kept = [value for value in model.graph.input if value.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    model.producer_name = "reaction"
    return model, [name for name in names if name in used]


def _checked_session(payload: bytes) -> object:
    """A CPU session of an exported file, for its self-check (InputError if it fails)."""
    from analyzer.onnx_backend import cpu_session

    try:
        return cpu_session(payload)
    except Exception as error:  # onnxruntime raises its own types
        lines = str(error).strip().splitlines()
        raise InputError("the exported ONNX graph does not run in onnxruntime: "
                         f"{lines[0] if lines else type(error).__name__}") from None


def _verify(session: object, backend: TorchBackend, channels: int,
            image_size: tuple[int, int], num_classes: int) -> None:
    """Run the exported graph's session on random images; compare with PyTorch.

    A map entry within float32 rounding of zero may change sign between the two, and with it
    one image's Reaction; a conversion error shows on most images, so two are let pass.
    """
    generator = torch.Generator().manual_seed(1)
    batch = 8
    images = torch.rand(batch, channels, *image_size, generator=generator)
    targets = torch.randint(num_classes, (batch,), generator=generator)
    expected = backend.compute(images, targets)
    try:
        logits, reaction = session.run(
            [LOGITS, REACTION], {IMAGES: images.numpy(), TARGETS: targets.numpy()})
    except Exception as error:  # onnxruntime raises its own types
        lines = str(error).strip().splitlines()
        raise InputError("the exported ONNX graph does not run in onnxruntime: "
                         f"{lines[0] if lines else type(error).__name__}") from None
    for name, got, want, allowed in (("logits", logits, expected.logits.numpy(), 0),
                                     ("reaction", reaction, expected.reaction.numpy(), 2)):
        scale = float(np.abs(want).max()) or 1.0
        close = np.isclose(got, want, rtol=1e-3, atol=1e-4 * scale)
        if (~close).reshape(batch, -1).any(axis=1).sum() > allowed:
            error = float(np.abs(got - want).max())
            raise InputError(f"the exported ONNX graph does not reproduce the PyTorch backend "
                             f"({name} differs by up to {error:.3g}): please report this model")


class OnnxTwinWriter:
    """``trainer run --onnx``: write ``epoch_NNNN.onnx`` beside each checkpoint as it is saved.

    A checkpoint writer for :func:`trainer.train.train`. The graph is traced at the first
    checkpoint and serves every later epoch; it outputs the maps too, so `analyzer cam` can
    use the twins.
    """

    name = "onnx"

    def __init__(self) -> None:
        self._exporter: ReactionGraphExporter | None = None

    def write(self, saved: SavedCheckpoint) -> None:
        """Write the ONNX twin of the checkpoint just saved (atomically)."""
        if self._exporter is None:
            self._exporter = ReactionGraphExporter(
                saved.model, ExportSettings(ReactionSpec(saved.layer), with_maps=True),
                channels=saved.channels, image_size=saved.image_size,
                class_names=saved.class_names, model_spec=saved.model_spec)
        self._exporter.load_weights(saved.model.state_dict())
        write_onnx_file(saved.path.parent / onnx_name(saved.epoch), self._exporter.model_bytes(
            epoch=saved.epoch, source_sha256=saved.sha256, source_file=saved.path.name))


# ---- `analyzer export-onnx` ------------------------------------------------------------------

@dataclass(frozen=True)
class ExportOptions:
    """The options of `analyzer export-onnx` (see its ``--help``)."""

    ckpt_dir: Path
    out: Path
    run: Path | None = None
    model: str | None = None
    layer: str | None = None
    image_size: tuple[int, int] | None = None
    channels: int | None = None
    epochs: str | None = None
    score: str = "logit"
    target: str = "label"
    with_maps: bool = False
    graph_cache: bool = True


@dataclass
class ExportSummary:
    """What `analyzer export-onnx` did: the files written and those already up to date."""

    out: Path
    written: list[Path]
    skipped: list[Path]


def export_checkpoints(options: ExportOptions, progress: bool = True) -> ExportSummary:
    """Write ``epoch_NNNN.onnx`` for every selected checkpoint into ``options.out``."""
    from analyzer.inputs import find_run_file
    from analyzer.network import resolve_network
    from analyzer.plan import parse_epochs

    checkpoints, ignored = discover_checkpoints(options.ckpt_dir, suffixes=TORCH_SUFFIXES)
    for path in ignored:
        logger.warning(f"ignoring {path.name} (not a checkpoint with an epoch number)")
    if options.epochs:
        wanted = set(parse_epochs(options.epochs, [c.epoch for c in checkpoints]))
        checkpoints = [c for c in checkpoints if c.epoch in wanted]
    network = resolve_network(
        first_checkpoint=checkpoints[0], run_file=find_run_file(options.ckpt_dir, options.run),
        model=options.model, layer=options.layer, data={}, image_size=options.image_size,
        channels=options.channels, require_class_names=False)
    settings = ExportSettings(ReactionSpec(network.layer, options.score, options.target),
                              options.with_maps)
    created = not Path(options.out).exists()
    _make_folder(options.out)
    try:
        return _export_each(checkpoints, network, settings, options, progress)
    except BaseException:
        if created and not any(Path(options.out).iterdir()):
            Path(options.out).rmdir()  # a failed first export leaves no empty folder behind
        raise


def _export_each(checkpoints: list[CheckpointFile], network: NetworkInputs,
                 settings: ExportSettings,
                 options: ExportOptions, progress: bool) -> ExportSummary:
    """Write the ONNX file of each checkpoint whose file is missing or out of date."""
    from store.checkpoint_files import sha256_file

    summary = ExportSummary(Path(options.out), [], [])
    exporter = None
    for checkpoint in tqdm(checkpoints, disable=not progress, unit="ckpt", dynamic_ncols=True):
        target = Path(options.out) / onnx_name(checkpoint.epoch)
        sha = sha256_file(checkpoint.path)
        if _up_to_date(target, settings, network.channels, network.image_size, sha):
            summary.skipped.append(target)
            continue
        weights = load_weights_file(checkpoint.path)
        if weights.module is not None:  # a self-contained program: its own graph
            one_off = ReactionGraphExporter(weights.module, settings, channels=network.channels,
                                            image_size=network.image_size,
                                            class_names=network.class_names,
                                            graph_cache=options.graph_cache)
            payload = one_off.model_bytes(epoch=checkpoint.epoch, source_sha256=sha,
                                          source_file=checkpoint.path.name)
        else:
            if network.model is None:
                raise InputError(f"{checkpoint.path.name} does not say which network it holds: "
                                 "give --model")
            exporter = exporter or ReactionGraphExporter(
                network.model, settings, channels=network.channels,
                image_size=network.image_size, class_names=network.class_names,
                model_spec=network.model_spec, graph_cache=options.graph_cache)
            payload = checkpoint_bytes(exporter, checkpoint, weights.state_dict, sha)
        write_onnx_file(target, payload)
        summary.written.append(target)
    return summary


def checkpoint_bytes(exporter: ReactionGraphExporter, checkpoint: CheckpointFile,
                     state_dict: dict[str, Tensor], sha256: str) -> bytes:
    """The ONNX file of one checkpoint's weights; InputError naming the file if they misfit."""
    _load_checkpoint_weights(exporter, checkpoint, state_dict)
    return exporter.model_bytes(epoch=checkpoint.epoch, source_sha256=sha256,
                                source_file=checkpoint.path.name)


def checkpoint_arrays(exporter: ReactionGraphExporter, checkpoint: CheckpointFile,
                      state_dict: dict[str, Tensor]) -> dict[str, np.ndarray]:
    """One checkpoint's weights as the graph's initializers (for
    :attr:`ReactionGraphExporter.weightless_template`); InputError naming the file if they
    misfit."""
    _load_checkpoint_weights(exporter, checkpoint, state_dict)
    return exporter.weight_arrays()


def _load_checkpoint_weights(exporter: ReactionGraphExporter, checkpoint: CheckpointFile,
                             state_dict: dict[str, Tensor]) -> None:
    try:
        exporter.load_weights(state_dict)
    except InputError as error:
        raise InputError(f"{checkpoint.path.name}: {error}") from None


def _make_folder(folder: Path) -> None:
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create {folder}: {error.strerror or error}") from None


def _up_to_date(path: Path, settings: ExportSettings, channels: int,
                image_size: tuple[int, int], source_sha256: str) -> bool:
    """True when ``path`` is an intact export of the same checkpoint with the same settings."""
    if not path.is_file():
        return False
    try:
        contract = read_onnx_contract(path)
    except InputError:
        return False  # damaged or foreign: export it again
    return (contract.spec, contract.with_maps, contract.channels, contract.image_size,
            contract.metadata.get("format_version"),
            contract.metadata.get("source_sha256")) == (
        settings.spec, settings.with_maps, channels, tuple(image_size), ONNX_FORMAT_VERSION,
        source_sha256)
