"""How much a per-epoch checkpoint costs next to the epoch it follows.

For each zoo model at its default input size, times side by side in one process:
writing the epoch's checkpoint (safetensors, atomic rename, SHA-256) and writing the resume
file (weights + Adam state), against one training step of a batch of 90. The epoch estimate
is the step time times the steps of an epoch (``--epoch-images``, SIW-13's 8,812 training
images by default; the embedded digits have 1,295).

    python bench/checkpoint_write.py [--models small,model4] [--epoch-images 8812]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from store.checkpoints import save_checkpoint, save_resume_state
from trainer.models import ModelSpec, build_model, default_image_size, model_names


def median_seconds(action, repeats: int = 5) -> float:
    """Median wall time of ``action()`` over ``repeats`` runs after one warm-up."""
    action()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        action()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def measure(name: str, folder: Path, epoch_images: int, batch: int = 90) -> dict[str, float]:
    """Checkpoint, resume-file and training-step times for one zoo model."""
    size = default_image_size(name)
    model = build_model(ModelSpec(name, 1, size, 13))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    images, labels = torch.rand(batch, 1, *size), torch.randint(0, 13, (batch,))

    def step() -> None:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()

    step_seconds = median_seconds(step, repeats=3)
    checkpoint = median_seconds(lambda: save_checkpoint(
        folder / "epoch_0001.safetensors", model.state_dict(), {"epoch": "1"}))
    resume = median_seconds(lambda: save_resume_state(
        folder / "resume.safetensors", model.state_dict(), optimizer.state_dict(), {}))
    epoch = step_seconds * -(-epoch_images // batch)
    return {"megabytes": (folder / "epoch_0001.safetensors").stat().st_size / 1e6,
            "checkpoint": checkpoint, "resume": resume, "epoch": epoch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(model_names()))
    parser.add_argument("--epoch-images", type=int, default=8812)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"epoch = {args.epoch_images} images in batches of 90")
    print(f"{'model':<8} {'MB':>6} {'checkpoint ms':>14} {'resume ms':>10} "
          f"{'epoch s (est.)':>15} {'saving / epoch':>15}")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            result = measure(name, Path(folder), args.epoch_images)
            share = (result["checkpoint"] + result["resume"]) / result["epoch"]
            print(f"{name:<8} {result['megabytes']:>6.2f} {result['checkpoint'] * 1e3:>14.1f} "
                  f"{result['resume'] * 1e3:>10.1f} {result['epoch']:>15.2f} {share:>14.2%}")


if __name__ == "__main__":
    main()
