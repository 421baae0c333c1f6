"""ReLUs fused into the convolutions (analyzer/conv_relu.py) in the torch backend's computing
copy. The fused op is checked against float64 ``relu(conv(x))``; the backend against the
float64 per-image Grad-CAM loop of tests/test_torch_backend.py on the user's model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from analyzer.bn_fold import foldable_pairs
from analyzer.conv_relu import ConvReLU, fusable_relus
from analyzer.torch_backend import TorchBackend
from store.spec import ReactionSpec
from tests.test_bn_fold import NOTE, check_against_the_loop
from tests.test_torch_backend import (
    CASES,
    CHECKPOINT_SEEDS,
    MAX_EXCLUDED_SHARE,
    make_checkpoint,
    random_batch,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

CONVS = {
    "3x3": lambda: nn.Conv2d(3, 8, 3),
    "stride, padding, dilation, groups, no bias": lambda: nn.Conv2d(
        4, 8, 3, stride=2, padding=(1, 2), dilation=2, groups=2, bias=False),
    "one input channel": lambda: nn.Conv2d(1, 16, 5),
}


@pytest.mark.parametrize("channels_last", [False, True], ids=["default layout", "channels-last"])
@pytest.mark.parametrize("make", list(CONVS.values()), ids=list(CONVS))
def test_the_fused_op_is_relu_of_the_conv_in_float64(make, channels_last: bool) -> None:
    torch.manual_seed(0)
    conv = make()
    images = torch.randn(5, conv.in_channels, 17, 23)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fused = ConvReLU(conv)(images)
        expected = torch.relu(copy.deepcopy(conv).double()(images.double()))
    assert fused.grad_fn is None
    assert (fused >= 0).all() and (fused == 0).any()
    torch.testing.assert_close(fused.double(), expected, rtol=1e-5, atol=1e-5)


def test_a_call_that_needs_a_gradient_is_differentiated() -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, 3).requires_grad_(False)
    images = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    leaf = images.float().requires_grad_(True)
    ConvReLU(conv)(leaf).square().sum().backward()
    reference = images.clone().requires_grad_(True)
    torch.relu(copy.deepcopy(conv).double()(reference)).square().sum().backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0
    torch.testing.assert_close(leaf.grad.double(), reference.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("case_name", "channels_last", "fused"), [
    ("model1-36x60", True, 3), ("model1-36x60", None, 3),
    ("residual-stem-feeds-skip", None, 1), ("residual-block-out", None, 1)],
    ids=["zoo, channels-last", "zoo, layout chosen", "the layer is the fused ReLU",
         "convs after the layer"])
def test_fused_backend_matches_a_float64_loop(case_name: str, channels_last: bool | None,
                                              fused: int, caplog) -> None:
    case = CASES[case_name]
    backend = TorchBackend(case.build(), ReactionSpec(case.layer), "cpu",
                           channels_last=channels_last, fuse_layers=True)
    set_aside = total = 0
    with caplog.at_level("WARNING"):
        for seed in CHECKPOINT_SEEDS:
            backend.load_weights(make_checkpoint(case.build, case.input_shape, case.classes,
                                                 seed))
            images, labels = random_batch(case.images, case.input_shape, case.classes, seed)
            set_aside += check_against_the_loop(backend, case.layer, images, labels)
            total += len(images)
    assert set_aside <= MAX_EXCLUDED_SHARE * total
    assert not [r for r in caplog.records if NOTE in r.getMessage()]
    assert backend.relu_fused and backend._folded.fused_relus == fused
    assert sum(isinstance(m, ConvReLU) for m in backend._folded.model.modules()) == fused
    assert not any(isinstance(m, ConvReLU) for m in backend.model.modules())
    if case.layer.endswith(".2"):  # the ReLU of the stem: its place holds the fused output
        assert isinstance(backend._folded.module, nn.Identity)


class Shapes(nn.Module):
    """A Sequential of conv → ReLU pairs, some of which must not be fused."""

    def __init__(self) -> None:
        super().__init__()
        shared = nn.ReLU()
        hooked = nn.ReLU()
        hooked.register_forward_hook(lambda *_: None)
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True),   # 0, 1: fused
            nn.Conv2d(4, 4, 3, padding=1), shared,                  # 2, 3: ReLU used twice
            nn.Conv2d(4, 4, 3, padding="same"), nn.ReLU(),          # 4, 5: string padding
            nn.Conv2d(4, 4, 3, padding=1), hooked,                  # 6, 7: hooked ReLU
            nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),  # 8-10: folded, fused
            nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),  # 11-13
            nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),               # 14, 15
            shared)
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


@pytest.mark.parametrize(("layer", "folded", "fused"), [
    ("features.12", {"9"}, [("features", "14", "15")]),      # 11-12 not folded, 11 not fused
    ("features.14", {"9", "12"}, [("features", "11", "13")])],  # 14 not fused
    ids=["layer is a norm", "layer is a conv"])
def test_only_a_pattern_whose_meaning_cannot_change_is_fused(
        layer: str, folded: set[str], fused: list[tuple[str, str, str]]) -> None:
    model = Shapes()
    norms = {(parent, norm) for parent, _, norm in foldable_pairs(model, layer)}
    assert norms == {("features", norm) for norm in folded}
    always = [("features", "0", "1"), ("features", "8", "10")]
    assert sorted(fusable_relus(model, layer, norms)) == sorted(always + fused)
    backend = TorchBackend(model, ReactionSpec(layer), "cpu", fuse_layers=True)
    images, labels = random_batch(40, (3, 6, 6), 3, 45)
    assert check_against_the_loop(backend, layer, images, labels) <= \
        MAX_EXCLUDED_SHARE * len(images)
    assert backend._folded is not None and backend._folded.fused_relus == 3
