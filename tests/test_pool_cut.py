"""The gradient taken after the max pool that alone follows the layer (analyzer/pool_cut.py).

Checked against the float64 per-image loop of tests/test_torch_backend.py, which takes the
gradient at the layer itself; the identity it rests on (a max pool's backward keeps the sum
of the gradient) against autograd in float64, ties and overlapping windows included.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import onnx
import pytest
import torch
from torch import Tensor, nn

from analyzer.onnx_backend import cpu_session
from analyzer.onnx_export import ExportSettings, ReactionGraphExporter
from analyzer.torch_backend import TorchBackend
from store.onnx_files import CAM, EMPTY, IMAGES, REACTION, TARGETS
from store.spec import ReactionSpec
from tests.test_torch_backend import (
    MAX_EXCLUDED_SHARE,
    assert_matches_reference,
    make_checkpoint,
    random_batch,
    reference_grad_cam,
)
from trainer.models import ModelSpec, build_model, gradcam_layer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

INPUT = (3, 9, 9)  # odd sizes: floor mode drops a row and a column, ceil mode pads them
CLASSES = 5


class PooledNet(nn.Module):
    """conv → ReLU (the layer, ``act``) → ``pool`` → ``after`` → linear; ``skip`` adds a
    second path from the layer's output to the logits; ``functional`` pools with
    ``F.max_pool2d`` instead of the module; ``pool_twice`` calls the pool module again."""

    def __init__(self, pool: Callable[[], nn.Module] = lambda: nn.MaxPool2d(2),
                 after: Callable[[], nn.Module] = nn.Identity, skip: bool = False,
                 functional: bool = False, pool_twice: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = pool()
        self.after = after()
        self.skip, self.functional, self.pool_twice = skip, functional, pool_twice
        with torch.no_grad():
            size = self._pooled(torch.zeros(1, 6, *INPUT[1:])).numel()
        self.head = nn.Linear(size, CLASSES)
        self.side = nn.Linear(6, CLASSES)

    def _pooled(self, x: Tensor) -> Tensor:
        if self.functional:
            return nn.functional.max_pool2d(x, 2)
        pooled = self.pool(x)
        return self.pool(pooled) if self.pool_twice else pooled

    def forward(self, x: Tensor) -> Tensor:
        a = self.act(self.conv(x))
        logits = self.head(self.after(self._pooled(a)).flatten(1))
        return logits + self.side(a.mean(dim=(2, 3))) if self.skip else logits


class OwnPool(nn.MaxPool2d):
    """A subclass: its forward could be anything."""


CUT = {
    "2x2": lambda: PooledNet(),
    "3x3-stride-2-padding-1": lambda: PooledNet(lambda: nn.MaxPool2d(3, 2, padding=1)),
    "2x2-ceil-mode": lambda: PooledNet(lambda: nn.MaxPool2d(2, ceil_mode=True)),
    "3x3-stride-1-dilation-2": lambda: PooledNet(lambda: nn.MaxPool2d(3, 1, dilation=2)),
    "in-place-relu-after-the-pool": lambda: PooledNet(after=lambda: nn.ReLU(inplace=True)),
}
NOT_CUT = {
    "layer-output-also-feeds-a-skip": lambda: PooledNet(skip=True),
    "functional-pool": lambda: PooledNet(functional=True),
    "pool-called-twice": lambda: PooledNet(lambda: nn.MaxPool2d(2, 1), pool_twice=True),
    "average-pool": lambda: PooledNet(lambda: nn.AvgPool2d(2)),
    "max-pool-subclass": lambda: PooledNet(lambda: OwnPool(2)),
}


def checked(build: Callable[[], nn.Module], input_shape: tuple[int, ...], classes: int,
            layer: str = "act", seed: int = 5, **options: bool) -> TorchBackend:
    """A backend with ``options`` (where the gradient may be taken), checked against the
    float64 per-image loop on a trained checkpoint (first batch: the decisions; second:
    computed as decided)."""
    backend = TorchBackend(build(), ReactionSpec(layer), **options)
    backend.load_weights(make_checkpoint(build, input_shape, classes, seed))
    for batch_seed in (seed, seed + 100):
        images, labels = random_batch(200, input_shape, classes, batch_seed)
        result = backend.compute(images, labels, keep_maps=True)
        reference = reference_grad_cam(backend.model, layer, images, labels)
        agreement = assert_matches_reference(result.cam, result.reaction, result.empty,
                                             reference)
        assert agreement.excluded + agreement.floored <= MAX_EXCLUDED_SHARE * len(images)
    return backend


def _checked(build: Callable[[], nn.Module], layer: str = "act") -> TorchBackend:
    """:func:`checked` with the gradient allowed after the pool."""
    return checked(build, INPUT, CLASSES, layer, cut_after_pool=True)


@pytest.mark.parametrize("name", list(CUT))
def test_the_gradient_after_a_sole_max_pool_gives_the_float64_loops_reaction(name: str) -> None:
    assert _checked(CUT[name]).gradient_pool == "pool"


@pytest.mark.parametrize("name", list(NOT_CUT))
def test_a_layer_without_a_sole_max_pool_keeps_its_own_gradient(name: str) -> None:
    assert _checked(NOT_CUT[name]).gradient_pool is None


def test_a_hooked_pool_is_not_cut_after() -> None:
    def build() -> nn.Module:
        model = PooledNet()
        model.pool.register_forward_hook(lambda _module, _inputs, output: output * 2)
        return model

    assert _checked(build).gradient_pool is None


def test_a_layer_whose_consumer_is_not_the_pool_is_not_cut() -> None:
    assert _checked(PooledNet, layer="conv").gradient_pool is None  # conv → ReLU → pool


def test_without_the_option_the_gradient_is_taken_at_the_layer() -> None:
    backend = TorchBackend(PooledNet(), ReactionSpec("act"))
    backend.compute(*random_batch(4, INPUT, CLASSES, 1))
    assert backend.gradient_pool is None


def test_a_first_batch_that_does_not_agree_keeps_the_gradient_at_the_layer(
        caplog: pytest.LogCaptureFixture) -> None:
    # A diverged checkpoint: NaN logits compare unequal both ways, so nothing is changed.
    backend = TorchBackend(PooledNet(), ReactionSpec("act"), cut_after_pool=True)
    with torch.no_grad():
        backend.model.head.bias.fill_(float("nan"))
    with caplog.at_level(logging.WARNING, logger="analyzer"):
        backend.compute(*random_batch(4, INPUT, CLASSES, 2))
    assert backend.gradient_pool is None
    assert "not after the max pool 'pool'" in caplog.text


@pytest.mark.parametrize("pool", [nn.MaxPool2d(2), nn.MaxPool2d(3, 2, padding=1),
                                  nn.MaxPool2d(2, ceil_mode=True)], ids=str)
def test_a_max_pools_backward_keeps_the_sum_of_the_gradient_with_ties(pool: nn.Module) -> None:
    # Half the entries are 0, as after a ReLU: many windows tie, yet each pooled entry's
    # gradient still goes to one input entry only.
    generator = torch.Generator().manual_seed(3)
    a = torch.rand(4, 3, 9, 9, generator=generator, dtype=torch.float64)
    a = torch.where(a > 0.5, a, torch.zeros_like(a)).requires_grad_(True)
    pooled = pool(a)
    upstream = torch.randn(pooled.shape, generator=generator, dtype=torch.float64)
    (at_layer,) = torch.autograd.grad((pooled * upstream).sum(), a)
    assert torch.allclose(at_layer.sum(dim=(2, 3)), upstream.sum(dim=(2, 3)), rtol=1e-12)
    windows = nn.functional.unfold(a.detach().flatten(0, 1)[:, None], 2, stride=2)
    assert ((windows == 0).all(dim=1)).any(), "the case needs all-zero windows"


@pytest.mark.parametrize("name", ["small", "model2"])
def test_the_zoo_models_are_cut_after_their_pool_with_folding_and_channels_last(
        name: str) -> None:
    size = (8, 8) if name == "small" else (50, 200)
    spec = ModelSpec(name, 1, size, 10)
    backend = TorchBackend(build_model(spec), ReactionSpec(gradcam_layer(name)),
                           channels_last=True, fuse_layers=True, cut_after_pool=True)
    backend.load_weights(make_checkpoint(lambda: build_model(spec), (1, *size), 10, 7))
    images, labels = random_batch(64 if name == "small" else 16, (1, *size), 10, 7)
    result = backend.compute(images, labels, keep_maps=True)
    assert backend.gradient_pool is not None and backend.relu_fused
    reference = reference_grad_cam(backend.model, gradcam_layer(name), images, labels)
    assert_matches_reference(result.cam, result.reaction, result.empty, reference)


@pytest.mark.parametrize(("build", "cut"), [(PooledNet, True),
                                            (lambda: PooledNet(skip=True), False)],
                         ids=["sole-pool", "skip"])
def test_the_exported_graph_has_no_pool_indices_when_cut_and_matches_the_loop(
        build: Callable[[], nn.Module], cut: bool) -> None:
    model = build()
    model.load_state_dict(make_checkpoint(build, INPUT, CLASSES, 9))
    exporter = ReactionGraphExporter(model, ExportSettings(ReactionSpec("act"), with_maps=True),
                                     channels=INPUT[0], image_size=INPUT[1:], graph_cache=False)
    payload = exporter.model_bytes()
    nodes = onnx.load_model_from_string(payload).graph.node
    with_indices = [node for node in nodes if node.op_type == "MaxPool" and len(node.output) > 1]
    assert exporter.backend.gradient_pool == ("pool" if cut else None)
    assert bool(with_indices) != cut
    images, labels = random_batch(100, INPUT, CLASSES, 9)
    outputs = cpu_session(payload).run([CAM, REACTION, EMPTY], {IMAGES: images.numpy(),
                                                                TARGETS: labels.numpy()})
    cam, reaction, empty = (torch.from_numpy(output) for output in outputs)
    reference = reference_grad_cam(model, "act", images, labels)
    agreement = assert_matches_reference(cam, reaction, empty, reference)
    assert agreement.excluded + agreement.floored <= MAX_EXCLUDED_SHARE * len(images)
