"""Write a harder generated image set than the digits: noisy shapes, as class folders of PNGs.

Eight classes (disc, ring, square, frame, cross, x, triangle, bars) drawn at a random size and
position on a small grey canvas, with a random contrast, a random background gradient and
strong Gaussian pixel noise; a share of the training labels is flipped to a random other
class (the test labels are clean). The digits are learned in a few epochs; this set is not,
and its label noise makes a network overfit late, which is what the epoch criteria of
``analyzer extract`` are about (docs/EXTRACT.md).

    python scripts/make_shapes.py /tmp/data/shapes --train 1600 --test 400

writes ``/tmp/data/shapes/train/<class>/<n>.png`` and ``/tmp/data/shapes/test/<class>/<n>.png``
for ``trainer run --data /tmp/data/shapes/train --test /tmp/data/shapes/test``. The same
arguments give the same files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("bars", "cross", "disc", "frame", "ring", "square", "triangle", "x")


def shape_mask(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A float mask [size, size] in [0, 1] of one shape at a random radius and centre."""
    radius = rng.uniform(0.22, 0.42) * size
    cy, cx = rng.uniform(radius, size - radius, 2) if radius < size / 2 else (size / 2,) * 2
    y, x = np.mgrid[0:size, 0:size] + 0.5
    dy, dx = (y - cy) / radius, (x - cx) / radius
    box = np.maximum(abs(dy), abs(dx))
    thick = 0.35
    masks = {
        "disc": np.hypot(dy, dx) <= 1,
        "ring": abs(np.hypot(dy, dx) - 0.8) <= thick / 1.4,
        "square": box <= 0.85,
        "frame": abs(box - 0.75) <= thick / 1.4,
        "cross": (box <= 1) & ((abs(dy) <= thick) | (abs(dx) <= thick)),
        "x": (box <= 1) & ((abs(dy - dx) <= thick * 1.3) | (abs(dy + dx) <= thick * 1.3)),
        "triangle": (dy <= 0.8) & (dy >= -0.9 + 1.7 * abs(dx)),
        "bars": (box <= 1) & (np.cos(dy * np.pi * 1.6) > 0.2),
    }
    return masks[name].astype(np.float32)


def draw(name: str, size: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    """One uint8 image [size, size]: the shape at a random contrast on a gradient, plus noise."""
    y, x = np.mgrid[0:size, 0:size] / size
    background = rng.uniform(0.2, 0.5) + rng.uniform(-0.2, 0.2) * (x - 0.5) \
        + rng.uniform(-0.2, 0.2) * (y - 0.5)
    contrast = rng.choice([-1, 1]) * rng.uniform(0.25, 0.5)
    image = background + contrast * shape_mask(name, size, rng) \
        + rng.normal(0, noise, (size, size))
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


def write_split(root: Path, count: int, size: int, noise: float, label_noise: float,
                rng: np.random.Generator) -> None:
    """``count`` images, classes in turn; a share ``label_noise`` filed under a wrong class."""
    for n in range(count):
        true = n % len(CLASSES)
        label = true
        if rng.uniform() < label_noise:
            label = (true + rng.integers(1, len(CLASSES))) % len(CLASSES)
        folder = root / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(draw(CLASSES[true], size, noise, rng)).save(folder / f"{n:05d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=1600, help="training pool images")
    parser.add_argument("--test", type=int, default=400, help="test images")
    parser.add_argument("--size", type=int, default=12, help="image side in pixels")
    parser.add_argument("--noise", type=float, default=0.12, help="pixel noise (std)")
    parser.add_argument("--label-noise", type=float, default=0.15,
                        help="share of training labels flipped")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    write_split(args.out / "train", args.train, args.size, args.noise, args.label_noise, rng)
    write_split(args.out / "test", args.test, args.size, args.noise, 0.0, rng)
    print(f"{args.out}: {args.train} training ({args.label_noise:.0%} labels flipped) and "
          f"{args.test} test images, {len(CLASSES)} classes, {args.size}x{args.size}")


if __name__ == "__main__":
    main()
