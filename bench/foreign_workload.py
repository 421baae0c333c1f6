"""Issue 14's workload: a foreign copy of thesis Model II (50x200, 1 channel, 13 classes) given
as ``--model mypkg:model2``, 6 checkpoints (plain safetensors state dicts) and 384 PNG images in
13 class folders, written into one folder; shared by ``fixed_cost.py`` and ``cli_vs_captum.py``.

    python bench/foreign_workload.py DIR      # writes DIR/mypkg.py, DIR/ckpts, DIR/data/train
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

CHECKPOINTS = 6
IMAGES = 384
CLASSES = 13
IMAGE_SIZE = (50, 200)
LAYER = "features.12"  # the ReLU after the last convolution

# Written as the user's own module: it imports nothing of this project.
MODEL_SOURCE = '''"""A copy of thesis Model II outside the zoo (bench/foreign_workload.py)."""
from torch import nn


def _block(cin, cout):
    return [nn.Conv2d(cin, cout, 3), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2),
            nn.Dropout(0.5)]


class Model2(nn.Module):
    def __init__(self, in_channels=1, num_classes=13, image_size=(50, 200)):
        super().__init__()
        self.features = nn.Sequential(*_block(in_channels, 32), *_block(32, 64),
                                      *_block(64, 128))
        height, width = image_size
        for _ in range(3):
            height, width = (height - 2) // 2, (width - 2) // 2
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(128 * height * width, 512),
                                        nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                                        nn.Linear(512, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def model2(in_channels=1, num_classes=13, image_size=(50, 200)):
    return Model2(in_channels, num_classes, image_size)
'''


def make_workload(root: Path) -> Path:
    """Write the model module, checkpoints and images into ``root`` (kept when complete)."""
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    root = Path(root)
    done = root / ".complete"
    if done.is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    (root / "mypkg.py").write_text(MODEL_SOURCE)
    network = load_model_module(root).model2().eval()
    torch.manual_seed(0)
    (root / "ckpts").mkdir(exist_ok=True)
    for epoch in range(1, CHECKPOINTS + 1):  # a random walk of the weights, BN statistics
        with torch.no_grad():
            for parameter in network.parameters():
                parameter.add_(0.01 * torch.randn_like(parameter))
            for module in network.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.running_mean.normal_(0, 0.1)
                    module.running_var.uniform_(0.5, 1.5)
        save_file({k: v.contiguous() for k, v in network.state_dict().items()},
                  str(root / "ckpts" / f"epoch_{epoch:04d}.safetensors"))
    rng = np.random.default_rng(0)
    for index in range(IMAGES):
        folder = root / "data" / "train" / f"class{index % CLASSES:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, IMAGE_SIZE, dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{index:04d}.png")
    done.write_text("")
    return root


def load_model_module(root: Path):
    """The workload's ``mypkg`` module, imported from ``root``."""
    spec = importlib.util.spec_from_file_location("mypkg", Path(root) / "mypkg.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reaction_command(root: Path, backend: str, out: Path, epochs: str | None = None,
                     ckpt_dir: Path | None = None) -> list[str]:
    """``analyzer reaction`` on the workload (``ckpt_dir``: an exported .onnx folder)."""
    command = ["reaction", "--ckpt-dir", str(ckpt_dir or Path(root) / "ckpts"),
               "--data", f"train={Path(root) / 'data' / 'train'}", "--out", str(out), "-q"]
    if ckpt_dir is None:
        command += ["--model", "mypkg:model2", "--layer", LAYER,
                    "--image-size", f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}", "--backend", backend]
    if epochs is not None:
        command += ["--epochs", epochs]
    return command


def export_command(root: Path, out: Path) -> list[str]:
    """``analyzer export-onnx`` of the workload's checkpoints into ``out``."""
    return ["export-onnx", "--ckpt-dir", str(Path(root) / "ckpts"), "--model", "mypkg:model2",
            "--layer", LAYER, "--image-size", f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}",
            "--out", str(out), "-q"]


def environment(root: Path, code: Path | None, threads: int) -> dict[str, str]:
    """The subprocesses' environment: ``mypkg`` importable, ``code`` (another checkout of
    this project, e.g. main's) first on the path, ``threads`` threads."""
    paths = ([str(code)] if code is not None else []) + [str(root)]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths),
            "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def analyzer_argv(arguments: list[str]) -> list[str]:
    """A python command line that runs ``analyzer ARGUMENTS`` as its console script does
    (``cli.analyzer_main``; plain ``cli.analyzer`` in a checkout from before it), from whatever
    ``cli`` is first on the path (the console script would always run the installed one)."""
    return [sys.executable, "-c", "import sys, cli; sys.argv = ['analyzer', *sys.argv[1:]]; "
            "getattr(cli, 'analyzer_main', cli.analyzer)()", *arguments]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    print(make_workload(parser.parse_args().folder))


if __name__ == "__main__":
    main()
