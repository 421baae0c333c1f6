"""Check and time the GPU paths: torch on CUDA, ONNX Runtime's CUDA provider with I/O binding.

CI has no GPU, so this script is the check of the code that only runs on one. It does, in
one process, on whatever device is there:

1. end to end through the real console scripts: ``trainer run --onnx`` (3 epochs of digits,
   model ``small``) on the device, then ``analyzer reaction`` four ways: torch on the CPU
   (the reference), torch on the device, ONNX Runtime on the CPU, ONNX Runtime on the device
   (I/O binding); each results file is compared with the reference: per-image Reaction within
   rel. 1e-4, identical empty maps and predictions, accuracy equal, loss within rel. 1e-4;
   then ``analyzer occlusion`` the same four ways, its maps within 1e-5 of torch on the CPU's;
2. speed: every thesis model (I–VI, 1×50×200) and the demo's (``small``, 1×8×8) with random
   weights (as ``bench/reaction.py``), 1024 images each, ``TorchBackend`` and ``OnnxBackend``
   on the device: images/s, their share of the device's float32 peak (FLOPs per image counted
   by ``torch.utils.flop_counter`` on what the backend computes; the peak measured on a large
   float32 matrix product, TF32 off, as the backends run), and agreement. The batches run
   under ``torch.cuda.set_sync_debug_mode("error")``, so a backend that waits for the GPU
   inside a batch fails; a backend whose weights are not on the GPU, or an ONNX session that
   fell back to the CPU provider, is reported as a problem and never timed as a GPU figure.

Exit status 0 when every comparison holds, 1 when one does not, 3 when ``--require-cuda`` is
given and CUDA is not usable (so that a silent CPU fallback cannot pass for a GPU check).

    python bench/gpu.py --require-cuda            # on a GPU machine
    python bench/gpu.py                           # anywhere: the CPU rows only

On a machine where the package is not installed, run it from the repository root: the console
scripts are then started as ``python -c "import cli; cli.trainer()"``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from reaction import IMAGE_SIZE, random_model  # noqa: E402

from analyzer.onnx_backend import OnnxBackend, cuda_usable  # noqa: E402
from analyzer.onnx_export import ExportSettings, ReactionGraphExporter  # noqa: E402
from analyzer.torch_backend import TorchBackend  # noqa: E402
from store.onnx_files import OnnxFile  # noqa: E402
from store.spec import ReactionSpec  # noqa: E402
from tests.test_onnx import (  # noqa: E402
    REL_TOL,
    assert_reactions_agree,
    checkpoint_model,
    digits_split,
    map_extent,
)
from trainer.models import ModelSpec, build_model, gradcam_layer  # noqa: E402


def console(name: str, *args: str) -> float:
    """Run console script ``name`` to completion (raising on failure); its wall time in s."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    began = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", f"import cli; cli.{name}()", *args],
                            capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{name} {' '.join(args)} failed:\n{result.stderr}")
    return time.perf_counter() - began


def read_results(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """The per-split arrays that the comparison needs, from a results file."""
    names = ("image_reaction", "prediction", "empty_maps", "accuracy", "loss")
    with h5py.File(path, "r") as handle:
        return {split: {name: group[name][()] for name in names}
                for split, group in handle["reaction"].items()}


def map_extents(run: Path, epochs: int) -> dict[str, np.ndarray]:
    """Per split, epoch and image: the map's largest |value| before the ReLU (the floor)."""
    checkpoints = run / "checkpoints"
    extents = {}
    for split in ("train", "val", "test"):
        images, labels = digits_split(run, split)
        extents[split] = np.stack([
            map_extent(checkpoint_model(checkpoints / f"epoch_{epoch:04d}.safetensors"),
                       gradcam_layer("small"), images, labels)
            for epoch in range(1, epochs + 1)])
    return extents


def compare(reference: dict, other: dict, extents: dict[str, np.ndarray]) -> list[str]:
    """What differs beyond the tests' tolerances (``tests/test_onnx.py``); empty: they agree.

    Reaction within rel. 1e-4, or within 1e-6 of the map's largest |value| for a Reaction that
    is a lone entry within float32 rounding of zero; loss within rel. 1e-4; predictions,
    accuracies and empty maps identical.
    """
    problems = []
    for split, ours in reference.items():
        theirs = other[split]
        for name in ("prediction", "empty_maps", "accuracy"):
            if not np.array_equal(ours[name], theirs[name]):
                problems.append(f"{split}/{name} differs")
        try:  # the tests' own check; NaN (not computed) fails it too
            assert_reactions_agree(theirs["image_reaction"], ours["image_reaction"],
                                   extents[split])
        except AssertionError as error:
            problems.append(f"{split}/image_reaction beyond the tolerance: {error}")
        loss_error = np.max(np.abs(ours["loss"] - theirs["loss"]) / np.abs(ours["loss"]))
        if not loss_error <= REL_TOL:
            problems.append(f"{split}/loss: max rel. error {loss_error:.1e} > {REL_TOL}")
    return problems


def end_to_end(work: Path, device: str, onnx_on_device: bool) -> list[str]:
    """Train on ``device``, analyse four ways, compare with torch on the CPU; the problems."""
    run = work / "run"
    seconds = console("trainer", "run", "--out", str(run), "--epochs", "3", "--onnx",
                      "--device", device, "-q")
    print(f"trainer run --onnx --device {device}: 3 epochs in {seconds:.1f} s")
    ways = [("torch", "cpu"), ("torch", device), ("onnx", "cpu")]
    ways += [("onnx", device)] if onnx_on_device else []
    files = {}
    for backend, where in dict.fromkeys(ways):
        out = work / f"{backend}-{where.replace(':', '')}.h5"
        seconds = console("analyzer", "reaction", "--ckpt-dir", str(run / "checkpoints"),
                          "--run", str(run / "run.h5"), "--out", str(out), "--backend",
                          backend, "--device", where, "-q")
        files[backend, where] = read_results(out)
        print(f"analyzer reaction --backend {backend} --device {where}: {seconds:.1f} s")
    reference, extents = files["torch", "cpu"], map_extents(run, 3)
    problems = []
    for (backend, where), results in files.items():
        if (backend, where) == ("torch", "cpu"):
            continue
        found = compare(reference, results, extents)
        print(f"  {backend} on {where} vs torch on cpu: {'; '.join(found) or 'equal'}")
        problems += [f"{backend} on {where}: {problem}" for problem in found]
    return problems + occlusion_end_to_end(run, work, list(files))


OCCLUSION_TOLERANCE = 1e-5  # absolute, on probabilities and logits


def occlusion_end_to_end(run: Path, work: Path, ways: list[tuple[str, str]]) -> list[str]:
    """``analyzer occlusion`` the same ways as ``analyzer reaction``; each map compared with
    torch on the CPU's (within :data:`OCCLUSION_TOLERANCE`); the problems."""
    maps = {}
    for backend, where in ways:
        out = work / f"occlusion-{backend}-{where.replace(':', '')}.h5"
        seconds = console("analyzer", "occlusion", "--ckpt-dir", str(run / "checkpoints"),
                          "--run", str(run / "run.h5"), "--results", str(out), "--epochs",
                          "1,3", "--images", "4", "--patch", "3", "--stride", "1",
                          "--backend", backend, "--device", where, "-q")
        with h5py.File(out, "r") as handle:
            maps[backend, where] = {name: handle["occlusion/train"][name][()]
                                    for name in ("probability", "logit", "sensitivity")}
        print(f"analyzer occlusion --backend {backend} --device {where}: {seconds:.1f} s")
    problems = []
    for (backend, where), found in maps.items():
        errors = {name: float(np.max(np.abs(found[name] - maps["torch", "cpu"][name])))
                  for name in found}
        worst = max(errors.values())
        print(f"  occlusion, {backend} on {where} vs torch on cpu: max abs difference "
              f"{worst:.1e}")
        if not worst <= OCCLUSION_TOLERANCE:
            problems.append(f"occlusion {backend} on {where}: {errors}")
    return problems


# Every thesis model at the thesis's input size, and the demo's model at its own.
SPEED_MODELS = {**{f"model{k}": (IMAGE_SIZE, 13) for k in range(1, 7)}, "small": ((8, 8), 10)}


def speed_model(name: str) -> torch.nn.Module:
    """A zoo model with random weights and batch-norm statistics (as ``bench/reaction.py``)."""
    if name != "small":
        return random_model(name)
    size, classes = SPEED_MODELS[name]
    torch.manual_seed(0)
    return build_model(ModelSpec(name, 1, size, classes)).eval()


def flops_per_image(backend: TorchBackend, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Floating-point operations the backend does per image (forward, and the backward from
    the scores to the layer), counted by torch's ``FlopCounterMode`` on two images."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        backend.compute_batch(images[:2], labels[:2])
    return counter.get_total_flops() / 2


def matmul_peak(device: str, size: int = 8192, repeats: int = 10) -> float:
    """The device's measured float32 FLOP/s on a large matrix product (no TF32)."""
    a = torch.rand(size, size, device=device)
    b = torch.rand(size, size, device=device)
    torch.mm(a, b)
    synchronize(device)
    began = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - began)


def synchronize(device: str) -> None:
    """Wait for the device's queued work (a no-op on a CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(compute, images: torch.Tensor, labels: torch.Tensor, batch: int, device: str,
          rounds: int = 3) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Median images/s of ``compute`` over the images in batches; Reaction and empty flags.

    On CUDA the batches run under ``torch.cuda.set_sync_debug_mode("error")``: a backend that
    waits for the GPU inside a batch (an ``.item()``, a host copy) fails here instead of
    being timed.
    """
    def once() -> tuple[torch.Tensor, torch.Tensor]:
        with _no_host_sync(device):
            results = [compute(images[start:start + batch], labels[start:start + batch])
                       for start in range(0, len(images), batch)]
            return (torch.cat([result.reaction for result in results]),
                    torch.cat([result.empty for result in results]))

    once()  # warm-up: kernels, algorithm choice, memory pools
    rates = []
    for _ in range(rounds):
        synchronize(device)
        began = time.perf_counter()
        reaction, empty = once()
        synchronize(device)
        rates.append(len(images) / (time.perf_counter() - began))
    return statistics.median(rates), reaction.cpu(), empty.cpu()


@contextlib.contextmanager
def _no_host_sync(device: str):
    if not device.startswith("cuda"):
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def where_it_ran(torch_backend: TorchBackend, onnx_backend: OnnxBackend | None,
                 device: str) -> list[str]:
    """Why a figure measured for ``device`` would be a CPU figure; empty when it is not."""
    if not device.startswith("cuda"):
        return []
    problems = []
    if next(torch_backend.model.parameters()).device.type != "cuda":
        problems.append("the torch backend's weights are not on the GPU")
    if onnx_backend is not None and onnx_backend.session.get_providers()[0] != \
            "CUDAExecutionProvider":
        problems.append(f"ONNX Runtime fell back to {onnx_backend.session.get_providers()}")
    return problems


def speed(device: str, onnx_on_device: bool, count: int, batch: int) -> list[str]:
    """Every model on ``device``: images/s of both backends and their share of the measured
    float32 peak; the problems (disagreement, or a figure that ran on the CPU)."""
    peak = matmul_peak(device) if device.startswith("cuda") else None
    where = "GPU" if peak else "CPU (not a GPU figure)"
    print(f"speed on {device}, {where}, {count} images, batch {batch}"
          + (f"; measured float32 matmul peak {peak / 1e12:.1f} TFLOP/s" if peak else ""))
    print(f"  {'model':<7} {'MFLOP/img':>9}  {'torch img/s':>11} {'share':>6}  "
          f"{'onnx img/s':>10} {'share':>6}  agreement")
    problems = []
    for name, (size, classes) in SPEED_MODELS.items():
        problems += _speed_row(name, size, classes, device, onnx_on_device, count, batch,
                               peak)
    return problems


def _speed_row(name: str, size: tuple[int, int], classes: int, device: str,
               onnx_on_device: bool, count: int, batch: int, peak: float | None) -> list[str]:
    model, spec = speed_model(name), ReactionSpec(gradcam_layer(name))
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(count, 1, *size, generator=generator)
    labels = torch.randint(0, classes, (count,), generator=generator)
    flops = flops_per_image(TorchBackend(model, spec, "cpu"), images, labels)
    extent = np.concatenate([map_extent(model, spec.layer, images[start:start + 64],
                                        labels[start:start + 64])
                             for start in range(0, count, 64)])
    onnx = None
    if onnx_on_device or device == "cpu":
        exporter = ReactionGraphExporter(model, ExportSettings(spec), channels=1,
                                         image_size=size)
        exporter.load_weights(model.state_dict())
        onnx = OnnxBackend(OnnxFile(Path(f"{name}.onnx"), exporter.model_bytes(), "",
                                    exporter.contract), device)
    images, labels = images.to(device), labels.to(device)
    backend = TorchBackend(model, spec, device, channels_last=True,  # as for zoo models
                           fuse_layers=True, cut_after_pool=True, cut_at_dense=True)
    problems = [f"{name}: {problem}" for problem in where_it_ran(backend, onnx, device)]
    if problems:
        return problems  # never print a CPU figure as a GPU one
    torch_rate, torch_reaction, torch_empty = timed(backend.compute, images, labels, batch,
                                                    device)
    share = (lambda rate: f"{rate * flops / peak:6.1%}") if peak else (lambda rate: "   n/a")
    row = f"  {name:<7} {flops / 1e6:9.1f}  {torch_rate:11.1f} {share(torch_rate)}  "
    if onnx is None:
        print(row + f"{'not run':>10} {'':>6}  (no CUDA provider)")
        return []
    onnx_rate, onnx_reaction, onnx_empty = timed(onnx.compute, images, labels, batch, device)
    same = bool(torch.equal(torch_empty, onnx_empty))
    error = ((torch_reaction - onnx_reaction).abs()
             / torch_reaction.abs().clamp_min(1e-30)).max().item()
    print(row + f"{onnx_rate:10.1f} {share(onnx_rate)}  Reaction max rel. diff {error:.1e}, "
                f"same empty maps: {same}")
    problems = [] if same else [f"{name}: not the same empty maps"]
    try:  # the tests' tolerance: rel. 1e-4, or 1e-6 of the map's extent near zero
        assert_reactions_agree(onnx_reaction.numpy(), torch_reaction.numpy().astype(np.float64),
                               extent)
    except AssertionError as failure:
        problems.append(f"{name}: Reaction beyond the tolerance: {failure}")
    return problems


def main() -> int:
    """Run the checks; print what was checked where; exit status as in the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--require-cuda", action="store_true",
                        help="fail (exit 3) unless torch and ONNX Runtime can both use CUDA")
    parser.add_argument("--images", type=int, default=1024,
                        help="images per model for the speed table (try 64 on a CPU)")
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()

    import onnxruntime

    torch_cuda, onnx_cuda = torch.cuda.is_available(), cuda_usable()
    device = "cuda" if torch_cuda else "cpu"
    print(f"torch {torch.__version__}, CUDA usable: {torch_cuda}"
          + (f" ({torch.cuda.get_device_name()})" if torch_cuda else ""))
    print(f"onnxruntime {onnxruntime.__version__} {onnxruntime.get_available_providers()}, "
          f"CUDA provider usable: {onnx_cuda}")
    if args.require_cuda and not (torch_cuda and onnx_cuda):
        print("CUDA is not usable by both torch and ONNX Runtime here: nothing checked")
        return 3
    with tempfile.TemporaryDirectory() as work:
        problems = end_to_end(Path(work), device, onnx_cuda)
    problems += speed(device, onnx_cuda, args.images, args.batch)
    if not onnx_cuda:
        print("NOT CHECKED: ONNX Runtime on CUDA (I/O binding)")
    print("\n".join(["FAILED:", *problems]) if problems else "all comparisons hold")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
