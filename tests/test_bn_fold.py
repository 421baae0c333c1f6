"""Batch norm folded into the convolutions (analyzer/bn_fold.py) in the torch backend.

Every result is checked against the independent float64 per-image Grad-CAM loop of
tests/test_torch_backend.py, run on the user's (unfolded) model.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import Tensor, nn

from analyzer.bn_fold import foldable_pairs
from analyzer.torch_backend import TorchBackend
from store.spec import ReactionSpec
from tests.test_torch_backend import (
    CASES,
    CHECKPOINT_SEEDS,
    MAX_EXCLUDED_SHARE,
    Case,
    assert_matches_reference,
    make_checkpoint,
    random_batch,
    reference_grad_cam,
)
from trainer.models import ModelSpec, build_model

NOTE = "are not fused into the convolutions"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _float64_logits(model: nn.Module, images: Tensor) -> Tensor:
    with torch.no_grad():
        return copy.deepcopy(model).double().eval()(images.double())


def check_against_the_loop(backend: TorchBackend, layer: str, images: Tensor,
                            labels: Tensor) -> int:
    """compute() and logits() against float64 on the user's model; returns the set-aside."""
    result = backend.compute(images, labels, keep_maps=True)
    ref = reference_grad_cam(backend.model, layer, images, labels)
    assert result.cam is not None
    agreement = assert_matches_reference(result.cam, result.reaction, result.empty, ref)
    expected = _float64_logits(backend.model, images)
    torch.testing.assert_close(result.logits.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(backend.logits(images).double(), expected, rtol=1e-5, atol=1e-5)
    return agreement.excluded + agreement.floored


@pytest.mark.parametrize(("case_name", "channels_last", "pairs"), [
    ("model1-36x60", True, 3), ("residual-block-out", None, 1)])
def test_folded_backend_matches_a_float64_loop_and_leaves_the_model_alone(
        case_name: str, channels_last: bool | None, pairs: int, caplog) -> None:
    case = CASES[case_name]
    backend = TorchBackend(case.build(), ReactionSpec(case.layer), "cpu",
                           channels_last=channels_last, fuse_layers=True)
    model = backend.model
    model.train()  # the backend computes in eval mode and gives the mode back
    set_aside = total = 0
    with caplog.at_level("WARNING"):
        for seed in CHECKPOINT_SEEDS:  # refolded per checkpoint
            weights = make_checkpoint(case.build, case.input_shape, case.classes, seed)
            backend.load_weights(weights)
            images, labels = random_batch(case.images, case.input_shape, case.classes, seed)
            set_aside += check_against_the_loop(backend, case.layer, images, labels)
            total += len(images)
            assert backend.batch_norm_folded
            state = model.state_dict()
            assert set(state) == set(weights)
            for key, value in weights.items():
                assert torch.equal(state[key], value), f"{key} changed by folding"
    assert set_aside <= MAX_EXCLUDED_SHARE * total
    assert not [r for r in caplog.records if NOTE in r.getMessage()]
    assert backend._folded is not None and len(backend._folded.folds) == pairs
    assert model.training
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == pairs and all(m.training for m in norms)  # still in the user's model
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("layer", ["features.11", "features.10"],
                         ids=["layer is the batch norm", "layer is the conv before it"])
def test_the_pair_at_the_grad_cam_layer_is_not_folded(layer: str) -> None:
    case = CASES["model1-36x60"]
    model = case.build()
    assert ("features", "10", "11") not in foldable_pairs(model, layer)
    backend = TorchBackend(model, ReactionSpec(layer), "cpu", channels_last=True,
                           fuse_layers=True)
    backend.load_weights(make_checkpoint(case.build, case.input_shape, case.classes, 41))
    images, labels = random_batch(case.images, case.input_shape, case.classes, 41)
    assert check_against_the_loop(backend, layer, images, labels) <= \
        MAX_EXCLUDED_SHARE * len(images)
    assert backend._folded is not None
    assert [(f.conv, f.norm) for f in backend._folded.folds] == [
        (model.features[0], model.features[1]), (model.features[5], model.features[6])]
    assert isinstance(backend._folded.module, type(model.features[int(layer.split(".")[1])]))


class SkipAroundNorm(nn.Module):
    """``relu(bn(conv(x)) + conv(x))``, conv and bn in a Sequential or as plain attributes.

    With ``in_sequence`` the pair are consecutive children of a Sequential that the forward
    never calls: it calls the children itself, and the conv's output is used twice.
    """

    def __init__(self, in_sequence: bool) -> None:
        super().__init__()
        conv, norm = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        if in_sequence:
            self.body = nn.Sequential(conv, norm)
        else:
            self.conv, self.norm = conv, norm
        self.in_sequence = in_sequence
        self.act = nn.ReLU()
        self.head = nn.Linear(6 * 5 * 5, 4)

    def forward(self, x: Tensor) -> Tensor:
        conv, norm = (self.body[0], self.body[1]) if self.in_sequence else (self.conv, self.norm)
        h = conv(x)
        return self.head(self.act(norm(h) + h).flatten(1))


class WeightTiedHead(nn.Module):
    """A zoo-like Sequential whose head also reads the first conv's weight: folding would
    change the logits, so the first-batch check must refuse it."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6),
                                      nn.ReLU())
        self.head = nn.Linear(6 * 5 * 5, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1)) * self.features[0].weight.abs().mean()


@pytest.mark.parametrize(("build", "candidates", "noted"), [
    (lambda: SkipAroundNorm(in_sequence=True), 1, False),
    (lambda: SkipAroundNorm(in_sequence=False), 0, False),
    (WeightTiedHead, 1, True),
], ids=["conv output used twice, children called directly", "conv output used twice",
        "head reads the conv weight: results differ"])
def test_a_model_where_folding_would_change_the_meaning_is_computed_unfolded(
        build, candidates: int, noted: bool, caplog) -> None:
    case = Case(build, "act" if build is not WeightTiedHead else "features.2", (3, 5, 5), 4, 200)
    model = build()
    assert len(foldable_pairs(model, case.layer)) == candidates  # the static pattern
    backend = TorchBackend(model, ReactionSpec(case.layer), "cpu", fuse_layers=True)
    backend.load_weights(make_checkpoint(build, case.input_shape, case.classes, 42))
    images, labels = random_batch(case.images, case.input_shape, case.classes, 42)
    with caplog.at_level("WARNING"):
        assert check_against_the_loop(backend, case.layer, images, labels) <= \
            MAX_EXCLUDED_SHARE * len(images)
        backend.compute(images[:8], labels[:8])  # decided once per backend
    assert not backend.batch_norm_folded
    notes = [r.getMessage() for r in caplog.records if NOTE in r.getMessage()]
    assert len(notes) == (1 if noted else 0)


def test_a_backend_without_fuse_layers_computes_the_model_itself() -> None:
    model = build_model(ModelSpec("model1", 1, (36, 60), 13))
    backend = TorchBackend(model, ReactionSpec("features.12"), "cpu")
    backend.compute(*random_batch(4, (1, 36, 60), 13, 43))
    assert not backend.batch_norm_folded  # as the ONNX export traces it (analyzer.onnx_export)


class HoldsALock(nn.Module):
    """A zoo-like Sequential in a model that cannot be deep-copied (it holds a lock)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6),
                                      nn.ReLU())
        self.head = nn.Linear(6 * 5 * 5, 4)
        self.lock = threading.Lock()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


def test_a_model_that_cannot_be_copied_is_computed_unfolded_with_a_note(caplog) -> None:
    torch.manual_seed(44)
    model = HoldsALock()
    images, labels = random_batch(20, (3, 5, 5), 4, 44)
    plain = TorchBackend(model, ReactionSpec("features.2"), "cpu").compute(images, labels)
    backend = TorchBackend(model, ReactionSpec("features.2"), "cpu", fuse_layers=True)
    with caplog.at_level("WARNING"):
        result = backend.compute(images, labels)
    assert not backend.batch_norm_folded
    assert [r for r in caplog.records if "cannot be copied" in r.getMessage()]
    assert torch.equal(result.reaction, plain.reaction)  # the same network, the same kernels
    assert torch.equal(result.logits, plain.logits)
