"""ONNX Runtime backend: Reaction from ONNX checkpoints that carry their gradient graph.

One inference session per checkpoint, tuned for throughput: every graph optimisation (which
also folds batch norm into the convolutions), sequential execution, one intra-op thread per
core, and on the CPU one memory arena that every session of the process shares. On the CPU
the images are NumPy arrays loaded once, and a pass over ONNX files imports no torch (1–3 s
of every run's start); on a GPU they are torch tensors that stay in device memory and are
bound to the session by address (I/O binding), so no image is copied per checkpoint. A
backend answers in the type it is given, so analyses that hand it torch tensors (``analyzer
cam``, occlusion) get torch tensors back. CUDA is used only when ONNX Runtime can really run
on it; provider errors never reach the user.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import os
import sys
from typing import TYPE_CHECKING

import numpy as np

from analyzer.backends import BackendKind, BackendSetup, BatchResult, LoadedCheckpoint
from store.checkpoint_files import CheckpointFile, sha256_file
from store.errors import InputError
from store.onnx_files import (
    CAM,
    EMPTY,
    IMAGES,
    LOGITS,
    REACTION,
    TARGETS,
    OnnxContract,
    OnnxFile,
    read_onnx_file,
)

if TYPE_CHECKING:
    from torch import Tensor

    from analyzer.backends import Array

_ERRORS_ONLY, _FATAL_ONLY = 3, 4
_CUDA, _CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def _ort():
    import onnxruntime  # slow import: only where the ONNX backend runs

    onnxruntime.set_default_logger_severity(_ERRORS_ONLY)
    return onnxruntime


def intra_op_threads() -> int:
    """One thread per core this process may use (``OMP_NUM_THREADS`` caps it, as for torch)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        cap = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        cap = 0
    return max(1, min(cores or 1, cap) if cap > 0 else cores or 1)


def session_options(log_severity: int = _ERRORS_ONLY, threads: int | None = None,
                    shared_arena: bool = True):
    """Session options tuned for one large graph run many times; with ``shared_arena`` (CPU
    sessions) the session takes its memory from the process's CPU arena
    (:func:`_shared_cpu_arena`)."""
    ort = _ort()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or intra_op_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = log_severity
    if shared_arena and _shared_cpu_arena():
        options.add_session_config_entry("session.use_env_allocators", "1")
    return options


@functools.cache
def _shared_cpu_arena() -> bool:
    """Register one CPU memory arena for all of this process's sessions; whether it is there.

    A session's own arena is new and empty: its first runs take fresh memory from the system
    and fault every page of it in, and a pass makes a session per checkpoint. On issue 14's
    workload (thesis Model II, 384 images a checkpoint, batches of 256) the ONNX files' pass
    faulted 1.08 million pages and each session's first pass over the images took 0.54-0.64 s
    instead of 0.36; with the arena shared, 0.38 million, a lower peak (two sessions are alive
    at once in a pass), and from the third checkpoint on, each as fast as a warm session
    (docs/BENCHMARKS.md, "ONNX Runtime sessions share one arena"). The arena keeps what it
    grew to for the process. Results are unchanged: only where the memory comes from changes.
    """
    ort = _ort()
    try:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                 ort.OrtMemType.DEFAULT)
        # no limit, and ONNX Runtime's defaults for growth, first chunk and dead bytes
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
    except Exception:  # a build without the API, or onnxruntime's own error types: no sharing
        return False
    return True


def cpu_session(payload: bytes):
    """An ONNX Runtime session on the CPU for a serialized model."""
    return _ort().InferenceSession(payload, sess_options=session_options(),
                                   providers=[_CPU])


@functools.cache
def cuda_usable() -> bool:
    """True when ONNX Runtime's CUDA provider really runs here (libraries found, GPU present).

    ``onnxruntime-gpu`` lists the CUDA provider even where CUDA or cuDNN is missing, and then
    logs errors and falls back to the CPU. So: look for the NVIDIA driver (without it there is
    no GPU, and torch need not be imported to say so), ask torch for a GPU, preload the CUDA
    and cuDNN libraries (torch's CUDA wheels ship them), and open a one-node session on CUDA,
    silently.
    """
    ort = _ort()
    if _CUDA not in ort.get_available_providers() or not _nvidia_driver_loads():
        return False
    import torch  # slow import: only where a GPU may be

    if not torch.cuda.is_available():
        return False
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        try:
            if hasattr(ort, "preload_dlls"):
                ort.preload_dlls(msvc=False)
            ort.set_default_logger_severity(_FATAL_ONLY)
            session = ort.InferenceSession(_identity_model(),
                                           session_options(_FATAL_ONLY, shared_arena=False),
                                           providers=[_CUDA, _CPU])
            return session.get_providers()[0] == _CUDA
        except Exception:  # any failure to load or run the provider means: not usable
            return False
        finally:
            ort.set_default_logger_severity(_ERRORS_ONLY)


def _nvidia_driver_loads() -> bool:
    """Whether the NVIDIA driver's CUDA library loads (Linux; elsewhere torch is asked)."""
    if not sys.platform.startswith("linux"):
        return True
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def _identity_model() -> bytes:
    from onnx import TensorProto, helper

    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    result = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [value],
                              [result])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)],
                             ir_version=8).SerializeToString()


def _cuda_requirement() -> str:
    """What ONNX Runtime's CUDA provider needs, from the build of the installed package."""
    from onnxruntime.capi import build_and_package_info as build

    cuda = getattr(build, "cuda_version", "")
    if not cuda:
        return f"the installed {build.package_name} has no CUDA provider; install onnxruntime-gpu"
    return (f"{build.package_name} {build.__version__} needs a GPU that torch sees and the "
            f"CUDA {cuda.split('.')[0]} and cuDNN 9 libraries, e.g. from torch's CUDA wheels")


def onnx_device(requested: str) -> str:
    """Where the ONNX backend runs: ``auto`` → CUDA when ONNX Runtime can use it, else CPU."""
    if requested in ("auto", "cpu"):
        return "cuda" if requested == "auto" and cuda_usable() else "cpu"
    from trainer.devices import resolve_device  # torch: only for a device other than the CPU

    device = resolve_device(requested)
    if device.type == "cuda" and not cuda_usable():
        raise InputError(f"onnxruntime cannot use CUDA here ({_cuda_requirement()}): use "
                         "--device cpu or --backend torch")
    if device.type not in ("cuda", "cpu"):
        raise InputError(f"the onnx backend runs on cpu or cuda, not {device.type}")
    return str(device)


class OnnxBackend:
    """Compute Reaction for batches of images with one ONNX checkpoint (docs/ONNX.md).

    Args:
        file: the checkpoint, read by :func:`store.onnx_files.read_onnx_file`.
        device: ``cpu`` or a CUDA device (see :func:`onnx_device`); the images and labels
            passed to :meth:`compute` must be there: NumPy arrays or torch tensors on the
            CPU, torch tensors on a GPU.
        threads: intra-op threads; default one per core (:func:`intra_op_threads`).
        initializers: the weights, by initializer name, when ``file.payload`` declares them
            without data (a PyTorch checkpoint converted in memory:
            ``ReactionGraphExporter.weightless_template``); handed to ONNX Runtime as external
            initializers, not serialised, and kept as long as the session.
    """

    name = "onnx"

    def __init__(self, file: OnnxFile, device: str = "cpu", threads: int | None = None,
                 initializers: dict[str, np.ndarray] | None = None) -> None:
        self.file = file
        self.contract = file.contract
        self.device = str(device)
        self._cuda_index = _cuda_index(self.device)
        self._initializers = _ort_values(initializers)
        self.session = _session(file, self._cuda_index, threads, self._initializers)
        self._inputs = {value.name for value in self.session.get_inputs()}
        self._cam_shape = next((value.shape[1:] for value in self.session.get_outputs()
                                if value.name == CAM), None)

    def compute(self, images: Array, labels: Array, keep_maps: bool = False) -> BatchResult:
        """One run of the graph for the whole batch: logits, Reaction, empty flags[, maps]."""
        if keep_maps and not self.contract.with_maps:
            raise InputError(f"{self.file.path.name} was exported without maps: export it "
                             "again with 'analyzer export-onnx --with-maps'")
        names = [LOGITS, REACTION, EMPTY, *([CAM] if keep_maps else [])]
        outputs = self._run(images, labels, names)
        return BatchResult(outputs[0], outputs[1], outputs[2],
                           outputs[3] if keep_maps else None)

    def logits(self, images: Array) -> Array:
        """Logits of a batch: only the graph's path to ``logits`` runs (no gradient part).

        A ``targets`` input, which only the gradient part reads, is fed zeros.
        """
        targets = np.zeros(len(images), dtype=np.int64)
        if not isinstance(images, np.ndarray):
            import torch  # the images are torch tensors, so torch is loaded already

            targets = torch.from_numpy(targets).to(images.device)
        return self._run(images, targets, [LOGITS])[0]

    def _run(self, images: Array, labels: Array, names: list[str]) -> list[Array]:
        """The graph's outputs ``names`` for a batch, in the type of ``images``."""
        options = _forward_only() if names == [LOGITS] else None
        if self._cuda_index is not None:
            return self._run_bound(images, labels, names, options)
        feeds = {IMAGES: _host_array(images, np.float32)}
        if TARGETS in self._inputs:
            feeds[TARGETS] = _host_array(labels, np.int64)
        outputs = self.session.run(names, feeds, options)
        if isinstance(images, np.ndarray):
            return outputs
        import torch  # the images are torch tensors, so torch is loaded already

        return [torch.from_numpy(value) for value in outputs]

    def _run_bound(self, images: Tensor, labels: Tensor, names: list[str],
                   options: object) -> list[Tensor]:
        """Run on the GPU with inputs and outputs bound to torch's device memory (``options``:
        ONNX Runtime's run options, or None)."""
        import torch  # on a GPU the images are torch tensors, so torch is loaded already

        images = images.detach().to(torch.float32).contiguous()
        labels = labels.detach().to(torch.int64).contiguous()
        batch, index = images.shape[0], self._cuda_index
        shapes = {LOGITS: [batch, self.contract.num_classes], REACTION: [batch],
                  EMPTY: [batch], CAM: [batch, *(self._cam_shape or [])]}
        dtypes = {LOGITS: torch.float32, REACTION: torch.float32, EMPTY: torch.bool,
                  CAM: torch.float32}
        numpy_types = {torch.float32: np.float32, torch.int64: np.int64, torch.bool: np.bool_}
        outputs = [torch.empty(shapes[name], dtype=dtypes[name], device=self.device)
                   for name in names]
        binding = self.session.io_binding()
        bound = [(IMAGES, images)] + ([(TARGETS, labels)] if TARGETS in self._inputs else [])
        for name, tensor in bound:
            binding.bind_input(name, "cuda", index, numpy_types[tensor.dtype],
                               list(tensor.shape), tensor.data_ptr())
        for name, tensor in zip(names, outputs, strict=True):
            binding.bind_output(name, "cuda", index, numpy_types[tensor.dtype],
                                list(tensor.shape), tensor.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # torch's writes are done
        self.session.run_with_iobinding(binding, options)
        binding.synchronize_outputs()  # onnxruntime's writes are done
        return outputs


def _host_array(values: Array, dtype: type) -> np.ndarray:
    """A batch as the C-contiguous NumPy array of ``dtype`` ONNX Runtime reads (a view where
    it already is one)."""
    if not isinstance(values, np.ndarray):
        values = values.detach().numpy()
    return np.ascontiguousarray(values, dtype=dtype)


def _cuda_index(device: str) -> int | None:
    """The CUDA device number of ``cuda`` / ``cuda:N``; None for the CPU."""
    kind, _, index = device.partition(":")
    return (int(index) if index else 0) if kind == "cuda" else None


def _forward_only():
    """Run options that execute only the nodes the requested outputs need."""
    options = _ort().RunOptions()
    options.only_execute_path_to_fetches = True
    return options


def _ort_values(initializers: dict[str, np.ndarray] | None) -> dict[str, object]:
    """ONNX Runtime values viewing the arrays (which they keep alive), by name."""
    if initializers is None:
        return {}
    ort = _ort()
    return {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
            for name, array in initializers.items()}


def _session(file: OnnxFile, cuda_index: int | None, threads: int | None = None,
             initializers: dict[str, object] | None = None):
    """The file's inference session on CUDA device ``cuda_index`` (None: the CPU), with
    ``initializers`` (ONNX Runtime values) as its external initializers; InputError naming
    the file if it fails."""
    ort = _ort()
    providers: list = [_CPU]
    if cuda_index is not None:
        providers = [(_CUDA, {"device_id": cuda_index,
                              # one conv algorithm search per session would dominate
                              "cudnn_conv_algo_search": "HEURISTIC",
                              "use_tf32": "0"}), _CPU]  # float32, as the torch backend
    source = file.payload if file.payload is not None else str(file.path)
    options = session_options(threads=threads, shared_arena=cuda_index is None)
    if initializers:
        options.add_external_initializers(list(initializers), list(initializers.values()))
    try:
        return ort.InferenceSession(source, sess_options=options, providers=providers)
    except Exception as error:  # onnxruntime raises its own types for bad graphs
        lines = str(error).strip().splitlines()
        raise InputError(f"ONNX checkpoint {file.path} cannot be loaded (corrupt, truncated or "
                         f"unsupported): {lines[0] if lines else type(error).__name__}") from None


class OnnxKind(BackendKind):
    """ONNX Runtime: ONNX checkpoints as they are, or PyTorch checkpoints converted on the fly
    (the network's graph traced once, each checkpoint's weights swapped in).

    The inference session is built by :meth:`load`, so it is ready when its turn comes.
    """

    name = "onnx"

    def __init__(self, setup: BackendSetup) -> None:
        super().__init__(setup)
        self._first: OnnxContract | None = None
        self._exporter = None if setup.native else _exporter(setup)

    @staticmethod
    def device(requested: str) -> str:
        """See :func:`onnx_device`."""
        return onnx_device(requested)

    def to_device(self, array: np.ndarray) -> Array:
        """On the CPU the array itself (ONNX Runtime reads NumPy; no torch is needed), on a
        GPU a torch tensor there (bound to the session by address)."""
        if _cuda_index(self.setup.device) is None:
            return array
        return super().to_device(array)

    def load(self, checkpoint: CheckpointFile) -> LoadedCheckpoint:
        """Read (or convert) the checkpoint and build its inference session."""
        if self._exporter is None:
            file = read_onnx_file(checkpoint.path)
            self._first = self._first or file.contract
            if not file.contract.same_computation(self._first):
                raise InputError(f"{checkpoint.path.name} computes Reaction differently from "
                                 "the first ONNX checkpoint (layer, score, target, input or "
                                 "classes): analyse them separately")
        else:
            from analyzer.onnx_export import checkpoint_arrays
            from store.model_files import load_weights_file

            weights, sha = load_weights_file(checkpoint.path), sha256_file(checkpoint.path)
            if weights.state_dict is None:
                raise InputError(f"{checkpoint.path.name}: --backend onnx converts weights "
                                 "files; analyse exported programs with --backend torch")
            arrays = checkpoint_arrays(self._exporter, checkpoint, weights.state_dict)
            file = OnnxFile(checkpoint.path, self._exporter.weightless_template, sha,
                            self._exporter.contract)
            backend = OnnxBackend(file, self.setup.device, initializers=arrays)
            self._exporter.check_once(backend.session)
            return LoadedCheckpoint(checkpoint, sha, backend)
        return LoadedCheckpoint(checkpoint, file.sha256, OnnxBackend(file, self.setup.device))

    def backend(self, loaded: LoadedCheckpoint) -> OnnxBackend:
        """The session built by :meth:`load`."""
        return loaded.content


def _exporter(setup: BackendSetup):
    """The ONNX graph of the network, traced once, for PyTorch checkpoints."""
    from analyzer.onnx_export import ExportSettings, ReactionGraphExporter

    inputs = setup.inputs
    if inputs.model is None:
        raise InputError("--backend onnx needs the network: give --model, or use "
                         "--backend torch for exported programs")
    return ReactionGraphExporter(inputs.model, ExportSettings(setup.spec),
                                 channels=inputs.channels,
                                 image_size=inputs.image_size, class_names=inputs.class_names,
                                 model_spec=inputs.model_spec, graph_cache=setup.graph_cache)
