"""The gradient taken at the output of the dense layer that alone takes the map, flattened
(analyzer/dense_cut.py).

Checked against the float64 per-image loop of tests/test_torch_backend.py, which takes the
gradient at the layer itself; the identity it rests on against autograd in float64.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import onnx
import pytest
import torch
from torch import Tensor, nn

from analyzer.gradcam import channel_weights_from_dense
from analyzer.onnx_backend import cpu_session
from analyzer.onnx_export import ExportSettings, ReactionGraphExporter
from analyzer.torch_backend import TorchBackend
from store.onnx_files import CAM, EMPTY, IMAGES, REACTION, TARGETS
from store.spec import ReactionSpec
from tests.test_pool_cut import checked
from tests.test_torch_backend import (
    MAX_EXCLUDED_SHARE,
    assert_matches_reference,
    make_checkpoint,
    random_batch,
    reference_grad_cam,
)
from trainer.models import ModelSpec, build_model, gradcam_layer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

INPUT = (3, 9, 10)
CLASSES = 5
CHANNELS = 6


def _flatten(x: Tensor) -> Tensor:
    return x.flatten(1)


class DenseNet(nn.Module):
    """conv → ReLU (the layer, ``act``) → ``pool`` → ``flatten`` → ``head`` (dense) → ReLU →
    ``out`` (dense); ``before_head`` runs between the flatten and the head; ``twice`` calls
    the head a second time; ``side`` adds a second dense layer on the flattened map."""

    def __init__(self, pool: Callable[[], nn.Module] = lambda: nn.MaxPool2d(2),
                 flatten: Callable[[Tensor], Tensor] = _flatten,
                 before_head: Callable[[Tensor], Tensor] = lambda x: x,
                 head: Callable[[int], nn.Module] = lambda size: nn.Linear(size, 16),
                 after_head: Callable[[], nn.Module] = nn.ReLU,
                 side: bool = False, twice: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, CHANNELS, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = pool()
        self.flatten, self.before_head = flatten, before_head
        with torch.no_grad():
            size = self._flat(torch.zeros(1, *INPUT)).shape[1]
        self.head = head(size)
        self.after_head = after_head()
        self.out = nn.Linear(16, CLASSES)
        self.side = nn.Linear(size, CLASSES) if side else None
        self.twice = twice

    def _flat(self, x: Tensor) -> Tensor:
        return self.before_head(self.flatten(self.pool(self.act(self.conv(x)))))

    def forward(self, x: Tensor) -> Tensor:
        flat = self._flat(x)
        hidden = self.head(flat)
        if self.twice:
            hidden = hidden + self.head(torch.zeros_like(flat))
        logits = self.out(self.after_head(hidden))
        return logits + self.side(flat) if self.side is not None else logits


class OwnLinear(nn.Linear):
    """A subclass: its forward could be anything."""


class ChannelDense(nn.Module):
    """A dense layer over each channel's entries ([B, K, S] → [B, K, 4]), then flattened."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.per_channel = nn.Linear(size // CHANNELS, 4)
        self.rest = nn.Linear(4 * CHANNELS, 16)

    def forward(self, x: Tensor) -> Tensor:
        return self.rest(self.per_channel(x.view(len(x), CHANNELS, -1)).flatten(1))


CUT = {
    "pool-flatten-dense": lambda: DenseNet(),
    "no-pool": lambda: DenseNet(pool=nn.Identity),
    "view": lambda: DenseNet(flatten=lambda x: x.view(x.size(0), -1)),
    "contiguous-then-view": lambda: DenseNet(
        flatten=lambda x: x.contiguous().view(len(x), -1)),
    "dropout-in-eval-mode": lambda: DenseNet(flatten=nn.Sequential(
        nn.Dropout(0.5), nn.Flatten(), nn.Dropout(0.5))),
    "no-bias": lambda: DenseNet(head=lambda size: nn.Linear(size, 16, bias=False)),
    "in-place-relu-after-the-dense-layer": lambda: DenseNet(
        after_head=lambda: nn.ReLU(inplace=True)),
}
NOT_CUT = {
    "flattened-map-also-feeds-another-dense-layer": lambda: DenseNet(side=True),
    "relu-between-flatten-and-dense": lambda: DenseNet(before_head=torch.relu),
    "channels-permuted-before-flatten": lambda: DenseNet(
        flatten=lambda x: x.permute(0, 2, 3, 1).flatten(1)),
    "dense-subclass": lambda: DenseNet(head=lambda size: OwnLinear(size, 16)),
    "dense-layer-called-twice": lambda: DenseNet(twice=True),
    "dense-layer-over-each-channel": lambda: DenseNet(head=ChannelDense),
}


def _checked(build: Callable[[], nn.Module], **options: bool) -> TorchBackend:
    """:func:`tests.test_pool_cut.checked` with the gradient allowed after the pool and at
    the dense layer."""
    return checked(build, INPUT, CLASSES, cut_after_pool=True, cut_at_dense=True, **options)


@pytest.mark.parametrize("name", list(CUT))
def test_the_gradient_at_a_sole_dense_layer_gives_the_float64_loops_reaction(name: str) -> None:
    assert _checked(CUT[name]).gradient_dense == "head"


@pytest.mark.parametrize("name", list(NOT_CUT))
def test_a_map_without_a_sole_dense_layer_keeps_the_gradient_where_it_was(name: str) -> None:
    assert _checked(NOT_CUT[name]).gradient_dense is None


def test_the_dense_cut_holds_in_the_channels_last_layout_with_folding() -> None:
    backend = _checked(DenseNet, channels_last=True, fuse_layers=True)
    assert (backend.gradient_dense, backend.gradient_pool) == ("head", "pool")
    assert backend.channels_last


def test_a_hooked_dense_layer_is_not_cut_at() -> None:
    def build() -> nn.Module:
        model = DenseNet()
        model.head.register_forward_hook(lambda _module, _inputs, output: output * 2)
        return model

    assert _checked(build).gradient_dense is None


def test_without_the_option_the_gradient_is_not_taken_at_the_dense_layer() -> None:
    backend = TorchBackend(DenseNet(), ReactionSpec("act"), cut_after_pool=True)
    backend.compute(*random_batch(4, INPUT, CLASSES, 1))
    assert (backend.gradient_pool, backend.gradient_dense) == ("pool", None)


def test_a_first_batch_that_does_not_agree_keeps_the_gradient_where_it_was(
        caplog: pytest.LogCaptureFixture) -> None:
    # A diverged checkpoint: NaN logits compare unequal both ways, so nothing is changed.
    backend = TorchBackend(DenseNet(pool=nn.Identity), ReactionSpec("act"), cut_at_dense=True)
    with torch.no_grad():
        backend.model.out.bias.fill_(float("nan"))
    with caplog.at_level(logging.WARNING, logger="analyzer"):
        backend.compute(*random_batch(4, INPUT, CLASSES, 2))
    assert backend.gradient_dense is None
    assert "not taken at the output of the dense layer 'head'" in caplog.text


def test_the_channel_sums_of_a_dense_layers_input_gradient_match_autograd() -> None:
    generator = torch.Generator().manual_seed(4)
    pooled = torch.rand(3, 4, 5, 6, generator=generator, dtype=torch.float64,
                        requires_grad=True)
    dense = nn.Linear(4 * 5 * 6, 7).double()
    upstream = torch.randn(3, 7, generator=generator, dtype=torch.float64)
    (at_map,) = torch.autograd.grad((dense(pooled.flatten(1)) * upstream).sum(), pooled)
    alpha = channel_weights_from_dense(upstream, dense.weight.detach(), 4, 10, 12)
    assert torch.allclose(alpha, at_map.sum(dim=(2, 3)) / 120, rtol=1e-12)


@pytest.mark.parametrize("name", ["small", "mnist", "model2"])
def test_the_zoo_models_take_the_gradient_at_their_first_dense_layer(name: str) -> None:
    size = {"small": (8, 8), "mnist": (28, 28)}.get(name, (50, 200))
    spec = ModelSpec(name, 1, size, 10)
    backend = TorchBackend(build_model(spec), ReactionSpec(gradcam_layer(name)),
                           channels_last=True, fuse_layers=True, cut_after_pool=True,
                           cut_at_dense=True)
    backend.load_weights(make_checkpoint(lambda: build_model(spec), (1, *size), 10, 7))
    images, labels = random_batch(64 if name == "small" else 16, (1, *size), 10, 7)
    result = backend.compute(images, labels, keep_maps=True)
    first_dense = next(name for name, module in backend.model.named_modules()
                       if isinstance(module, nn.Linear))
    assert backend.gradient_dense == first_dense
    reference = reference_grad_cam(backend.model, gradcam_layer(name), images, labels)
    assert_matches_reference(result.cam, result.reaction, result.empty, reference)


def _products_with(weight_name: str, model: onnx.ModelProto) -> int:
    """How many matrix products of the graph take the named weight (or its transpose)."""
    names = {weight_name}
    for node in model.graph.node:
        if node.op_type == "Transpose" and node.input[0] in names:
            names.update(node.output)
    return sum(1 for node in model.graph.node
               if node.op_type in ("Gemm", "MatMul") and names & set(node.input))


@pytest.mark.parametrize("cut", [True, False], ids=["cut", "not-cut"])
def test_the_exported_graph_multiplies_by_the_dense_weight_once_when_cut(cut: bool) -> None:
    model = DenseNet()
    model.load_state_dict(make_checkpoint(DenseNet, INPUT, CLASSES, 9))
    exporter = ReactionGraphExporter(model, ExportSettings(ReactionSpec("act"), with_maps=True),
                                     channels=INPUT[0], image_size=INPUT[1:], graph_cache=False,
                                     cut_at_dense=cut)
    payload = exporter.model_bytes()
    assert exporter.backend.gradient_dense == ("head" if cut else None)
    # The forward's product, and without the cut the backward's (∂y/∂z · W) too.
    assert _products_with("head.weight", onnx.load_model_from_string(payload)) == \
        (1 if cut else 2)
    images, labels = random_batch(100, INPUT, CLASSES, 9)
    outputs = cpu_session(payload).run([CAM, REACTION, EMPTY], {IMAGES: images.numpy(),
                                                                TARGETS: labels.numpy()})
    cam, reaction, empty = (torch.from_numpy(output) for output in outputs)
    reference = reference_grad_cam(model, "act", images, labels)
    agreement = assert_matches_reference(cam, reaction, empty, reference)
    assert agreement.excluded + agreement.floored <= MAX_EXCLUDED_SHARE * len(images)


def _tiny_reactions() -> DenseNet:
    """A DenseNet whose Reactions are about 1e-8, as small as the thesis's (1.5e-7)."""
    model = DenseNet()
    with torch.no_grad():
        model.out.weight.mul_(1e-6)
    return model


def test_a_cut_one_percent_off_is_refused_however_small_the_reactions(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import analyzer.torch_backend as torch_backend

    def one_percent_off(*arguments: Tensor) -> Tensor:
        return channel_weights_from_dense(*arguments) * 1.01

    monkeypatch.setattr(torch_backend, "channel_weights_from_dense", one_percent_off)
    backend = TorchBackend(_tiny_reactions(), ReactionSpec("act"), cut_after_pool=True,
                           cut_at_dense=True)
    result = backend.compute(*random_batch(64, INPUT, CLASSES, 3))
    assert 0 < float(result.reaction.max()) < 1e-6
    assert (backend.gradient_pool, backend.gradient_dense) == ("pool", None)


def test_one_image_in_fifty_may_differ_in_the_first_batch_but_not_two() -> None:
    from analyzer.backends import BatchResult
    from analyzer.torch_backend import _same_results

    generator = torch.Generator().manual_seed(6)
    logits = torch.randn(64, CLASSES, generator=generator)
    reaction = torch.rand(64, generator=generator) * 1e-7
    reference = BatchResult(logits, reaction, reaction == 0)

    def with_changed(images: list[int]) -> BatchResult:
        changed = reaction.clone()
        changed[images] *= 1.05  # a hidden ReLU flipped by rounding
        return BatchResult(logits.clone(), changed, changed == 0)

    assert _same_results(with_changed([]), reference)
    assert _same_results(with_changed([17]), reference)
    assert not _same_results(with_changed([17, 40]), reference)
    single = BatchResult(logits[:1], reaction[:1], reaction[:1] == 0)
    assert not _same_results(BatchResult(logits[:1], reaction[:1] * 1.05, reaction[:1] == 0),
                             single)
