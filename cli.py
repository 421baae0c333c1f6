"""Command-line entry points ``trainer`` and ``analyzer`` (thin: parse, call, print)."""

from __future__ import annotations

import atexit
import errno
import functools
import logging
import os
import shlex
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click
from tqdm import tqdm

from store.errors import InputError, first_line

if TYPE_CHECKING:
    from store.filter_results import FilterEvolution

_NOTE_PACKAGES = ("store", "trainer", "analyzer")


class _NoteHandler(logging.Handler):
    """Writes each record as ``note: <message>`` on stderr, above any progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(f"note: {self.format(record)}", file=sys.stderr)
        except Exception:  # the logging convention: report, never raise from a handler
            self.handleError(record)


_NOTES = _NoteHandler()


def _configure_notes(quiet: bool) -> None:
    """Show the notes (warnings) of our packages on stderr; ``quiet`` leaves errors only."""
    for name in _NOTE_PACKAGES:
        package = logging.getLogger(name)
        if _NOTES not in package.handlers:
            package.addHandler(_NOTES)
        package.setLevel(logging.ERROR if quiet else logging.WARNING)


def _user_errors(command: Callable) -> Callable:
    """Turn :class:`InputError`, and any operating-system error (disk full, permission,
    a file removed under us), into a one-line ``Error: ...`` and exit code 1.

    ``REACTION_DEBUG=1`` lets operating-system errors through with their traceback.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except InputError as error:
            raise click.ClickException(str(error)) from None
        except OSError as error:
            if os.environ.get("REACTION_DEBUG") or error.errno == errno.EPIPE:
                raise  # EPIPE: the reader went away (`... | head`); click ends quietly
            where = f": {error.filename}" if error.filename else ""
            raise click.ClickException(f"{error.strerror or error}{where}") from None
        except (MemoryError, RuntimeError) as error:  # torch reports allocation failures so
            if not _out_of_memory(error) or os.environ.get("REACTION_DEBUG"):
                raise
            raise click.ClickException(
                f"out of memory ({first_line(error)}): use a smaller "
                "--batch-size or --image-size") from None

    return wrapper


def _out_of_memory(error: BaseException) -> bool:
    """True for a failed allocation: MemoryError, or torch's CPU and CUDA allocator errors."""
    text = str(error)
    return isinstance(error, MemoryError) or "can't allocate memory" in text \
        or "out of memory" in text.lower()


@click.group()
def trainer() -> None:
    """Train a CNN and keep every epoch: checkpoints plus an HDF5 run file."""
    _configure_notes(quiet=False)  # a command's -q raises the level again


@trainer.command("run")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output folder: run.h5, checkpoints/, resume.safetensors.")
@click.option("--data", default="digits", show_default=True,
              help="'digits' (embedded), a folder with one sub-folder per class, "
                   "or mnist:DIR (IDX files).")
@click.option("--test", "test_data", default=None,
              help="Folder of test images (same classes as --data). "
                   "Default: MNIST's test files; the digits' fixed stratified 20%; none "
                   "for a folder.")
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
              help="Continue the run in --out from its last complete epoch, with its own "
                   "settings: options typed again must equal them; --epochs M above the "
                   "run's lengthens it.")
@click.option("--force", is_flag=True, help="Start over even if --out holds a run.")
@click.option("--onnx", is_flag=True,
              help="Also write checkpoints/epoch_NNNN.onnx, with the Grad-CAM gradient graph "
                   "(docs/ONNX.md).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no notes.")
@_user_errors
def trainer_run(out: Path, data: str, test_data: str | None, model: str, epochs: int,
                batch_size: int, learning_rate: float, val_fraction: float, seed: int,
                image_size: str | None, channels: int, device: str, resume: bool, force: bool,
                onnx: bool, quiet: bool) -> None:
    """Train and save every epoch.

    \b
    Examples:
      trainer run --out runs/demo
      trainer run --data siw13/train --test siw13/test --model model4 --out runs/m4
      trainer run --out runs/demo --resume
      trainer run --out runs/demo --resume --epochs 2000
      trainer run --out runs/demo --onnx
    """
    from analyzer.onnx_export import OnnxTwinWriter
    from trainer.train import TrainConfig, resume_config, train

    _configure_notes(quiet)
    if resume and force:
        raise InputError("--resume and --force exclude each other")
    config = TrainConfig(data=data, test=test_data, model=model, epochs=epochs,
                         batch_size=batch_size, learning_rate=learning_rate,
                         val_fraction=val_fraction, seed=seed, image_size=image_size,
                         channels=channels, onnx=onnx)
    typed = {"test" if name == "test_data" else name: value
             for name, value in _typed_options().items() if name not in ("out", "resume")}
    settings = {name: value for name, value in typed.items() if hasattr(config, name)}
    if resume and (out / "run.h5").exists():  # the run's own settings; those typed again
        config = resume_config(out, settings)  # must equal them (--epochs: or more)
    elif resume and settings:  # the first attempt died before its run file: start it
        logging.getLogger("trainer").warning(f"nothing to resume in {out} yet: starting "
                                             "the run")
        resume = False
    command = shlex.join(["trainer", *sys.argv[1:]])
    run_path = train(config, out, resume=resume, force=force, device=device,
                     progress=not quiet, command=command,
                     checkpoint_writers=[OnnxTwinWriter()] if config.onnx else [])
    click.echo(f"run file: {run_path}")


def _typed_options() -> dict[str, object]:
    """The options of the current command that its command line set explicitly."""
    context = click.get_current_context()
    return {name: value for name, value in context.params.items()
            if context.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}


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
    _configure_notes(quiet=False)  # a command's -q raises the level again


def _stacked(options: list[Callable]) -> Callable:
    """One decorator that applies ``options`` in order (the first is listed first)."""

    def apply(command: Callable) -> Callable:
        for option in reversed(options):
            command = option(command)
        return command

    return apply


def _model_options(layer_help: str = "Grad-CAM layer (qualified module name). "
                                     "Default: the model's own.",
                   channels_flag: str = "--channels") -> Callable:
    """The options that say which network the checkpoints hold (reaction, export-onnx, cam).

    ``channels_flag`` names the input-channels option where ``--channels`` means another
    thing (``features``: the layer's channels).
    """
    options = [
        click.option("--run", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="The run file. Default: run.h5 in the checkpoint folder's parent."),
        click.option("--model", default=None,
                     help="Zoo name, module:callable or path/to/file.py:callable returning "
                          "an nn.Module. Default: the run file's model."),
        click.option("--layer", default=None, help=layer_help),
        click.option("--image-size", default=None, metavar="HxW", help="Model input size."),
        click.option(channels_flag, default=None, type=click.IntRange(1, 3), help="1 or 3."),
    ]
    return _stacked(options)


def _split_list(text: str | None) -> list[str] | None:
    return None if text is None else [s.strip() for s in text.split(",") if s.strip()]


@analyzer.command("reaction")
@click.option("--ckpt-dir", type=click.Path(path_type=Path), required=True,
              help="Folder of checkpoints, one file per epoch (epoch number in the name).")
@_model_options()
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Results file. Default: the run file itself.")
@click.option("--data", "data", multiple=True, metavar="SPLIT=FOLDER",
              help="Images of a split, one sub-folder per class (repeatable). "
                   "Default: the run file's splits.")
@click.option("--splits", default=None, help="Comma-separated splits. Default: all.")
@click.option("--epochs", default=None, metavar="SEL",
              help="Epochs to analyse: 1:1000:10, 5, 1,10,100. Default: every checkpoint.")
@click.option("--score", type=click.Choice(["logit", "softmax"]), default=None,
              help="Target score: the logit (thesis) or its softmax. "
                   "Default: logit, or what the ONNX checkpoints were exported with.")
@click.option("--target", type=click.Choice(["label", "pred"]), default=None,
              help="Target class: the true label or the prediction. "
                   "Default: label, or what the ONNX checkpoints were exported with.")
@click.option("--backend", type=click.Choice(["auto", "torch", "onnx"]), default="auto",
              show_default=True,
              help="auto: ONNX Runtime for .onnx checkpoints, else PyTorch. onnx on PyTorch "
                   "checkpoints converts each one in memory.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(1))
@click.option("--follow", is_flag=True,
              help="After the checkpoints already there, analyse each new one once it is "
                   "complete (with a run file: committed there). Ends when the run file says "
                   "training finished and all is analysed, after --idle, or on Ctrl-C.")
@click.option("--idle", type=float, default=None, metavar="SECONDS",
              help="With --follow: stop after this long without a new checkpoint (for a "
                   "trainer that writes no run file).")
@click.option("--poll", type=click.FloatRange(min=0.01), default=0.5, show_default=True,
              metavar="SECONDS", help="With --follow: seconds between looks at the folder.")
@click.option("--no-graph-cache", is_flag=True,
              help="Export the ONNX graph anew instead of reading it from the graph cache "
                   "($REACTION_CACHE_DIR, else ~/.cache/reaction; REACTION_GRAPH_CACHE=0 "
                   "turns it off too).")
@click.option("--shard", default=None, metavar="K/N",
              help="Analyse only the K-th of N slices of the checkpoints (sorted by epoch, "
                   "every N-th from the K-th) into --out; join the shards' files with "
                   "'analyzer merge'.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no notes.")
@_user_errors
def analyzer_reaction(ckpt_dir: Path, run: Path | None, out: Path | None, model: str | None,
                      layer: str | None, data: tuple[str, ...], image_size: str | None,
                      channels: int | None, splits: str | None, epochs: str | None,
                      score: str | None, target: str | None, backend: str, device: str,
                      batch_size: int, follow: bool, idle: float | None, poll: float,
                      no_graph_cache: bool, shard: str | None, quiet: bool) -> None:
    """Reaction value of every image, class and checkpoint (docs/METHOD.md §2).

    Under torchrun the ranks divide the checkpoints; rank 0 alone writes the results.

    \b
    Examples:
      analyzer reaction --ckpt-dir runs/demo/checkpoints
      analyzer reaction --ckpt-dir runs/m4/checkpoints --splits train,test --epochs 1:1000:10
      analyzer reaction --ckpt-dir other/ckpts --model mypkg.nets:make_cnn --layer body.7 \\
          --data train=siw13/train --data test=siw13/test --image-size 50x200 \\
          --out other/reaction.h5
      analyzer reaction --ckpt-dir runs/m4/onnx --run runs/m4/run.h5
      analyzer reaction --ckpt-dir runs/m4/checkpoints --follow
      analyzer reaction --ckpt-dir other/ckpts --model pkg:make --out other/r.h5 \\
          --data train=siw13/train --follow --idle 600
      analyzer reaction --ckpt-dir runs/m4/checkpoints --shard 3/32 --out shards/m4.3.h5
      torchrun --nproc-per-node 8 $(which analyzer) reaction --ckpt-dir runs/m4/checkpoints
    """
    from analyzer.distributed import parse_shard, torchrun_ranks
    from analyzer.inputs import parse_data_options
    from analyzer.reaction import ReactionOptions, compute_reaction
    from store.datasets import parse_image_size

    ranks = torchrun_ranks()
    _configure_notes(quiet or (ranks is not None and not ranks.writer))
    options = ReactionOptions(
        ckpt_dir=ckpt_dir, run=run, out=out, model=model, layer=layer,
        data=parse_data_options(data),
        image_size=parse_image_size(image_size) if image_size else None, channels=channels,
        splits=_split_list(splits), epochs=epochs, score=score, target=target, device=device,
        batch_size=batch_size, backend=backend, follow=follow, idle=idle,
        poll=poll, shard=parse_shard(shard) if shard is not None else None,
        graph_cache=not no_graph_cache)
    summary = compute_reaction(options, progress=not quiet)
    if not summary.writer:
        return
    if summary.stopped:
        click.echo(f"{summary.reason}: {summary.analysed} checkpoints stored whole; run the "
                   "same command again to continue", err=True)
        if not follow:  # a batch job that did not finish (a follower's stop is its end)
            click.echo(f"results: {summary.path}")
            sys.exit(130)
    elif follow:
        click.echo(f"{summary.reason}: {summary.analysed} checkpoints analysed", err=True)
    click.echo(f"results: {summary.path}")


@analyzer.command("merge")
@click.argument("target", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("shards", nargs=-1, required=True, type=click.Path(dir_okay=False,
                                                                     path_type=Path))
@_user_errors
def analyzer_merge(target: Path, shards: tuple[Path, ...]) -> None:
    """Merge the results files SHARDS (e.g. of 'analyzer reaction --shard K/N') into TARGET.

    TARGET is a run file, a results file, or a new results file. Classes, images, settings
    and checkpoint SHA-256 are checked first: any conflict is refused and nothing is written.
    Rows TARGET already holds are skipped, so merging again changes nothing.

    \b
    Example:
      analyzer merge runs/m4/run.h5 shards/m4.*.h5
    """
    from store.merge import merge_results

    summary = merge_results(target, list(shards))
    click.echo(f"merged {summary.merged} checkpoints from {len(shards)} files "
               f"({summary.already} already there)", err=True)
    click.echo(f"results: {summary.target}")


@analyzer.command("export-onnx")
@click.option("--ckpt-dir", type=click.Path(path_type=Path), required=True,
              help="Folder of PyTorch checkpoints, one file per epoch.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for epoch_NNNN.onnx (created).")
@_model_options()
@click.option("--epochs", default=None, metavar="SEL",
              help="Epochs to export: 1:1000:10, 5, 1,10,100. Default: every checkpoint.")
@click.option("--score", type=click.Choice(["logit", "softmax"]), default="logit",
              show_default=True, help="Target score: the logit (thesis) or its softmax.")
@click.option("--target", type=click.Choice(["label", "pred"]), default="label",
              show_default=True, help="Target class: the true label or the prediction.")
@click.option("--with-maps", is_flag=True,
              help="Also output the Grad-CAM map at the layer's resolution (heat maps).")
@click.option("--no-graph-cache", is_flag=True,
              help="Export the ONNX graph anew instead of reading it from the graph cache "
                   "($REACTION_CACHE_DIR, else ~/.cache/reaction; REACTION_GRAPH_CACHE=0 "
                   "turns it off too).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no notes.")
@_user_errors
def analyzer_export_onnx(ckpt_dir: Path, out: Path, run: Path | None, model: str | None,
                         layer: str | None, image_size: str | None, channels: int | None,
                         epochs: str | None, score: str, target: str, with_maps: bool,
                         no_graph_cache: bool, quiet: bool) -> None:
    """Export every checkpoint to ONNX with its Grad-CAM gradient graph (docs/ONNX.md).

    Files already exported from the same checkpoint with the same settings are skipped.

    \b
    Examples:
      analyzer export-onnx --ckpt-dir runs/m4/checkpoints --out runs/m4/onnx
      analyzer export-onnx --ckpt-dir other/ckpts --model mypkg.nets:make_cnn \\
          --layer body.7 --image-size 50x200 --channels 1 --out other/onnx
    """
    from analyzer.onnx_export import ExportOptions, export_checkpoints
    from store.datasets import parse_image_size

    _configure_notes(quiet)
    options = ExportOptions(
        ckpt_dir=ckpt_dir, out=out, run=run, model=model, layer=layer,
        image_size=parse_image_size(image_size) if image_size else None, channels=channels,
        epochs=epochs, score=score, target=target, with_maps=with_maps,
        graph_cache=not no_graph_cache)
    summary = export_checkpoints(options, progress=not quiet)
    click.echo(f"exported {len(summary.written)} checkpoints to {summary.out}"
               + (f" ({len(summary.skipped)} already there)" if summary.skipped else ""))


def _follow_options(what: str) -> Callable:
    """The options ``--follow``, ``--every`` and ``--idle`` of `analyzer plot` and `report`."""
    options = [
        click.option("--follow", is_flag=True,
                     help=f"Keep the {what} current while the run is trained and analysed: "
                          "re-render after new results; end when training has finished and "
                          "every Reaction split is analysed, after --idle, or on Ctrl-C."),
        click.option("--every", type=float, default=None, metavar="SECONDS",
                     help="With --follow: re-render at most this often. Default: 30."),
        click.option("--idle", type=float, default=None, metavar="SECONDS",
                     help="With --follow: stop after this long without a change (a trainer "
                          "that died)."),
    ]
    return _stacked(options)


def _check_follow_options(follow: bool, every: float | None, idle: float | None) -> None:
    """Refuse ``--every`` and ``--idle`` without ``--follow``."""
    for name, value in (("--every", every), ("--idle", idle)):
        if value is not None and not follow:
            raise InputError(f"{name} applies to --follow only")


def _until_followed(follow_function: Callable, options: object, every: float | None,
                    idle: float | None) -> object:
    """Run a follow loop until it ends or SIGINT/SIGTERM stops it; None when a second signal
    abandoned the render in progress (the last whole page stays). Either way exit code 0."""
    from analyzer.live import DEFAULT_EVERY, stop_on_signals

    with stop_on_signals() as stop:
        try:
            return follow_function(options, every=DEFAULT_EVERY if every is None else every,
                                   idle=idle, stop=stop)
        except KeyboardInterrupt:
            return None


@analyzer.command("plot")
@click.argument("run_files", nargs=-1, required=True,
                type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for the figures (created).")
@click.option("--smooth", default=10, show_default=True, type=click.IntRange(1),
              help="Moving average over N analysed epochs, centred (1: none).")
@click.option("--format", "image_format", type=click.Choice(["png", "pdf", "svg"]),
              default="png", show_default=True)
@click.option("--epoch", default=None, type=int,
              help="Epoch of the scatter plots. Default: the last analysed on train and test.")
@click.option("--split", default="train", show_default=True,
              help="Split whose Reaction and loss curves are drawn.")
@click.option("--dpi", default=100, show_default=True, type=click.IntRange(30, 600))
@_follow_options("figures")
@_user_errors
def analyzer_plot(run_files: tuple[Path, ...], out: Path, smooth: int, image_format: str,
                  epoch: int | None, split: str, dpi: int, follow: bool, every: float | None,
                  idle: float | None) -> None:
    """The thesis's figures (docs/METHOD.md §3) from run files, models overlaid.

    \b
    Writes, per figure that the files can feed:
      reaction_per_class, loss_per_class, train_accuracy_per_class,
      test_accuracy_per_class (fig. 5.2a-d), scatter_epoch_E (fig. 5.1, 5.3),
      model_reaction (fig. 5.9), threshold_sweep (fig. 5.10, 5.11).
    \b
    Examples:
      analyzer plot runs/demo/run.h5 --out figs/
      analyzer plot runs/m2/run.h5 runs/m4/run.h5 --out figs/ --smooth 25 --format pdf
      analyzer plot runs/m4/run.h5 --out figs/ --follow --every 60
    """
    from analyzer.figures import PlotOptions, write_figures

    _check_follow_options(follow, every, idle)
    options = PlotOptions(runs=run_files, out=out, smooth=smooth, image_format=image_format,
                          epoch=epoch, split=split, dpi=dpi)
    if follow:
        from analyzer.live import follow_plot

        written = _until_followed(follow_plot, options, every, idle) or []
    else:
        written = write_figures(options)
    for path in written:
        click.echo(f"wrote {path}")


def _grid_options() -> Callable:
    """The options of a grid of images x epochs (cam, occlusion): which checkpoints, epochs,
    images and split."""
    options = [
        click.option("--ckpt-dir", type=click.Path(path_type=Path), required=True,
                     help="Folder of checkpoints, one file per epoch."),
        click.option("--epochs", default=None, metavar="SEL",
                     help="Columns: epochs with a checkpoint (1,10,100,1000 or 1:1000:333). "
                          "Default: the first, those nearest 10, 100, 1000..., the last."),
        click.option("--images", default=8, show_default=True, type=click.IntRange(1, 64),
                     help="Rows: the first N images of the split, spread over the classes."),
        click.option("--split", default="train", show_default=True),
        click.option("--data", "data", multiple=True, metavar="SPLIT=FOLDER",
                     help="Images of a split, one sub-folder per class. Default: the run's "
                          "splits."),
    ]
    return _stacked(options)


@analyzer.command("cam")
@_grid_options()
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Image file (.png, .pdf or .svg).")
@_model_options(layer_help="Grad-CAM layer. Default: the stored results' layer, "
                                   "else the model's.")
@click.option("--scale", type=click.Choice(["cell", "shared"]), default="cell",
              show_default=True,
              help="Colour scale: each map to its own maximum, or one for the grid.")
@click.option("--backend", type=click.Choice(["auto", "torch", "onnx"]), default="auto",
              show_default=True,
              help="As for 'analyzer reaction' (auto: the ONNX files where the folder has "
                   "them), so the titles show the values it stores.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--dpi", default=100, show_default=True, type=click.IntRange(30, 600))
@_user_errors
def analyzer_cam(ckpt_dir: Path, epochs: str | None, images: int, out: Path, split: str,
                 run: Path | None, model: str | None, layer: str | None, data: tuple[str, ...],
                 image_size: str | None, channels: int | None, scale: str, backend: str,
                 device: str, dpi: int) -> None:
    """Grad-CAM heat maps over the input images, images x epochs (docs/METHOD.md §3).

    Each cell is titled with the class, the epoch and the image's Reaction (the value
    'analyzer reaction' stores); the map is upsampled bilinearly for display only.

    \b
    Examples:
      analyzer cam --ckpt-dir runs/demo/checkpoints --out figs/cam.png
      analyzer cam --ckpt-dir runs/m4/checkpoints --epochs 1,10,100,1000 --images 8 \\
          --split test --out figs/cam_test.pdf
    """
    from analyzer.cam import CamOptions, cam_figure, compute_cam_grid
    from analyzer.inputs import parse_data_options
    from store.datasets import parse_image_size

    grid = compute_cam_grid(CamOptions(
        ckpt_dir=ckpt_dir, epochs=epochs, images=images, split=split, run=run, model=model,
        layer=layer, data=parse_data_options(data),
        image_size=parse_image_size(image_size) if image_size else None, channels=channels,
        device=device, backend=backend))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        cam_figure(grid, scale).savefig(out, dpi=dpi)
    except (OSError, ValueError) as error:
        raise InputError(f"cannot write {out}: {error}") from None
    click.echo(f"wrote {out}")


@analyzer.command("occlusion")
@_grid_options()
@click.option("--patch", default=None, type=click.IntRange(1),
              help="Side of the square, pixels. Default: a fifth of the shorter image side.")
@click.option("--stride", default=None, type=click.IntRange(1),
              help="Step between positions, pixels. Default: half the patch.")
@click.option("--fill", default="mean", show_default=True, metavar="mean|VALUE",
              help="Pixel value under the square: the split's mean pixel value, or a number.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Image file of the grid (.png, .pdf or .svg). Default: no figure.")
@click.option("--results", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File for the maps (/occlusion/<split>). Default: the run file.")
@_model_options(layer_help="Occlusion uses no layer; only a --model that names no "
                           "Grad-CAM layer needs one here (any module name).")
@click.option("--backend", type=click.Choice(["auto", "torch", "onnx"]), default="auto",
              show_default=True, help="As for 'analyzer reaction' (auto: the ONNX files "
                                      "where the folder has them).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(1),
              help="Occluded copies per forward pass.")
@click.option("--dpi", default=100, show_default=True, type=click.IntRange(30, 600))
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, no notes, no table.")
@_user_errors
def analyzer_occlusion(ckpt_dir: Path, epochs: str | None, images: int, patch: int | None,
                       stride: int | None, fill: str, out: Path | None, results: Path | None,
                       split: str, run: Path | None, model: str | None, layer: str | None,
                       image_size: str | None, channels: int | None, data: tuple[str, ...],
                       backend: str, device: str, batch_size: int, dpi: int,
                       quiet: bool) -> None:
    """Occlusion sensitivity (Zeiler & Fergus) over the epochs, images x epochs.

    A grey square slides over each image; at every position the true class's probability
    and logit are stored in the run file (or --results) under /occlusion/<split>, with
    each image's sensitivity: its unoccluded probability minus the minimum over positions.

    \b
    Examples:
      analyzer occlusion --ckpt-dir runs/demo/checkpoints --patch 3 --stride 1 \\
          --out figs/occlusion.png
      analyzer occlusion --ckpt-dir runs/m4/checkpoints --epochs 1,10,100,1000 --images 8 \\
          --patch 10 --stride 5 --out figs/occlusion.png
    """
    from analyzer.inputs import parse_data_options
    from analyzer.occlusion_figures import occlusion_figure
    from analyzer.occlusion_pass import (
        OcclusionOptions,
        compute_occlusion,
        format_summary,
        parse_fill,
    )
    from analyzer.pass_setup import PassRequest
    from store.datasets import parse_image_size

    _configure_notes(quiet)
    source = PassRequest(
        ckpt_dir=ckpt_dir, run=run, model=model, layer=layer, data=parse_data_options(data),
        image_size=parse_image_size(image_size) if image_size else None, channels=channels,
        splits=[split], device=device, backend=backend)
    result = compute_occlusion(OcclusionOptions(
        source, epochs=epochs, images=images, patch=patch, stride=stride,
        fill=parse_fill(fill), results=results, batch_size=batch_size), progress=not quiet)
    if not quiet:
        click.echo(format_summary(result))
    if out is not None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            occlusion_figure(result.stored, result.class_names).savefig(out, dpi=dpi)
        except (OSError, ValueError) as error:
            raise InputError(f"cannot write {out}: {error}") from None
        click.echo(f"wrote {out}")
    click.echo(f"results: {result.path}:/occlusion/{split}")


@analyzer.command("report")
@click.argument("run_files", nargs=-1, required=True,
                type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for index.html (created).")
@click.option("--ckpt-dir", "ckpt_dirs", multiple=True, type=click.Path(path_type=Path),
              help="Checkpoint folder of each run file, in order (repeatable). "
                   "Default: checkpoints/ beside each run file, when present.")
@click.option("--no-cam", is_flag=True, help="Leave out the Grad-CAM heat maps.")
@click.option("--cam-images", default=8, show_default=True, type=click.IntRange(1, 64))
@click.option("--smooth", default=10, show_default=True, type=click.IntRange(1),
              help="Moving average over N analysed epochs, centred (1: none).")
@click.option("--epoch", default=None, type=int,
              help="Epoch of the scatter plots. Default: the last analysed on train and test.")
@click.option("--split", default="train", show_default=True,
              help="Split whose Reaction and loss curves are drawn.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@_follow_options("page")
@_user_errors
def analyzer_report(run_files: tuple[Path, ...], out: Path, ckpt_dirs: tuple[Path, ...],
                    no_cam: bool, cam_images: int, smooth: int, epoch: int | None, split: str,
                    device: str, follow: bool, every: float | None,
                    idle: float | None) -> None:
    """One self-contained HTML page to share: provenance, figures, picked epochs, heat maps.

    Figures are embedded; the page needs no server and no network (open it from a mail).
    With --follow the page says how current it is and reloads itself until the run is done.

    \b
    Examples:
      analyzer report runs/demo/run.h5 --out report/
      analyzer report runs/*/run.h5 --out report/ --no-cam
      analyzer report runs/m4/run.h5 --out report/ --follow --every 60 --idle 3600
    """
    from analyzer.report import REPORT_FILE, ReportOptions, write_report

    _check_follow_options(follow, every, idle)
    for folder in ckpt_dirs:
        if not folder.is_dir():
            raise InputError(f"checkpoint folder not found: {folder}")
    options = ReportOptions(runs=run_files, out=out, ckpt_dirs=ckpt_dirs, cam=not no_cam,
                            cam_images=cam_images, smooth=smooth, epoch=epoch, split=split,
                            device=device)
    if follow:
        from analyzer.live import follow_report

        path = _until_followed(follow_report, options, every, idle) or out / REPORT_FILE
    else:
        path = write_report(options)
    click.echo(f"report: {path}")


@analyzer.command("extract")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--series", "series", multiple=True, metavar="NAME",
              help="Series to pick from (repeatable or comma-separated): reaction:train, "
                   "reaction:val, loss:val, loss:train, a dataset such as "
                   "training/val_accuracy, or a CSV column. Default: reaction:train and "
                   "loss:val (a CSV: every column).")
@click.option("--threshold", default="0.3", show_default=True, metavar="T|auto",
              help="Threshold T in (0, 1] of the threshold criterion, or 'auto' for the "
                   "criterion without a hand-set threshold (docs/EXTRACT.md).")
@click.option("--window", default=None, metavar="N|auto",
              help="Values in the window: of the standard deviation (threshold criterion, "
                   "default 100) and of the trend test (auto criterion, default 'auto': "
                   "chosen from the run's length and the epochs after the peak).")
@click.option("--sweep", is_flag=True, help="Every T = 0.01, 0.02, …, 1.00 instead of one.")
@click.option("--after-peak", is_flag=True,
              help="Minimum after the series' maximum (the Reaction rule) for every series.")
@click.option("--test-column", "--test-series", "test_series", default=None, metavar="NAME",
              help="Test accuracy per epoch. Default: accuracy:test (from the Reaction pass "
                   "over the test split), or a CSV's test_accuracy column.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@click.option("--no-save", is_flag=True, help="Do not store the rows in the file's /extract.")
@_user_errors
def analyzer_extract(file: Path, series: tuple[str, ...], threshold: str, window: str | None,
                     sweep: bool, after_peak: bool, test_series: str | None, as_json: bool,
                     no_save: bool) -> None:
    """Pick the epoch: threshold, minimum or auto criterion, with the test accuracy there.

    \b
    Examples:
      analyzer extract runs/m4/run.h5 --threshold 0.3
      analyzer extract runs/m4/run.h5 --sweep --json
      analyzer extract runs/m4/run.h5 --threshold auto
      analyzer extract runs/m4/run.h5 --threshold auto --window 100
      analyzer extract curves.csv --series val_loss --threshold 0.3

    A row without an epoch says why in a line under the table ("reason" in --json).
    """
    import json

    from analyzer.extract import format_table
    from analyzer.extract_file import ExtractRequest, extract_file, parse_threshold, parse_window

    request = ExtractRequest(path=file, series=_split_list(",".join(series)) or None,
                             threshold=parse_threshold(threshold), window=parse_window(window),
                             sweep=sweep,
                             after_peak=after_peak, test_series=test_series, save=not no_save)
    result = extract_file(request)
    if as_json:
        click.echo(json.dumps([row.to_json() for row in result.rows], indent=1))
    else:
        click.echo(format_table(result.rows, result.best))
    if result.saved:
        click.echo(f"stored in {file}:/extract", err=True)


@analyzer.command("compare")
@click.argument("run_files", nargs=-1, required=True,
                type=click.Path(dir_okay=False, path_type=Path))
@click.option("--series", "series", multiple=True, metavar="NAME",
              help="Series to pick from (repeatable or comma-separated), as for 'analyzer "
                   "extract'. Default: loss:val and reaction:train.")
@click.option("--criterion", type=click.Choice(["minimum", "threshold"]), default=None,
              help="Default: minimum, or threshold when --threshold is given.")
@click.option("--threshold", default=None, metavar="T|auto",
              help="T in (0, 1] of the threshold criterion (default 0.3), or 'auto' for the "
                   "criterion without a hand-set threshold (docs/EXTRACT.md).")
@click.option("--window", default=None, metavar="N|auto",
              help="As for 'analyzer extract': default 100 for the threshold criterion, "
                   "'auto' for the auto criterion.")
@click.option("--sweep", is_flag=True,
              help="The threshold criterion at every T = 0.01, 0.02, …, 1.00; the table "
                   "counts per run.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --sweep: draw figs. 5.10-5.11 per run, side by side (.png, .pdf, "
                   ".svg).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV instead of a table.")
@_user_errors
def analyzer_compare(run_files: tuple[Path, ...], series: tuple[str, ...],
                     criterion: str | None, threshold: str | None, window: str | None,
                     sweep: bool,
                     out: Path | None, as_json: bool, as_csv: bool) -> None:
    """Compare the epochs picked by Reaction and by the loss across runs (table 5.1).

    One row per run, series and criterion with the test accuracy there, the best of any
    epoch and the shortfall; then how often Reaction's pick beats the loss's.

    \b
    Examples:
      analyzer compare runs/m1/run.h5 runs/m2/run.h5 runs/m4/run.h5
      analyzer compare runs/*/run.h5 --criterion threshold --threshold 0.3 --json
      analyzer compare runs/*/run.h5 --sweep --out figs/compare.png
    """
    from analyzer import compare
    from analyzer.extract_file import AUTO, criterion_windows, parse_threshold, parse_window

    if as_json and as_csv:
        raise InputError("--json and --csv exclude each other")
    if out is not None and not sweep:
        raise InputError("--out draws the threshold sweep: give --sweep too")
    threshold_value = None if threshold is None else parse_threshold(threshold)
    window_value, auto_window = criterion_windows(parse_window(window), threshold_value == AUTO)
    criteria = compare.parse_criteria(criterion, threshold_value, sweep, window_value)
    names = _split_list(",".join(series)) or list(compare.COMPARE_SERIES)
    rows = compare.compare_rows(compare.load_compare_runs(run_files, names), names, criteria,
                                window_value, auto_window)
    pair = compare.reaction_and_baseline(names)
    if as_json or as_csv:
        click.echo(compare.to_json(rows) if as_json else compare.to_csv(rows), nl=as_json)
        for run, note in dict.fromkeys((row.run, row.note) for row in rows if row.note):
            click.echo(f"note: {run}: {note}", err=True)
    else:
        click.echo(compare.format_sweep_table(rows, *pair) if sweep and pair
                   else compare.format_table(rows))
        for summary in compare.summarize(rows, *pair) if pair else []:
            click.echo(summary.text())
        if pair is None:
            click.echo("no summary: it needs a Reaction series and another series", err=True)
    if out is not None:
        compare.write_figure(compare.sweep_figure(rows), out)
        click.echo(f"wrote {out}", err=True)


# --- analyzer features (seed 003) ----------------------------------------------------------


@analyzer.command("features")
@click.option("--ckpt-dir", type=click.Path(path_type=Path), required=True,
              help="Folder of checkpoints, one file per epoch.")
@click.option("--epochs", default=None, metavar="SEL",
              help="Columns: epochs with a checkpoint (1,2,5,10,20,50 or 1:100:10). "
                   "Default: those nearest 1, 2, 5, 10, 20, 50, 100, ... and the last.")
@click.option("--channels", default=None, metavar="SEL",
              help="Rows: channels of the layer, START:STOP (half-open, 0:16) or 0,3,7. "
                   "Default: the first 16.")
@click.option("--split", default="train", show_default=True,
              help="Images searched for the strongest activation.")
@_model_options(layer_help="Layer whose feature maps are shown (qualified module name). "
                           "Default: the Grad-CAM layer.", channels_flag="--input-channels")
@click.option("--data", "data", multiple=True, metavar="SPLIT=FOLDER",
              help="Images of a split, one sub-folder per class. Default: the run's splits.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Draw the grid, channels x epochs, into this image file (.png, .pdf, .svg).")
@click.option("--results", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Store /features in this file (created if missing) instead of the run file.")
@click.option("--projection", type=click.Choice(["deconvnet", "guided"]), default="deconvnet",
              show_default=True,
              help="Into pixel space with Zeiler & Fergus's deconvnet, or guided "
                   "backpropagation.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(1))
@click.option("--json", "as_json", is_flag=True, help="Print JSON rows instead of a table.")
@click.option("-q", "--quiet", is_flag=True, help="No table and no notes.")
@_user_errors
def analyzer_features(ckpt_dir: Path, epochs: str | None, channels: str | None, split: str,
                      run: Path | None, model: str | None, layer: str | None,
                      image_size: str | None, input_channels: int | None,
                      data: tuple[str, ...], out: Path | None, results: Path | None,
                      projection: str, device: str, batch_size: int, as_json: bool,
                      quiet: bool) -> None:
    """Feature evolution during training (seed 003 fig. 4), channels x epochs.

    For each channel of the layer and each epoch: the image of the split with the strongest
    activation, the patch under its receptive field, and the activation projected into pixel
    space with a deconvnet (docs/METHOD.md §5). Stored in /features/<layer> of the run file
    (or --results).

    \b
    Examples:
      analyzer features --ckpt-dir runs/demo/checkpoints --out figs/features.png
      analyzer features --ckpt-dir runs/m4/checkpoints --epochs 1,2,5,10,20,50,100,1000 \\
          --layer features.5 --channels 0:16 --out figs/features.png
    """
    import json

    from analyzer.features import (
        FeatureOptions,
        compute_features,
        feature_rows,
        features_figure,
        format_features,
    )
    from analyzer.inputs import parse_data_options
    from store.datasets import parse_image_size
    from store.feature_results import write_feature_evolution
    from store.result_target import results_target

    _configure_notes(quiet)
    computed = compute_features(FeatureOptions(
        ckpt_dir=ckpt_dir, epochs=epochs, layer=layer, channels=channels, split=split, run=run,
        model=model, data=parse_data_options(data),
        image_size=parse_image_size(image_size) if image_size else None,
        input_channels=input_channels, device=device, batch_size=batch_size,
        method=projection))
    evolution = computed.evolution
    if as_json:
        click.echo(json.dumps(feature_rows(evolution), indent=1))
    elif not quiet:
        click.echo(format_features(evolution))
    target = results_target(computed.run_file, results, computed.class_names)
    if target is None:
        click.echo("note: not stored (no run file beside the checkpoints): give --results "
                   "FILE.h5 to keep /features", err=True)
    else:
        write_feature_evolution(target, evolution)
        click.echo(f"stored in {target}:/features/{evolution.layer}", err=True)
    if out is not None:
        _save_figure(features_figure(evolution, computed.class_names), out)


# --- analyzer filters (seed 004) -----------------------------------------------------------


@analyzer.command("filters")
@click.argument("checkpoints", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--ckpt-dir", type=click.Path(path_type=Path), default=None,
              help="Folder of checkpoints: every epoch's filters against those of --against.")
@click.option("--against", type=int, default=None, metavar="EPOCH",
              help="With --ckpt-dir: the epoch whose filters every epoch is compared with.")
@click.option("--epochs", default=None, metavar="SEL",
              help="With --ckpt-dir: epochs to compare (1:1000:10, 1,10,100). Default: all.")
@_model_options(layer_help="Conv layer whose filters are compared (qualified module name). "
                           "Default: the first conv layer.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Draw the heat maps into this image file (.png, .pdf or .svg).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON rows instead of a table.")
@click.option("--results", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --ckpt-dir: store /filters in this file (created if missing) instead "
                   "of the run file.")
@_user_errors
def analyzer_filters(checkpoints: tuple[Path, ...], ckpt_dir: Path | None, against: int | None,
                     epochs: str | None, run: Path | None, model: str | None,
                     layer: str | None, image_size: str | None, channels: int | None,
                     out: Path | None, as_json: bool, results: Path | None) -> None:
    """Filter dissimilarity (seed 004 eq. 1): S_i = min_j ||F_i - G_j||_2, both ways.

    Two checkpoints A B: A's filters against B's and B's against A's. --ckpt-dir with
    --against EPOCH: every epoch's filters against that epoch's, stored in /filters/<layer>
    of the run file (or --results).

    \b
    Examples:
      analyzer filters runs/a/checkpoints/epoch_1000.safetensors \\
          runs/b/checkpoints/epoch_1000.safetensors --json
      analyzer filters --ckpt-dir runs/m4/checkpoints --against 1000 --out figs/filters.png
    """
    from analyzer import filter_analysis
    from analyzer.filter_weights import NetworkOptions
    from store.datasets import parse_image_size

    network = NetworkOptions(run=run, model=model, channels=channels,
                             image_size=parse_image_size(image_size) if image_size else None)
    if ckpt_dir is None:
        if len(checkpoints) != 2 or against is not None or epochs or results:
            raise InputError("give two checkpoint files A B, or --ckpt-dir DIR --against EPOCH "
                             "(--epochs and --results apply to --ckpt-dir only)")
        comparison = filter_analysis.compare_pair(*checkpoints, layer=layer, network=network)
        figure = filter_analysis.pair_figure(comparison) if out else None
        click.echo(filter_analysis.to_json(filter_analysis.pair_rows(comparison)) if as_json
                   else filter_analysis.format_pair(comparison))
    else:
        if checkpoints or against is None:
            raise InputError("--ckpt-dir compares every epoch with one: give --against EPOCH "
                             "and no checkpoint files")
        evolution = filter_analysis.filter_evolution(ckpt_dir, against, epochs, layer, network)
        figure = filter_analysis.evolution_figure(evolution) if out else None
        click.echo(filter_analysis.to_json(filter_analysis.evolution_rows(evolution)) if as_json
                   else filter_analysis.format_evolution(evolution))
        _store_filters(evolution, ckpt_dir, run, results)
    if figure is not None:
        _save_figure(figure, out)


def _store_filters(evolution: FilterEvolution, ckpt_dir: Path, run: Path | None,
                   results: Path | None) -> None:
    from analyzer.inputs import find_run_file
    from store.filter_results import write_filter_evolution
    from store.result_target import results_target
    from store.runfile import read_run_info

    run_file = find_run_file(ckpt_dir, run)
    classes = read_run_info(run_file).class_names if run_file is not None else []
    target = results_target(run_file, results, classes)
    if target is None:
        click.echo("note: not stored (no run file beside the checkpoints): give --results "
                   "FILE.h5 to keep /filters", err=True)
        return
    write_filter_evolution(target, evolution)
    click.echo(f"stored in {target}:/filters/{evolution.layer}", err=True)


def _save_figure(figure, out: Path) -> None:
    """Write a figure; a path that cannot take it is one line."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out, dpi=100)
    except (OSError, ValueError) as error:
        raise InputError(f"cannot write {out}: {error}") from None
    click.echo(f"wrote {out}", err=True)


@analyzer.command("info")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@_user_errors
def analyzer_info(file: Path, as_json: bool) -> None:
    """What a run or results file holds: model, splits, epochs trained and analysed, picks.

    \b
    Examples:
      analyzer info runs/demo/run.h5
      analyzer info runs/demo/run.h5 --json
    """
    import json

    from store.inventory import describe_file, format_summary

    summary = describe_file(file)
    click.echo(json.dumps(summary, indent=1) if as_json else format_summary(summary))


def _console_script(group: click.Group) -> Callable[[], None]:
    """The console-script entry point of ``group``: the command, then an exit that skips the
    interpreter's teardown of every loaded module (0.5-0.8 s once torch is imported, a
    seventh of a whole ``analyzer reaction`` on issue 14's workload; docs/BENCHMARKS.md "The
    exit"). The exit handlers run, the output is flushed and the command's status kept; while
    another thread still runs or an HDF5 file is still open, the interpreter exits as usual,
    joining and closing them."""

    def main() -> None:
        try:
            group.main()
        except SystemExit as finished:
            code = finished.code
            if not isinstance(code, int | None) or _still_busy():
                raise
        atexit._run_exitfuncs()  # what the interpreter's exit would run first (incl. logging)
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except OSError:  # a closed pipe: let the usual exit report it
            raise SystemExit(code) from None
        os._exit(code or 0)

    return main


def _still_busy() -> bool:
    """Whether a thread other than this one (and daemons) still runs, or HDF5 has a file
    open: then only the interpreter's own exit joins and closes them."""
    others = [thread for thread in threading.enumerate()
              if thread is not threading.current_thread() and not thread.daemon]
    h5py = sys.modules.get("h5py")
    open_files = h5py.h5f.get_obj_count(h5py.h5f.OBJ_ALL, h5py.h5f.OBJ_FILE) if h5py else 0
    return bool(others) or open_files > 0


trainer_main = _console_script(trainer)
analyzer_main = _console_script(analyzer)

if __name__ == "__main__":
    trainer_main()
