"""2×2 max pools without argmax indices (analyzer/max_pool.py) in the torch backend's
computing copy: the pool against ``max_pool2d`` bit for bit, the backend against the float64
per-image Grad-CAM loop of tests/test_torch_backend.py on the user's model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from analyzer.max_pool import IndexFreeMaxPool, replaceable_pools
from analyzer.torch_backend import TorchBackend
from store.spec import ReactionSpec
from tests.test_bn_fold import check_against_the_loop
from tests.test_torch_backend import make_checkpoint, random_batch
from trainer.models import ModelSpec, build_model, gradcam_layer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("channels_last", [False, True], ids=["default layout", "channels-last"])
@pytest.mark.parametrize("size", [(8, 12), (9, 13), (2, 3)], ids=str)
def test_the_pool_is_max_pool2d_bit_for_bit(size: tuple[int, int], channels_last: bool) -> None:
    # ReLU-like maps: half the entries 0 (tied windows), and a NaN and a -inf among them.
    generator = torch.Generator().manual_seed(1)
    maps = torch.relu(torch.randn(3, 5, *size, generator=generator))
    maps[0, 0, 0, 1], maps[1, 2, 1, 0] = float("nan"), float("-inf")
    if channels_last:
        maps = maps.contiguous(memory_format=torch.channels_last)
    expected = nn.functional.max_pool2d(maps, 2)
    pooled = IndexFreeMaxPool()(maps)
    assert torch.equal(pooled.isnan(), expected.isnan())
    assert torch.equal(pooled.nan_to_num(), expected.nan_to_num())
    assert pooled.is_contiguous(memory_format=torch.channels_last) == channels_last or \
        pooled.shape[-2:] == (1, 1)
    assert torch.equal(IndexFreeMaxPool()(maps[0]).nan_to_num(), expected[0].nan_to_num())


def test_where_a_gradient_passes_it_is_max_pool2d_itself() -> None:
    maps = torch.rand(2, 3, 6, 6, requires_grad=True)
    pooled = IndexFreeMaxPool()(maps)
    assert pooled.grad_fn is not None and "MaxPool2DWithIndices" in pooled.grad_fn.name()
    (gradient,) = torch.autograd.grad(pooled.sum(), maps)
    assert gradient.sum(dim=(2, 3)).eq(9).all()  # one entry of each of the 3×3 windows


def test_a_map_smaller_than_the_window_fails_as_max_pool2d_does() -> None:
    with pytest.raises(RuntimeError) as ours:
        IndexFreeMaxPool()(torch.rand(1, 2, 1, 5))
    with pytest.raises(RuntimeError) as torchs:
        nn.functional.max_pool2d(torch.rand(1, 2, 1, 5), 2)
    assert str(ours.value) == str(torchs.value)


def test_only_plain_unhooked_two_by_two_pools_are_replaced() -> None:
    hooked = nn.MaxPool2d(2)
    hooked.register_forward_hook(lambda _module, _inputs, output: output)

    class OwnPool(nn.MaxPool2d):
        pass

    model = nn.Sequential(nn.MaxPool2d(2), nn.MaxPool2d((2, 2), stride=(2, 2)),
                          nn.MaxPool2d(2, 1), nn.MaxPool2d(3, 2), nn.MaxPool2d(2, padding=1),
                          nn.MaxPool2d(2, dilation=2), nn.MaxPool2d(2, ceil_mode=True),
                          nn.MaxPool2d(2, return_indices=True), hooked, OwnPool(2),
                          nn.Sequential(nn.MaxPool2d(2)))
    assert replaceable_pools(model) == ["0", "1", "10.0"]


@pytest.mark.parametrize("channels_last", [False, True], ids=["default layout", "channels-last"])
@pytest.mark.parametrize("cuts", [False, True], ids=["gradient at the layer", "cut"])
def test_the_backend_with_index_free_pools_matches_the_float64_loop(
        channels_last: bool, cuts: bool) -> None:
    spec = ModelSpec("model1", 1, (36, 60), 5)
    layer = gradcam_layer("model1")
    backend = TorchBackend(build_model(spec), ReactionSpec(layer), channels_last=channels_last,
                           fuse_layers=True, cut_after_pool=cuts, cut_at_dense=cuts)
    backend.load_weights(make_checkpoint(lambda: build_model(spec), (1, 36, 60), 5, 3))
    images, labels = random_batch(40, (1, 36, 60), 5, 3)
    set_aside = check_against_the_loop(backend, layer, images, labels)
    assert backend.pools_without_indices
    assert set_aside <= 1
    # The pool after the layer is found whatever computes it.
    assert (backend.gradient_pool is not None) == cuts
