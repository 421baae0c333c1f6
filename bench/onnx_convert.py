"""Where `--backend onnx` on PyTorch checkpoints ("ONNX converting") spends its time, stage by
stage, beside the "onnx files" path (a session from an exported file), on issue 14's workload
(bench/foreign_workload.py: a foreign Model II, 50x200, 6 checkpoints x 384 images).

    OMP_NUM_THREADS=2 .venv/bin/python bench/onnx_convert.py --work /tmp/onnxc/wl --rounds 3

Per round, in this process: the export (make_fx trace, ``torch.onnx.export(dynamo=True)``
unoptimised, onnxscript's optimiser, the first file's self-check), then per checkpoint: the
weights into the network, the file's bytes (template copied, weights added as initializers,
serialised), the ONNX Runtime session from them, and the compute of the 384 images in batches
of ``--batch``; the same with the weights handed to ONNX Runtime as external initializers of a
weightless template serialised once (``analyzer reaction --backend onnx`` since issue 14's
graph-cache change); for "onnx files" the exported file read (parsed, hashed), its session, the same
compute; and the exporter built again from the graph cache that the first export filled
(store/graph_cache.py: the key from the fx structure digest, the read, the check of the cached
graph against the network). Seconds wall, medians over rounds
(per-checkpoint rows: over rounds x checkpoints).
The exporter's imports (torch.onnx, onnxscript, onnx, onnxruntime) are timed once, first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from foreign_workload import IMAGE_SIZE, LAYER, load_model_module, make_workload

CONVERTING, EXTERNAL, FILES = "converting, serialised", "converting, external initializers", \
    "onnx files"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/reaction-issue14-workload"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256, help="images per session run")
    options = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(options.threads)  # ONNX Runtime's intra-op threads
    import torch

    torch.set_num_threads(options.threads)
    work = make_workload(options.work)
    print(f"workload {work}, {options.threads} threads, load average {_load()}", flush=True)
    began = time.perf_counter()
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    import onnxscript  # noqa: F401
    import torch.onnx
    from torch.onnx._internal.exporter import _core  # noqa: F401
    times: dict[tuple[str, str], list[float]] = defaultdict(list)
    times[("imports (torch.onnx, onnxscript, onnx, onnxruntime)", CONVERTING)].append(
        time.perf_counter() - began)
    images, labels = _images(work)
    with tempfile.TemporaryDirectory() as folder:
        for round_number in range(options.rounds):
            _one_round(work, images, labels, options.batch, Path(folder), times)
            print(f"  round {round_number + 1} done, load average {_load()}", flush=True)
    _report(times)


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def _images(work: Path):
    import torch

    from store.datasets import folder_images, read_folder_images

    folder = work / "data" / "train"
    _, ids, labels = folder_images(folder)
    return (torch.from_numpy(read_folder_images(folder, ids, 1, IMAGE_SIZE)),
            torch.from_numpy(labels))


class _Timer:
    """``with timer(stage, path):`` appends the block's wall seconds to ``times``."""

    def __init__(self, times: dict[tuple[str, str], list[float]]) -> None:
        self.times = times

    def __call__(self, stage: str, path: str) -> _Timer:
        self.key = (stage, path)
        return self

    def __enter__(self) -> None:
        self.began = time.perf_counter()

    def __exit__(self, *_exc) -> None:
        self.times[self.key].append(time.perf_counter() - self.began)


def _one_round(work: Path, images, labels, batch: int, folder: Path,
               times: dict[tuple[str, str], list[float]]) -> None:
    from safetensors.torch import load_file

    from analyzer.onnx_backend import OnnxBackend, cpu_session
    from store.onnx_files import OnnxFile, read_onnx_file, write_onnx_file
    from store.spec import ReactionSpec

    timer = _Timer(times)
    model = load_model_module(work).model2().eval()
    exporter = _timed_exporter(model, ReactionSpec(LAYER), timer, folder / "cache")
    checkpoints = sorted((work / "ckpts").glob("epoch_*.safetensors"))
    for index, checkpoint in enumerate(checkpoints):
        state_dict = load_file(str(checkpoint))
        with timer("per checkpoint: weights into the network", CONVERTING):
            exporter.load_weights(state_dict)
        if index == 0:  # the self-check, timed on its own; then the file's bytes
            with timer("self-check of the first file (8 images, both runtimes)", CONVERTING):
                exporter.model_bytes(epoch=1)
        with timer("per checkpoint: template copied + weights added + serialised", CONVERTING):
            payload = exporter.model_bytes(epoch=index + 1)
        with timer("per checkpoint: session build", CONVERTING):
            session = cpu_session(payload)
        _compute(session, images, labels, batch, timer, CONVERTING)
        if index == 0:
            with timer("weightless template serialised (once)", EXTERNAL):
                template = exporter.weightless_template
        with timer("per checkpoint: weights into the network", EXTERNAL):
            exporter.load_weights(state_dict)
        with timer("per checkpoint: weights copied to arrays", EXTERNAL):
            arrays = exporter.weight_arrays()
        with timer("per checkpoint: session build", EXTERNAL):
            backend = OnnxBackend(OnnxFile(checkpoint, template, "", exporter.contract),
                                  initializers=arrays)
        _compute(backend.session, images, labels, batch, timer, EXTERNAL)
        path = folder / f"epoch_{index + 1:04d}.onnx"
        write_onnx_file(path, payload)
        with timer("per checkpoint: file read (parse + hash)", FILES):
            file = read_onnx_file(path)
        with timer("per checkpoint: session build", FILES):
            session = cpu_session(file.payload)
        _compute(session, images, labels, batch, timer, FILES)


def _timed_exporter(model, spec, timer: _Timer, cache_dir: Path):
    """A ReactionGraphExporter whose export runs stage by stage under the timer (no cache);
    then the same exporter built again from a warm graph cache in ``cache_dir``."""
    import analyzer.onnx_export as export
    from analyzer.graph_keys import structure_digest
    from store.graph_cache import GraphCache

    trace_and_export = export._trace_and_export

    def staged(graph, settings, channels, image_size, _cache, read_cache=True):
        with export._quiet():
            with timer("export: make_fx trace (batch symbolic)", CONVERTING):
                trace = export._trace(graph, channels, image_size)
            with timer("export: torch.onnx.export(dynamo=True), not optimised", CONVERTING):
                program = export._to_onnx(trace, optimize=False)
            with timer("export: onnxscript optimiser", CONVERTING):
                program.optimize()
        with timer("graph cache: key (fx structure digest and the rest)", EXTERNAL):
            key = export._graph_key("structure", structure_digest(
                graph.model, export._traced_sources()), graph, settings, channels, image_size)
        model, names = export._weights_as_initializers(program.model_proto, list(trace.weights))
        GraphCache(cache_dir).put(key, model.SerializeToString())
        return export._Exported(model, names, key, cached=False)

    settings = export.ExportSettings(spec)
    export._trace_and_export = staged
    try:
        export.ReactionGraphExporter(model, settings, channels=1, image_size=IMAGE_SIZE)
    finally:
        export._trace_and_export = trace_and_export
    os.environ["REACTION_CACHE_DIR"] = str(cache_dir)
    with timer("export with a graph cache hit (key + read + parse + check)", EXTERNAL):
        return export.ReactionGraphExporter(model, settings, channels=1, image_size=IMAGE_SIZE)


def _compute(session, images, labels, batch: int, timer: _Timer, path: str) -> None:
    feeds = [{"images": part.numpy(), "targets": targets.numpy()}
             for part, targets in zip(images.split(batch), labels.split(batch), strict=True)]
    with timer(f"per checkpoint: compute of {len(images)} images", path):
        for feed in feeds:
            session.run(["logits", "reaction", "empty"], feed)


def _report(times: dict[tuple[str, str], list[float]]) -> None:
    stages = list(dict.fromkeys(stage for stage, _ in times))
    paths = [CONVERTING, EXTERNAL, FILES]
    print("\nseconds wall, medians (per-checkpoint rows: over rounds x checkpoints)\n")
    print("| stage | " + " | ".join(paths) + " |")
    print("|---|" + "---:|" * len(paths))
    for stage in stages:
        cells = [f"{statistics.median(times[(stage, path)]):.3f}"
                 if (stage, path) in times else "–" for path in paths]
        print(f"| {stage} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
