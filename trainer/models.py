"""The model zoo: the thesis's six CNNs (METHOD.md §3), seed 001's MNIST network and a small net.

Every zoo model is a :class:`ConvNet` with two parts, ``features`` (convolutions and pools) and
``classifier`` (flatten and dense layers). The Grad-CAM target layer is the activation after the
last convolution, inside ``features`` and just before the last pool; :func:`gradcam_layer` names
it. Flatten sizes follow from the image size by shape arithmetic, so a too-small image is
refused before any layer is built.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from torch import Tensor, nn

from store.errors import InputError

_THESIS_DENSE = (512, 512)


@dataclass(frozen=True)
class _Architecture:
    """One zoo entry: conv filters per stage (each stage ends with a 2×2 pool) and dense widths.

    ``batch_norm`` puts BatchNorm2d between every conv and its ReLU; ``pool_dropout`` puts
    Dropout(0.5) after every pool; ``dense_dropout`` puts it before every dense layer instead.
    """

    title: str
    stages: tuple[tuple[int, ...], ...]
    dense: tuple[int, ...]
    default_size: tuple[int, int]
    batch_norm: bool = True
    pool_dropout: bool = True
    dense_dropout: bool = False


def _thesis(title: str, *stages: tuple[int, ...]) -> _Architecture:
    return _Architecture(title, stages, _THESIS_DENSE, (50, 200))


_ZOO: dict[str, _Architecture] = {
    # Sized so that 1000 epochs on the embedded 8×8 digits run in minutes on two CPU cores.
    "small": _Architecture("small net for the embedded 8x8 digits", ((16, 32),), (64,), (8, 8)),
    "mnist": _Architecture("MNIST network (seed 001; no batch norm, dropout before each dense)",
                           ((32, 64),), (128,), (28, 28),
                           batch_norm=False, pool_dropout=False, dense_dropout=True),
    "model1": _thesis("Model I (thesis)", (16,), (32,), (64,)),
    "model2": _thesis("Model II (thesis)", (32,), (64,), (128,)),
    "model3": _thesis("Model III (thesis)", (16, 16), (32, 32), (64, 64)),
    "model4": _thesis("Model IV (thesis)", (32, 32), (64, 64), (128, 128)),
    # RECONSTRUCTION: the thesis says Model V has 8 conv layers but its figure is lost from the
    # text; these filters follow METHOD.md §3's suggestion (flatten 128×2×20 = 5120 at 1×50×200).
    "model5": _thesis("Model V (reconstruction, the thesis figure is lost)",
                      (16, 16, 32), (32, 64, 64), (128, 128)),
    # The thesis prints flatten 4894 for Model VI; 256×1×19 = 4864 is right.
    "model6": _thesis("Model VI (thesis)", (8, 16, 16, 32, 32), (64, 64, 96, 96), (128, 256)),
}


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a zoo model: its name, input shape and class count."""

    name: str
    in_channels: int
    image_size: tuple[int, int]
    num_classes: int

    def __post_init__(self) -> None:
        size = tuple(self.image_size)
        if len(size) != 2 or not all(_is_positive_int(side) for side in size):
            raise InputError(f"image size must be two positive integers (H, W), got {size}")
        if not _is_positive_int(self.in_channels):
            raise InputError(f"in_channels must be a positive integer, got {self.in_channels!r}")
        if not _is_positive_int(self.num_classes):
            raise InputError(f"num_classes must be a positive integer, got {self.num_classes!r}")
        object.__setattr__(self, "image_size", size)

    def to_json(self) -> str:
        """Compact JSON, as stored in checkpoints and run files."""
        return json.dumps({"name": self.name, "in_channels": self.in_channels,
                           "image_size": list(self.image_size),
                           "num_classes": self.num_classes}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        """Parse :meth:`to_json` output; InputError when it is malformed or incomplete."""
        try:
            fields = json.loads(text)
        except (json.JSONDecodeError, TypeError) as error:
            raise InputError(f"model spec is not valid JSON: {error}") from None
        if not isinstance(fields, dict):
            raise InputError("model spec must be a JSON object")
        missing = [key for key in ("name", "in_channels", "image_size", "num_classes")
                   if key not in fields]
        if missing:
            raise InputError(f"model spec lacks {', '.join(missing)}")
        if not isinstance(fields["name"], str) or not isinstance(fields["image_size"], list):
            raise InputError("model spec needs a string name and an [H, W] image_size")
        return cls(fields["name"], fields["in_channels"], tuple(fields["image_size"]),
                   fields["num_classes"])


class ConvNet(nn.Module):
    """A zoo CNN: ``classifier(features(x))``; the Grad-CAM layer lives in ``features``."""

    def __init__(self, features: nn.Sequential, classifier: nn.Sequential) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, images: Tensor) -> Tensor:
        """Class logits (pre-softmax) for a batch of images [B, C, H, W]."""
        return self.classifier(self.features(images))


def model_names() -> list[str]:
    """The zoo's model names, in zoo order."""
    return list(_ZOO)


def default_image_size(name: str) -> tuple[int, int]:
    """The (H, W) input a model was designed for."""
    return _architecture(name).default_size


def describe(name: str) -> str:
    """One line: where the model comes from, its conv stages (``|`` = pool) and dense widths."""
    arch = _architecture(name)
    convs = " ".join(" ".join(map(str, stage)) + " |" for stage in arch.stages)
    return f"{arch.title}: conv {convs}, fc {' '.join(map(str, arch.dense))}"


def build_model(spec: ModelSpec) -> ConvNet:
    """Build the zoo model ``spec.name`` for ``spec``'s input shape and class count."""
    arch = _architecture(spec.name)
    height, width = _feature_map_size(arch, spec.image_size)
    if height < 1 or width < 1:
        min_height, min_width = _minimum_size(arch)
        raise InputError(f"image size {spec.image_size[0]}x{spec.image_size[1]} is too small "
                         f"for {spec.name}: needs at least {min_height}x{min_width}")
    flat = arch.stages[-1][-1] * height * width
    return ConvNet(_features(arch, spec.in_channels), _classifier(arch, flat, spec.num_classes))


def gradcam_layer(name: str) -> str:
    """Qualified module name of the Grad-CAM target: the ReLU after the last conv."""
    features = _features(_architecture(name), in_channels=1)
    last_relu = max(index for index, layer in enumerate(features) if isinstance(layer, nn.ReLU))
    return f"features.{last_relu}"


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (weights and biases, batch-norm affine included)."""
    return sum(parameter.numel() for parameter in model.parameters())


def _architecture(name: str) -> _Architecture:
    if name not in _ZOO:
        raise InputError(f"unknown model {name!r}: choose one of {', '.join(_ZOO)}")
    return _ZOO[name]


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _feature_map_size(arch: _Architecture, size: tuple[int, int]) -> tuple[int, int]:
    """(H, W) after the last pool; a side < 1 means the input collapsed somewhere on the way."""
    return _side_after(arch, size[0]), _side_after(arch, size[1])


def _side_after(arch: _Architecture, side: int) -> int:
    for stage in arch.stages:
        side -= 2 * len(stage)  # each 3×3 conv without padding loses one pixel per border
        if side < 2:
            return 0  # 2×2 pooling needs at least two pixels
        side //= 2
    return side


def _minimum_size(arch: _Architecture) -> tuple[int, int]:
    """Smallest square input that leaves a 1×1 map after the last pool."""
    side = 1
    for stage in reversed(arch.stages):
        side = 2 * side + 2 * len(stage)
    return side, side


def _features(arch: _Architecture, in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = in_channels
    for stage in arch.stages:
        for filters in stage:
            layers.append(nn.Conv2d(channels, filters, kernel_size=3))
            if arch.batch_norm:
                layers.append(nn.BatchNorm2d(filters))
            layers.append(nn.ReLU())
            channels = filters
        layers.append(nn.MaxPool2d(2))
        if arch.pool_dropout:
            layers.append(nn.Dropout(0.5))
    return nn.Sequential(*layers)


def _classifier(arch: _Architecture, flat: int, num_classes: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    width = flat
    for units in arch.dense:
        if arch.dense_dropout:
            layers.append(nn.Dropout(0.5))
        layers += [nn.Linear(width, units), nn.ReLU()]
        width = units
    if arch.dense_dropout:
        layers.append(nn.Dropout(0.5))
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
