"""The trainer against a plain PyTorch loop: what checkpoints, curves and the run file cost.

For each model (Model I and Model IV by default) at 50x200, on one folder of generated
50x200 PNGs (8 classes of noisy shapes, ``scripts/make_shapes.py``'s drawing), in
interleaved rounds, each loop in a fresh process of its own (so that no loop inherits
another's heap or allocator settings; the data decoding is outside the timings):

* ``trainer``: ``trainer.train.train`` (what ``trainer run`` calls), a fresh run folder per
  round. Its epoch is the time from one epoch's commit to the next (``write_epoch`` returns):
  training, validation with per-class figures, the checkpoint, the resume file, the run-file
  row and whatever else the loop does.
* ``plain``: a hand-written loop on the same tensors (decoded once by the same store code),
  the same model built the same way from the same seed, Adam and cross-entropy, the same
  shuffling and dropout streams: a train pass and a plain validation pass for the loss, no
  checkpoints, no curves. The weights it ends with are compared with the trainer's last
  checkpoint, bit for bit, so both are known to do the same arithmetic. ``plain default``
  runs with glibc's default allocator settings, as a user's loop would; ``plain kept`` with
  the ones the trainer sets (``trainer.allocator.keep_freed_memory``), like for like.

The first epoch of every run is reported apart (it holds the warm-up); the table gives
medians of the later epochs over all rounds, for the wall clock, the process's CPU time
(steadier on a shared machine), its system time and its minor page faults, and the overhead
``trainer / plain - 1``. The breakdown (against ``plain kept``, or the first plain loop run
where that one is not) times the trainer's own steps
(the real functions, wrapped by a timer) inside the same runs: checkpoint, resume file,
run-file row, per-class validation against the plain validation pass, the training pass,
and the rest (the difference that none of these explain).

    python bench/trainer_overhead.py [--models model1,model4] [--images 480] [--epochs 3]
                                     [--rounds 3] [--threads 1] [--plains default,kept]
                                     [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
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
from store.checkpoints import load_checkpoint, save_checkpoint
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


_CLOCKS = ("wall", "cpu", "system", "page faults")


def clocks() -> np.ndarray:
    """Wall time, this process's CPU time (user + system, all threads) and system time in
    seconds, and its count of minor page faults."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return np.array([time.perf_counter(), time.process_time(), usage.ru_stime,
                     usage.ru_minflt])


class StepTimer:
    """Wraps the trainer module's own steps with a timer; the real functions still run."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[np.ndarray]] = defaultdict(list)
        self.commits: list[np.ndarray] = []
        self.first_start: np.ndarray | None = None
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
            began = clocks()
            if name == "_train_one_epoch" and self.first_start is None:
                self.first_start = began
            result = function(*args, **kwargs)
            ended = clocks()
            self.seconds[name].append(ended - began)
            if name == "write_epoch":
                self.commits.append(ended)
            return result
        return timed


def run_trainer(model: str, data: Path, out: Path, epochs: int, batch: int,
                seed: int) -> tuple[list[np.ndarray], dict[str, list[np.ndarray]], np.ndarray]:
    """One ``train`` run: (wall, CPU) seconds of each epoch (commit to commit; the first from
    its start), of each timed step per epoch, and of the set-up (call to the first epoch)."""
    config = TrainConfig(data=str(data), model=model, epochs=epochs, batch_size=batch,
                         seed=seed, image_size=f"{SIZE[0]}x{SIZE[1]}")
    with StepTimer() as timer:
        began = clocks()
        train(config, out, progress=False, command="bench")
    assert timer.first_start is not None and len(timer.commits) == epochs
    epoch_seconds = [timer.commits[0] - timer.first_start, *np.diff(timer.commits, axis=0)]
    return epoch_seconds, dict(timer.seconds), timer.first_start - began


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
              seed: int) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, torch.Tensor]]:
    """The hand-written loop: (wall, CPU) seconds of each epoch and of its validation pass,
    and the final weights."""
    train_x, train_y, val_x, val_y, classes = tensors
    torch.manual_seed(seed)
    model = build_model(ModelSpec(model_name, 1, SIZE, int(classes)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    epoch_seconds, val_seconds = [], []
    for epoch in range(1, epochs + 1):
        began = clocks()
        generator = epoch_generator(seed, epoch)  # the trainer's shuffle and dropout streams
        order = torch.randperm(len(train_y), generator=generator)
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        model.train()
        for index in order.split(batch):
            loss = nn.functional.cross_entropy(model(train_x[index]), train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        validated = clocks()
        model.eval()
        with torch.no_grad():
            val_loss = float(nn.functional.cross_entropy(model(val_x), val_y))
        ended = clocks()
        assert np.isfinite(val_loss)
        epoch_seconds.append(ended - began)
        val_seconds.append(ended - validated)
    return epoch_seconds, val_seconds, model.state_dict()


def same_weights(state: dict[str, torch.Tensor], checkpoint: Path) -> bool:
    """Whether ``state`` equals the checkpoint's tensors bit for bit."""
    stored, _ = load_checkpoint(checkpoint)
    return stored.keys() == state.keys() and all(
        torch.equal(stored[name], tensor) for name, tensor in state.items())


def worker(args: argparse.Namespace) -> dict:
    """One loop in this process (``--worker``): its timings, as JSON for the parent."""
    torch.set_num_threads(args.threads)
    if args.worker == "trainer":
        seconds, steps, setup = run_trainer(args.model, args.data, args.out, args.epochs,
                                            args.batch, args.seed)
        return {"epochs": np.array(seconds).tolist(), "setup": setup.tolist(),
                "steps": {name: np.array(values).tolist() for name, values in steps.items()}}
    if args.worker == "kept":
        from trainer.allocator import keep_freed_memory
        assert keep_freed_memory(), "glibc did not take the trainer's allocator settings"
    seconds, val_seconds, state = run_plain(args.model, load_tensors(args.data, args.seed),
                                            args.epochs, args.batch, args.seed)
    save_checkpoint(args.out, state, {})
    return {"epochs": np.array(seconds).tolist(), "val": np.array(val_seconds).tolist()}


def run_worker(kind: str, model: str, data: Path, out: Path, args: argparse.Namespace) -> dict:
    """Run one loop in a fresh process of this script and return its timings."""
    command = [sys.executable, __file__, "--worker", kind, "--model", model, "--data", str(data),
               "--out", str(out), "--epochs", str(args.epochs), "--batch", str(args.batch),
               "--threads", str(args.threads), "--seed", str(args.seed)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise SystemExit(f"{kind} worker failed:\n{done.stderr}")
    return json.loads(done.stdout)


def measure(model: str, data: Path, folder: Path, args: argparse.Namespace) -> dict:
    """Interleaved rounds of every loop for one model; medians and the breakdown, for the
    wall clock and for the process's CPU time."""
    kinds = [*args.plains.split(","), "trainer"]
    rows: dict[str, list] = defaultdict(list)
    identical = []
    for round_index in range(args.rounds):
        outs = {}
        for kind in kinds[round_index % len(kinds):] + kinds[:round_index % len(kinds)]:
            outs[kind] = folder / f"{model}-{kind}-{round_index}"
            if kind != "trainer":
                outs[kind] = outs[kind].with_suffix(".safetensors")
            found = run_worker(kind, model, data, outs[kind], args)
            rows[f"{kind}_first"].append(found["epochs"][0])
            rows[kind] += found["epochs"][1:]
            if kind == "trainer":
                rows["setup"].append(found["setup"])
                for name, values in found["steps"].items():
                    rows[name] += values[1:]
            else:
                rows[f"{kind}_val"] += found["val"][1:]
        last = outs["trainer"] / "checkpoints" / f"epoch_{args.epochs:04d}.safetensors"
        identical += [same_weights(load_checkpoint(outs[kind])[0], last) for kind in kinds[:-1]]
    result = {"model": model, "identical": all(identical), "epochs_timed": len(rows["trainer"]),
              "plains": kinds[:-1]}
    like = "kept" if "kept" in kinds else kinds[0]
    for column, clock in enumerate(_CLOCKS):
        median = {name: statistics.median(value[column] for value in values)
                  for name, values in rows.items()}
        plain, trainer = median[like], median["trainer"]
        extras = {"checkpoint": median["save_checkpoint"],
                  "resume file": median["save_resume_state"],
                  "run-file row": median["write_epoch"],
                  "validation extras": median["_validate"] - median[f"{like}_val"],
                  "train pass": median["_train_one_epoch"] - (plain - median[f"{like}_val"])}
        extras["rest"] = trainer - plain - sum(extras.values())
        result[clock] = {"trainer_s": trainer, "breakdown_s": extras,
                         "trainer_first_s": median["trainer_first"], "setup_s": median["setup"],
                         **{f"{kind}_s": median[kind] for kind in kinds[:-1]},
                         **{f"{kind}_first_s": median[f"{kind}_first"] for kind in kinds[:-1]},
                         **{f"overhead_{kind}": trainer / median[kind] - 1 if median[kind]
                            else float("nan") for kind in kinds[:-1]}}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="model1,model4")
    parser.add_argument("--images", type=int, default=480, help="training pool (10%% to val)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run, first apart")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=90)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plains", default="default,kept",
                        help="plain loops to run: default (glibc's allocator settings), kept "
                             "(the trainer's); 'default' alone for code before the latter")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", choices=["default", "kept", "trainer"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.images} images "
          f"{SIZE[0]}x{SIZE[1]}, batch {args.batch}, {args.epochs} epochs x {args.rounds} "
          f"rounds, load average {os.getloadavg()[0]:.1f}, trainer from "
          f"{Path(trainer_module.__file__).parents[1]}", flush=True)
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
    """One model's lines (wall clock, then CPU time) and their breakdowns, in ms per epoch."""
    print(f"{row['model']}: {row['epochs_timed']} epochs timed per loop, final weights of the "
          f"loops {'identical' if row['identical'] else 'DIFFERENT'}")
    for clock in _CLOCKS:
        figures = row[clock]
        unit, digits = ("", 0) if clock == "page faults" else (" s", 3)
        plains = "  ".join(f"plain {kind} {figures[f'{kind}_s']:.{digits}f}{unit} (first "
                           f"{figures[f'{kind}_first_s']:.{digits}f})" for kind in row["plains"])
        overheads = ", ".join(f"{figures[f'overhead_{kind}']:+.1%} vs {kind}"
                              for kind in row["plains"])
        print(f"  {clock}/epoch: {plains}  trainer {figures['trainer_s']:.{digits}f}{unit} "
              f"(first {figures['trainer_first_s']:.{digits}f}, set-up "
              f"{figures['setup_s']:.{digits}f}): "
              f"overhead {overheads}")
        if clock in ("wall", "cpu"):
            print("    breakdown ms/epoch: " + ", ".join(
                f"{name} {seconds * 1e3:+.1f}" for name, seconds in
                figures["breakdown_s"].items()), flush=True)


if __name__ == "__main__":
    main()
