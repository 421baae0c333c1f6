"""The trainer against a plain PyTorch loop: what checkpoints, curves and the run file cost.

For each model (Model I and Model IV by default) at 50x200, on one folder of generated
50x200 PNGs (8 classes of noisy shapes, ``scripts/make_shapes.py``'s drawing), in one
process, in interleaved rounds:

* ``trainer``: ``trainer.train.train`` (what ``trainer run`` calls), a fresh run folder per
  round. Its epoch is the time from one epoch's commit to the next (``write_epoch`` returns):
  training, validation with per-class figures, the checkpoint, the resume file, the run-file
  row and whatever else the loop does.
* ``plain``: a hand-written loop on the same tensors (decoded once by the same store code),
  the same model built the same way from the same seed, Adam and cross-entropy, the same
  shuffling and dropout streams: a train pass and a plain validation pass for the loss, no
  checkpoints, no curves. The weights it ends with are compared with the trainer's last
  checkpoint, bit for bit, so both are known to do the same arithmetic.

The first epoch of every run is reported apart (it holds the warm-up); the table gives
medians of the later epochs over all rounds, and the overhead ``trainer / plain - 1``. The
breakdown times the trainer's own steps (the real functions, wrapped by a timer) inside the
same runs: checkpoint, resume file, run-file row, per-class validation against the plain
validation pass, and the rest (the difference that none of these explain).

    python bench/trainer_overhead.py [--models model1,model4] [--images 480] [--epochs 4]
                                     [--rounds 3] [--threads 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

import trainer.train as trainer_module
from store.checkpoints import load_checkpoint
from store.datasets import load_split, open_source, plan_splits
from trainer.models import ModelSpec, build_model
from trainer.train import TrainConfig, epoch_generator, train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from make_shapes import CLASSES, draw

SIZE = (50, 200)
_TIMED = ("save_checkpoint", "save_resume_state", "write_epoch", "_validate",
          "_train_one_epoch")


def write_images(root: Path, count: int, seed: int = 0) -> Path:
    """``count`` 50x200 PNGs, classes in turn: a 50x50 noisy shape on a noisy strip."""
    rng = np.random.default_rng(seed)
    for n in range(count):
        name = CLASSES[n % len(CLASSES)]
        strip = np.round(np.clip(rng.uniform(0.2, 0.5) + rng.normal(0, 0.12, SIZE), 0, 1)
                         * 255).astype(np.uint8)
        left = int(rng.integers(0, SIZE[1] - SIZE[0] + 1))
        strip[:, left:left + SIZE[0]] = draw(name, SIZE[0], 0.12, rng)
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(strip).save(folder / f"{n:05d}.png")
    return root


class StepTimer:
    """Wraps the trainer module's own steps with a timer; the real functions still run."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = defaultdict(list)
        self.commits: list[float] = []
        self.first_start = 0.0
        self.originals = {name: getattr(trainer_module, name) for name in _TIMED}

    def __enter__(self) -> StepTimer:
        for name, function in self.originals.items():
            setattr(trainer_module, name, self._timed(name, function))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, function in self.originals.items():
            setattr(trainer_module, name, function)

    def _timed(self, name: str, function: Callable) -> Callable:
        def timed(*args, **kwargs):
            began = time.perf_counter()
            if name == "_train_one_epoch" and not self.first_start:
                self.first_start = began
            result = function(*args, **kwargs)
            ended = time.perf_counter()
            self.seconds[name].append(ended - began)
            if name == "write_epoch":
                self.commits.append(ended)
            return result
        return timed


def run_trainer(model: str, data: Path, out: Path, epochs: int, batch: int,
                seed: int) -> tuple[list[float], dict[str, list[float]], float, Path]:
    """One ``train`` run: epoch times (commit to commit; the first from the call), the
    per-epoch step times, the set-up time (call to the first epoch) and the last checkpoint."""
    config = TrainConfig(data=str(data), model=model, epochs=epochs, batch_size=batch,
                         seed=seed, image_size=f"{SIZE[0]}x{SIZE[1]}")
    with StepTimer() as timer:
        began = time.perf_counter()
        train(config, out, progress=False, command="bench")
    setup = timer.first_start - began
    epochs_seconds = [timer.commits[0] - timer.first_start, *np.diff(timer.commits)]
    return epochs_seconds, dict(timer.seconds), setup, out / "checkpoints" / \
        f"epoch_{epochs:04d}.safetensors"


def load_tensors(data: Path, seed: int) -> tuple[torch.Tensor, ...]:
    """The train and val tensors the trainer would load (same store code, same split)."""
    source = open_source(str(data))
    plan = plan_splits(source, 0.1, seed)
    train_set = load_split(source, plan, "train", 1, SIZE)
    val_set = load_split(source, plan, "val", 1, SIZE)
    return (torch.as_tensor(train_set.images), torch.as_tensor(train_set.labels),
            torch.as_tensor(val_set.images), torch.as_tensor(val_set.labels),
            torch.tensor(len(source.class_names)))


def run_plain(model_name: str, tensors: tuple[torch.Tensor, ...], epochs: int, batch: int,
              seed: int) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    """The hand-written loop: epoch times, validation-pass times and the final weights."""
    train_x, train_y, val_x, val_y, classes = tensors
    torch.manual_seed(seed)
    model = build_model(ModelSpec(model_name, 1, SIZE, int(classes)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    epoch_seconds, val_seconds = [], []
    for epoch in range(1, epochs + 1):
        began = time.perf_counter()
        generator = epoch_generator(seed, epoch)  # the trainer's shuffle and dropout streams
        order = torch.randperm(len(train_y), generator=generator)
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        model.train()
        for index in order.split(batch):
            loss = nn.functional.cross_entropy(model(train_x[index]), train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        validated = time.perf_counter()
        model.eval()
        with torch.no_grad():
            val_loss = float(nn.functional.cross_entropy(model(val_x), val_y))
        ended = time.perf_counter()
        assert np.isfinite(val_loss)
        epoch_seconds.append(ended - began)
        val_seconds.append(ended - validated)
    return epoch_seconds, val_seconds, model.state_dict()


def same_weights(state: dict[str, torch.Tensor], checkpoint: Path) -> bool:
    """Whether ``state`` equals the checkpoint's tensors bit for bit."""
    stored, _ = load_checkpoint(checkpoint)
    return stored.keys() == state.keys() and all(
        torch.equal(stored[name], tensor) for name, tensor in state.items())


def measure(model: str, data: Path, folder: Path, args: argparse.Namespace) -> dict:
    """Interleaved rounds of both loops for one model; medians and the breakdown."""
    tensors = load_tensors(data, args.seed)
    rows: dict[str, list] = defaultdict(list)
    for round_index in range(args.rounds):
        order = ("plain", "trainer") if round_index % 2 == 0 else ("trainer", "plain")
        for which in order:
            if which == "plain":
                seconds, val_seconds, state = run_plain(model, tensors, args.epochs,
                                                        args.batch, args.seed)
                rows["plain_first"].append(seconds[0])
                rows["plain"] += seconds[1:]
                rows["plain_val"] += val_seconds[1:]
            else:
                out = folder / f"{model}-{round_index}"
                seconds, steps, setup, last = run_trainer(model, data, out, args.epochs,
                                                          args.batch, args.seed)
                rows["trainer_first"].append(seconds[0])
                rows["trainer"] += seconds[1:]
                rows["setup"].append(setup)
                for name, values in steps.items():
                    rows[name] += values[1:]
        rows["identical"].append(same_weights(state, last))
    median = {name: statistics.median(values) for name, values in rows.items()
              if name != "identical"}
    plain, trainer = median["plain"], median["trainer"]
    extras = {"checkpoint": median["save_checkpoint"], "resume file": median["save_resume_state"],
              "run-file row": median["write_epoch"],
              "validation extras": median["_validate"] - median["plain_val"]}
    train_pass = median["_train_one_epoch"] - (plain - median["plain_val"])
    extras["train pass"] = train_pass
    extras["rest"] = trainer - plain - sum(extras.values())
    return {"model": model, "plain_s": plain, "trainer_s": trainer,
            "overhead": trainer / plain - 1, "breakdown_s": extras,
            "plain_first_s": median["plain_first"], "trainer_first_s": median["trainer_first"],
            "setup_s": median["setup"], "identical": all(rows["identical"]),
            "epochs_timed": len(rows["plain"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="model1,model4")
    parser.add_argument("--images", type=int, default=480, help="training pool (10%% to val)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run, first apart")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=90)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.images} images "
          f"{SIZE[0]}x{SIZE[1]}, batch {args.batch}, {args.epochs} epochs x {args.rounds} "
          f"rounds, load average {os.getloadavg()[0]:.1f}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        data = write_images(Path(folder) / "data", args.images)
        for model in args.models.split(","):
            results.append(measure(model, data, Path(folder), args))
            print_row(results[-1])
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def print_row(row: dict) -> None:
    """One model's line and its breakdown, in milliseconds per epoch."""
    print(f"{row['model']:8s} plain {row['plain_s']:.3f} s/epoch  trainer "
          f"{row['trainer_s']:.3f} s/epoch  overhead {row['overhead']:+.1%}  (first epoch: "
          f"plain {row['plain_first_s']:.2f} s, trainer {row['trainer_first_s']:.2f} s + "
          f"set-up {row['setup_s']:.2f} s; {row['epochs_timed']} epochs timed; weights "
          f"{'identical' if row['identical'] else 'DIFFERENT'})")
    print("         breakdown ms/epoch: " + ", ".join(
        f"{name} {seconds * 1e3:+.1f}" for name, seconds in row["breakdown_s"].items()),
        flush=True)


if __name__ == "__main__":
    main()
