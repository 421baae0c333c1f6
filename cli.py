"""Command-line entry points ``trainer`` and ``analyzer`` (thin: parse, call, print)."""

from __future__ import annotations

import functools
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import click

from store.errors import InputError


def _user_errors(command: Callable) -> Callable:
    """Turn :class:`InputError` into a one-line ``Error: ...`` and exit code 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except InputError as error:
            raise click.ClickException(str(error)) from None

    return wrapper


@click.group()
def trainer() -> None:
    """Train a CNN and keep every epoch: checkpoints plus an HDF5 run file."""


@trainer.command("run")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output folder: run.h5, checkpoints/, resume.safetensors.")
@click.option("--data", default="digits", show_default=True,
              help="'digits' (embedded), a folder with one sub-folder per class, "
                   "or mnist:DIR (IDX files).")
@click.option("--test", "test_data", default=None,
              help="Folder of test images (same classes as --data). "
                   "Default: MNIST's test files, or a fixed stratified 20% of --data.")
@click.option("--model", default="small", show_default=True,
              help="Zoo model (see 'trainer models').")
@click.option("--epochs", default=1000, show_default=True, type=int)
@click.option("--batch-size", default=90, show_default=True, type=int)
@click.option("--lr", "learning_rate", default=1e-4, show_default=True, type=float,
              help="Adam learning rate.")
@click.option("--val-fraction", default=0.1, show_default=True, type=float,
              help="Share of each class's training images held out for validation.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--image-size", default=None, metavar="HxW",
              help="Resize images to HxW. Default: the data's own size, else the model's.")
@click.option("--channels", default=1, show_default=True, type=click.IntRange(1, 3),
              help="1 (grey) or 3 (RGB).")
@click.option("--device", default="auto", show_default=True,
              help="auto, cpu, cuda or cuda:N.")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out from its last complete epoch (its settings).")
@click.option("--force", is_flag=True, help="Start over even if --out holds a run.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_user_errors
def trainer_run(out: Path, data: str, test_data: str | None, model: str, epochs: int,
                batch_size: int, learning_rate: float, val_fraction: float, seed: int,
                image_size: str | None, channels: int, device: str, resume: bool, force: bool,
                quiet: bool) -> None:
    """Train and save every epoch.

    \b
    Examples:
      trainer run --out runs/demo
      trainer run --data siw13/train --test siw13/test --model model4 --out runs/m4
      trainer run --out runs/demo --resume
    """
    from trainer.train import TrainConfig, train

    if resume and force:
        raise InputError("--resume and --force exclude each other")
    config = TrainConfig(data=data, test=test_data, model=model, epochs=epochs,
                         batch_size=batch_size, learning_rate=learning_rate,
                         val_fraction=val_fraction, seed=seed, image_size=image_size,
                         channels=channels)
    command = shlex.join(["trainer", *sys.argv[1:]])
    run_path = train(config, out, resume=resume, force=force, device=device,
                     progress=not quiet, command=command)
    click.echo(f"run file: {run_path}")


@trainer.command("models")
@click.option("--classes", default=10, show_default=True, type=int,
              help="Number of classes for the parameter counts.")
@_user_errors
def trainer_models(classes: int) -> None:
    """List the model zoo with input sizes and parameter counts."""
    from trainer.models import (
        ModelSpec,
        build_model,
        count_parameters,
        default_image_size,
        describe,
        model_names,
    )

    click.echo(f"{'name':<8} {'input':>9} {'parameters':>11}  description")
    for name in model_names():
        height, width = default_image_size(name)
        model = build_model(ModelSpec(name, 1, (height, width), classes))
        click.echo(f"{name:<8} {f'1x{height}x{width}':>9} {count_parameters(model):>11,}  "
                   f"{describe(name)}")


@click.group()
def analyzer() -> None:
    """Analyse saved checkpoints post hoc: Reaction values, epochs, figures."""


def _split_list(text: str | None) -> list[str] | None:
    return None if text is None else [s.strip() for s in text.split(",") if s.strip()]


@analyzer.command("reaction")
@click.option("--ckpt-dir", type=click.Path(path_type=Path), required=True,
              help="Folder of checkpoints, one file per epoch (epoch number in the name).")
@click.option("--run", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The run file. Default: run.h5 in the checkpoint folder's parent.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Results file. Default: the run file itself.")
@click.option("--model", default=None,
              help="Zoo name, module:callable or path/to/file.py:callable returning an "
                   "nn.Module. Default: the run file's model.")
@click.option("--layer", default=None,
              help="Grad-CAM layer (qualified module name). Default: the model's own.")
@click.option("--data", "data", multiple=True, metavar="SPLIT=FOLDER",
              help="Images of a split, one sub-folder per class (repeatable). "
                   "Default: the run file's splits.")
@click.option("--image-size", default=None, metavar="HxW", help="Model input size.")
@click.option("--channels", default=None, type=click.IntRange(1, 3), help="1 or 3.")
@click.option("--splits", default=None, help="Comma-separated splits. Default: all.")
@click.option("--epochs", default=None, metavar="SEL",
              help="Epochs to analyse: 1:1000:10, 5, 1,10,100. Default: every checkpoint.")
@click.option("--score", type=click.Choice(["logit", "softmax"]), default="logit",
              show_default=True, help="Target score: the logit (thesis) or its softmax.")
@click.option("--target", type=click.Choice(["label", "pred"]), default="label",
              show_default=True, help="Target class: the true label or the prediction.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(1))
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_user_errors
def analyzer_reaction(ckpt_dir: Path, run: Path | None, out: Path | None, model: str | None,
                      layer: str | None, data: tuple[str, ...], image_size: str | None,
                      channels: int | None, splits: str | None, epochs: str | None, score: str,
                      target: str, device: str, batch_size: int, quiet: bool) -> None:
    """Reaction value of every image, class and checkpoint (SPEC §2).

    \b
    Examples:
      analyzer reaction --ckpt-dir runs/demo/checkpoints
      analyzer reaction --ckpt-dir runs/m4/checkpoints --splits train,test --epochs 1:1000:10
      analyzer reaction --ckpt-dir other/ckpts --model mypkg.nets:make_cnn --layer body.7 \\
          --data train=siw13/train --data test=siw13/test --image-size 50x200 \\
          --out other/reaction.h5
    """
    from analyzer.inputs import parse_data_options
    from analyzer.reaction import ReactionOptions, compute_reaction
    from store.datasets import parse_image_size

    options = ReactionOptions(
        ckpt_dir=ckpt_dir, run=run, out=out, model=model, layer=layer,
        data=parse_data_options(data),
        image_size=parse_image_size(image_size) if image_size else None, channels=channels,
        splits=_split_list(splits), epochs=epochs, score=score, target=target, device=device,
        batch_size=batch_size)
    path = compute_reaction(options, progress=not quiet)
    click.echo(f"results: {path}")


if __name__ == "__main__":
    trainer()
