"""The whole `analyzer reaction` command against captum's LayerGradCam compute alone, on issue
14's workload (bench/foreign_workload.py: a foreign copy of thesis Model II, 6 checkpoints x
384 images of 50x200), medians of interleaved rounds, ratios printed.

    .venv-bench/bin/python bench/cli_vs_captum.py --rounds 3 --threads 2
    .venv-bench/bin/python bench/cli_vs_captum.py --baseline /tmp/main-src   # main's CLI too

Each round runs, in turn (each round starting one further along):

* **captum** in this process, its compute alone: per checkpoint, load the weights
  (safetensors) into the network, ``LayerGradCam(model, layer).attribute(images,
  target=labels, relu_attributions=True)`` over the images in batches of ``--batch`` (the
  images decoded once, before timing), and Reaction = sum of the map's positive entries / their
  number (SPEC.md §2; 0 for an empty map);
* the **whole CLI** in a subprocess, from its start to its end (interpreter, imports, image
  decoding, checks, ONNX conversion, results file, writing): ``analyzer reaction`` with
  ``--backend torch``, with ``--backend onnx`` (PyTorch checkpoints converted in memory) with a
  warm graph cache (``onnx``: the exported graph read from ``WORK/graph-cache``, filled by an
  untimed run first) and a cold one (``onnx cold``: an empty cache folder of its own each
  run, so it exports), and on a folder exported by ``analyzer export-onnx`` at the start
  (``onnx files``; the export's own time is printed once; the baseline's files are exported
  by the baseline's code).

The ratio is captum's seconds / the CLI's: above 1, the whole CLI is faster than captum's
compute alone. Every CLI run's stored Reactions are compared with captum's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foreign_workload import (
    CHECKPOINTS,
    IMAGE_SIZE,
    LAYER,
    analyzer_argv,
    environment,
    export_command,
    load_model_module,
    make_workload,
    reaction_command,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/reaction-issue14-workload"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64, help="captum's batch size")
    parser.add_argument("--methods", default="captum,torch,onnx,onnx cold,onnx files",
                        help="comma-separated: captum, torch, onnx (warm graph cache), onnx "
                             "cold (empty graph cache), onnx files")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="another checkout's source folder (e.g. main's): its torch, "
                             "onnx and onnx files runs are timed too, as 'torch (baseline)' "
                             "and so on")
    parser.add_argument("--captum-keeps-freed-memory", action="store_true",
                        help="raise glibc's mmap and trim thresholds in this process before "
                             "captum runs, as `analyzer reaction` does for itself "
                             "(trainer/allocator.py): captum timed without its page faults")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    if options.captum_keeps_freed_memory:
        from trainer.allocator import keep_freed_memory

        assert keep_freed_memory(), "glibc did not take the allocator settings"
    work = make_workload(options.work)
    env = environment(work, None, options.threads)
    shutil.rmtree(work / "graph-cache", ignore_errors=True)
    env["REACTION_CACHE_DIR"] = str(work / "graph-cache")
    methods = options.methods.split(",")
    if options.baseline is not None:
        methods += [f"{m} (baseline)" for m in ("torch", "onnx", "onnx files")
                    if m in methods]
    baseline_env = None
    if options.baseline is not None:  # the same graph cache folder: each code has its keys
        baseline_env = {**environment(work, options.baseline.resolve(), options.threads),
                        "REACTION_CACHE_DIR": env["REACTION_CACHE_DIR"]}
    print(f"workload {work}: foreign Model II {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}, {CHECKPOINTS} "
          f"checkpoints x 384 images, {options.threads} threads, captum batch {options.batch}"
          f"{', captum keeps freed memory' if options.captum_keeps_freed_memory else ''}; "
          f"load average at start {_load()}", flush=True)
    exported = {}
    if "onnx files" in methods:
        exported["onnx files"] = _export(work, env, "onnx")
    if "onnx files (baseline)" in methods:
        exported["onnx files (baseline)"] = _export(work, baseline_env, "onnx-baseline")
    if "onnx" in methods:
        _warm_graph_cache(work, env)
    if "onnx (baseline)" in methods:
        _warm_graph_cache(work, baseline_env)
    images, labels = _decoded_images(work)
    captum_values: list[np.ndarray] = []
    seconds: dict[str, list[float]] = {method: [] for method in methods}
    cpu: dict[str, list[float]] = {method: [] for method in methods}
    stored: dict[str, np.ndarray] = {}
    for round_number in range(options.rounds):
        shift = round_number % len(methods)
        for method in methods[shift:] + methods[:shift]:
            if method == "captum":
                wall, cpu_seconds, captum_values = _captum(work, images, labels, options.batch)
            else:
                wall, cpu_seconds, stored[method] = _cli(
                    work, baseline_env if method.endswith("(baseline)") else env,
                    method.removesuffix(" (baseline)"), exported.get(method))
            seconds[method].append(wall)
            cpu[method].append(cpu_seconds)
            print(f"  round {round_number + 1} {method:<12} {wall:7.2f} s wall  "
                  f"{cpu_seconds:7.2f} s CPU", flush=True)
    print(f"load average at end {_load()}\n")
    _report(methods, seconds, cpu, stored, captum_values)


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def _decoded_images(work: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The workload's images and labels as the CLI reads them (same order)."""
    from store.datasets import folder_images, read_folder_images

    folder = work / "data" / "train"
    _, ids, labels = folder_images(folder)
    pixels = read_folder_images(folder, ids, 1, IMAGE_SIZE)
    return torch.from_numpy(pixels), torch.from_numpy(labels)


def _captum(work: Path, images: torch.Tensor, labels: torch.Tensor, batch: int
            ) -> tuple[float, float, list[np.ndarray]]:
    """captum's compute alone over every checkpoint: wall s, CPU s, Reactions per ckpt."""
    from captum.attr import LayerGradCam

    model = load_model_module(work).model2().eval()
    layer = dict(model.named_modules())[LAYER]
    values = []
    began, cpu_began = time.perf_counter(), time.process_time()
    for checkpoint in sorted((work / "ckpts").glob("epoch_*.safetensors")):
        model.load_state_dict(load_file(str(checkpoint)))
        cam = LayerGradCam(model, layer)
        reactions = []
        for part, targets in zip(images.split(batch), labels.split(batch), strict=True):
            maps = cam.attribute(part, target=targets, relu_attributions=True).detach()
            flat = maps.flatten(1)
            positive = (flat > 0).sum(dim=1)
            reactions.append(torch.where(positive > 0, flat.clamp(min=0).sum(dim=1)
                                         / positive.clamp(min=1), 0.0))
        values.append(torch.cat(reactions).numpy())
    return time.perf_counter() - began, time.process_time() - cpu_began, values


def _export(work: Path, env: dict[str, str], folder: str) -> Path:
    """``analyzer export-onnx`` of the checkpoints into a fresh ``WORK/folder``, with the code
    ``env`` puts first on the path (files left by other code are never reused)."""
    out = work / folder
    shutil.rmtree(out, ignore_errors=True)
    began = time.perf_counter()
    subprocess.run(analyzer_argv(export_command(work, out)), env=env, cwd=work, check=True,
                   stdout=subprocess.DEVNULL)
    print(f"analyzer export-onnx of the 6 checkpoints into {folder} (once): "
          f"{time.perf_counter() - began:.1f} s", flush=True)
    return out


def _warm_graph_cache(work: Path, env: dict[str, str]) -> None:
    """One untimed ``--backend onnx`` run of the first checkpoint: the graph cache is warm."""
    began = time.perf_counter()
    subprocess.run(analyzer_argv(reaction_command(work, "onnx", work / "warm-up.h5", "1")),
                   env=env, cwd=work, check=True, stdout=subprocess.DEVNULL)
    (work / "warm-up.h5").unlink()
    print(f"graph cache warmed (untimed): {time.perf_counter() - began:.1f} s", flush=True)


def _cli(work: Path, env: dict[str, str], method: str, exported: Path | None
         ) -> tuple[float, float, np.ndarray]:
    """The whole CLI: wall s, CPU s (user + system) and the Reactions it stored."""
    out = work / "cli.h5"
    out.unlink(missing_ok=True)
    backend = "onnx" if method.startswith("onnx") else "torch"
    arguments = reaction_command(work, backend, out,
                                 ckpt_dir=exported if method == "onnx files" else None)
    with tempfile.TemporaryDirectory(dir=work) as cold:
        if method == "onnx cold":
            env = {**env, "REACTION_CACHE_DIR": cold}
        began = time.perf_counter()
        process = subprocess.Popen(analyzer_argv(arguments), env=env, cwd=work,
                                   stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - began
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"analyzer {' '.join(arguments)} failed")
    with h5py.File(out, "r") as handle:
        values = handle["reaction/train/image_reaction"][()]
    return wall, usage.ru_utime + usage.ru_stime, values


def _report(methods: list[str], seconds: dict[str, list[float]], cpu: dict[str, list[float]],
            stored: dict[str, np.ndarray], captum_values: list[np.ndarray]) -> None:
    rounds = len(next(iter(seconds.values())))
    print(f"medians of {rounds} interleaved rounds (6 checkpoints x 384 images)\n")
    print("| method | wall s | CPU s | images/s | captum's wall / this | captum's CPU / this | "
          "max rel diff Reaction vs captum |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base_wall = statistics.median(seconds["captum"]) if "captum" in seconds else float("nan")
    base_cpu = statistics.median(cpu["captum"]) if "captum" in cpu else float("nan")
    reference = np.stack(captum_values) if captum_values else None
    for method in methods:
        wall, cpu_seconds = statistics.median(seconds[method]), statistics.median(cpu[method])
        diff = "(reference)" if method == "captum" else _rel_diff(stored.get(method), reference)
        print(f"| {method} | {wall:.2f} | {cpu_seconds:.2f} | {CHECKPOINTS * 384 / wall:.0f} | "
              f"{base_wall / wall:.2f} | {base_cpu / cpu_seconds:.2f} | {diff} |")
    for method in methods:
        if method != "captum" and "captum" in seconds:
            per_round = [c / m for c, m in zip(seconds["captum"], seconds[method], strict=True)]
            print(f"whole CLI ({method}) vs captum's compute alone: "
                  f"{base_wall / statistics.median(seconds[method]):.2f}x (per round: "
                  f"{', '.join(f'{r:.2f}' for r in per_round)})")


def _rel_diff(values: np.ndarray | None, reference: np.ndarray | None) -> str:
    """max over images and checkpoints of |R - R_captum| / R_captum, where captum's map is not
    empty; an image empty for one and not the other is reported as a count."""
    if values is None or reference is None:
        return "n/a"
    values = values[:len(reference)]
    empty = reference == 0
    mismatched = int(((values == 0) != empty).sum())
    worst = float((np.abs(values - reference)[~empty] / reference[~empty]).max())
    return f"{worst:.1e}" + (f", {mismatched} empty-map mismatches" if mismatched else "")


if __name__ == "__main__":
    main()
