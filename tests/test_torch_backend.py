"""The PyTorch backend against an independent float64 per-image Grad-CAM loop (docs/METHOD.md §2).

The reference below is written from the definitions, not from ``analyzer.gradcam``: a float64
copy of the network, one image at a time, a forward hook on the layer, ``autograd.grad`` of the
target score, alpha_k = mean over H, W, L = ReLU(Σ_k alpha_k A^k), Reaction = Σ L / #{L > 0}.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from analyzer.torch_backend import TorchBackend, find_layer
from store.errors import InputError
from store.spec import ReactionSpec
from trainer.models import ModelSpec, build_model, gradcam_layer

# A map entry this close to zero, relative to the map's largest |value|, is within float32
# rounding of zero: its sign, and so pN, may legitimately differ between float32 and float64.
NEAR_ZERO = 1e-6
REL_TOL = 1e-5
MAX_EXCLUDED_SHARE = 0.02


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---- foreign architectures, defined here -----------------------------------------------------

class ResidualBlock(nn.Module):
    """``out(x + conv2(inner(conv1(x))))``: the skip makes the block input feed two paths.

    ``shared_relu`` makes ``inner`` and ``out`` one module, called twice, as torchvision's
    BasicBlock does with its ``relu``; hooking it, the map is taken at its last call.
    """

    def __init__(self, width: int, shared_relu: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.inner = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.out = self.inner if shared_relu else nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.out(x + self.conv2(self.inner(self.conv1(x))))


class ResidualNet(nn.Module):
    """conv → BN → ReLU → residual block → ReLU → global average pool → linear."""

    def __init__(self, in_channels: int = 3, width: int = 8, classes: int = 5,
                 shared_relu: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.block = ResidualBlock(width, shared_relu)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.block(self.stem(x))).flatten(1))


class AddOne(nn.Module):
    """``x += 1`` (in place) or ``x + 1``."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace

    def forward(self, x: Tensor) -> Tensor:
        if self.inplace:
            x += 1
            return x
        return x + 1


class InPlaceNet(nn.Module):
    """conv → act → after → flatten → linear; ``act`` and ``after`` may work in place."""

    def __init__(self, act: nn.Module, after: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.act = act
        self.after = after
        self.head = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.after(self.act(self.conv(x))).flatten(1))


# ---- the independent reference ---------------------------------------------------------------

@dataclass
class Reference:
    reaction: Tensor   # [B] float64
    empty: Tensor      # [B] bool
    weighted: Tensor   # [B, H, W] Σ_k alpha_k A^k before the ReLU, float64
    targets: Tensor    # [B] the class each map was taken for


def reference_grad_cam(model: nn.Module, layer: str, images: Tensor, labels: Tensor | None,
                       score: str = "logit") -> Reference:
    """Per-image float64 Grad-CAM; ``labels=None`` takes the float64 argmax as the target."""
    net = copy.deepcopy(model).double().eval()
    hooked: dict[str, Tensor] = {}
    module = dict(net.named_modules())[layer]
    handle = module.register_forward_hook(lambda _m, _i, output: hooked.update(a=output))
    reactions, empties, weighted_maps, targets = [], [], [], []
    try:
        for index, image in enumerate(images):
            logits = net(image[None].double())
            target = int(logits.argmax()) if labels is None else int(labels[index])
            y = logits[0, target] if score == "logit" else torch.softmax(logits, 1)[0, target]
            activation = hooked["a"]
            (gradient,) = torch.autograd.grad(y, activation)
            alpha = gradient[0].mean(dim=(1, 2))
            weighted = (alpha[:, None, None] * activation[0].detach()).sum(dim=0)
            cam = weighted.clamp(min=0)
            positive = int((cam > 0).sum())
            reactions.append(cam.sum().item() / positive if positive else 0.0)
            empties.append(positive == 0)
            weighted_maps.append(weighted)
            targets.append(target)
    finally:
        handle.remove()
    return Reference(torch.tensor(reactions, dtype=torch.float64), torch.tensor(empties),
                     torch.stack(weighted_maps), torch.tensor(targets))


@dataclass
class Agreement:
    max_rel_error: float  # over the images held to REL_TOL
    excluded: int         # a near-zero entry changed sign: pN legitimately differs
    floored: int          # Reaction itself within float32 rounding of zero: absolute floor
    compared: int


def assert_matches_reference(cam32: Tensor, reaction32: Tensor, empty32: Tensor,
                             ref: Reference) -> Agreement:
    """Reaction within REL_TOL and equal empty flags, except where a near-zero entry flipped.

    A Reaction far below the map's largest |value| (a lone small positive entry among large
    negative ones) is itself a near-zero difference: it is held to NEAR_ZERO · that value.
    """
    weighted = ref.weighted
    largest = weighted.flatten(1).abs().max(dim=1).values
    near_zero = weighted.abs() < NEAR_ZERO * largest[:, None, None]
    flipped = (weighted > 0) != (cam32.double() > 0)
    assert not (flipped & ~near_zero).any(), "a map entry far from zero changed sign"
    excluded = (flipped & near_zero).flatten(1).any(dim=1)
    kept = ~excluded
    assert torch.equal(empty32[kept], ref.empty[kept])
    assert (reaction32[kept & empty32] == 0).all()
    nonempty = kept & ~ref.empty
    error = (reaction32.double() - ref.reaction).abs()
    relative = REL_TOL * ref.reaction
    assert (error[nonempty] <= relative[nonempty] + NEAR_ZERO * largest[nonempty]).all()
    floored = nonempty & (error > relative)
    strict = nonempty & ~floored
    rel_error = (error[strict] / ref.reaction[strict]).max().item() if strict.any() else 0.0
    return Agreement(rel_error, int(excluded.sum()), int(floored.sum()), int(kept.sum()))


# ---- checkpoints and data --------------------------------------------------------------------

def make_checkpoint(build: Callable[[], nn.Module], input_shape: tuple[int, ...], classes: int,
                    seed: int) -> dict[str, Tensor]:
    """A few Adam steps from seed's init, then random BN running statistics."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        model.train()
        for _ in range(3):
            images = torch.rand(16, *input_shape)
            loss = nn.functional.cross_entropy(model(images), torch.randint(0, classes, (16,)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(0.2 * torch.randn_like(module.running_mean))
                module.running_var.copy_(0.5 + torch.rand_like(module.running_var))
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def random_batch(count: int, input_shape: tuple[int, ...], classes: int,
                 seed: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(count, *input_shape, generator=generator)
    return images, torch.randint(0, classes, (count,), generator=generator)


@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    layer: str
    input_shape: tuple[int, ...]
    classes: int
    images: int


def _zoo(name: str, size: tuple[int, int], classes: int, images: int) -> Case:
    return Case(lambda: build_model(ModelSpec(name, 1, size, classes)), gradcam_layer(name),
                (1, *size), classes, images)


CASES = {
    "small": _zoo("small", (8, 8), 10, 300),
    "model1-36x60": _zoo("model1", (36, 60), 13, 100),
    "residual-block-out": Case(ResidualNet, "block.out", (3, 10, 10), 5, 300),
    "residual-stem-feeds-skip": Case(ResidualNet, "stem.2", (3, 10, 10), 5, 300),
    "residual-shared-relu-last-call": Case(lambda: ResidualNet(shared_relu=True), "block.inner",
                                           (3, 10, 10), 5, 300),
}
CHECKPOINT_SEEDS = (11, 12, 13)


def _backend(case: Case, **options: str) -> TorchBackend:
    return TorchBackend(case.build(), ReactionSpec(case.layer, **options))


# ---- Reaction equals the float64 per-image loop ----------------------------------------------

@pytest.mark.parametrize("case_name", list(CASES))
def test_reaction_matches_a_float64_per_image_loop_for_several_checkpoints(
        case_name: str) -> None:
    case = CASES[case_name]
    backend = _backend(case)
    set_aside = total = 0
    for seed in CHECKPOINT_SEEDS:
        backend.load_weights(make_checkpoint(case.build, case.input_shape, case.classes, seed))
        images, labels = random_batch(case.images, case.input_shape, case.classes, seed)
        result = backend.compute(images, labels, keep_maps=True)
        ref = reference_grad_cam(backend.model, case.layer, images, labels)
        assert result.cam is not None
        assert result.cam.shape == ref.weighted.shape
        agreement = assert_matches_reference(result.cam, result.reaction, result.empty, ref)
        set_aside += agreement.excluded + agreement.floored
        total += len(images)
    assert set_aside <= MAX_EXCLUDED_SHARE * total


def test_softmax_score_matches_a_float64_per_image_loop() -> None:
    case = CASES["small"]
    backend = _backend(case, score="softmax")
    backend.load_weights(make_checkpoint(case.build, case.input_shape, case.classes, 21))
    images, labels = random_batch(200, case.input_shape, case.classes, 21)
    result = backend.compute(images, labels, keep_maps=True)
    ref = reference_grad_cam(backend.model, case.layer, images, labels, score="softmax")
    assert result.cam is not None
    agreement = assert_matches_reference(result.cam, result.reaction, result.empty, ref)
    assert agreement.excluded + agreement.floored <= MAX_EXCLUDED_SHARE * len(images)


@pytest.mark.parametrize("case_name", ["small", "residual-block-out"])
def test_pred_target_uses_each_images_predicted_class(case_name: str) -> None:
    case = CASES[case_name]
    backend = _backend(case, target="pred")
    backend.load_weights(make_checkpoint(case.build, case.input_shape, case.classes, 31))
    images, labels = random_batch(200, case.input_shape, case.classes, 31)
    result = backend.compute(images, labels, keep_maps=True)
    ref = reference_grad_cam(backend.model, case.layer, images, None)
    top2 = result.logits.topk(2, dim=1).values
    clear_winner = (top2[:, 0] - top2[:, 1]) > 1e-4
    assert clear_winner.float().mean() > 0.95
    assert torch.equal(result.logits.argmax(dim=1)[clear_winner], ref.targets[clear_winner])
    assert (ref.targets != labels).any(), "labels must differ from predictions to mean anything"
    assert result.cam is not None
    assert_matches_reference(result.cam[clear_winner], result.reaction[clear_winner],
                             result.empty[clear_winner], _subset(ref, clear_winner))
    # The labels are ignored when the target is the prediction.
    relabelled = backend.compute(images, (labels + 1) % case.classes)
    assert torch.equal(relabelled.reaction, result.reaction)


def _subset(ref: Reference, keep: Tensor) -> Reference:
    return Reference(ref.reaction[keep], ref.empty[keep], ref.weighted[keep], ref.targets[keep])


# ---- a network whose map is worked out on paper ----------------------------------------------

class TwoChannelNet(nn.Module):
    """Layer = the input itself (a 1×1 identity conv), head = one fixed linear map.

    The logits are linear in A, so ∂y^c/∂A^k_ij is the head weight at (c, k, i, j).
    """

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Conv2d(2, 2, kernel_size=1, bias=False)
        self.head = nn.Linear(8, 2)
        with torch.no_grad():
            self.layer.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
            # flatten order: channel, row, column.
            self.head.weight.copy_(torch.tensor([
                # class 0: channel 0 [[2, 0], [1, 1]] (mean 1), channel 1 [[-1, 0], [-1, 0]]
                # (mean -0.5)
                [2.0, 0.0, 1.0, 1.0, -1.0, 0.0, -1.0, 0.0],
                # class 1: channel 0 all -1 (mean -1), channel 1 [[0, 1], [0, 0]] (mean 0.25)
                [-1.0, -1.0, -1.0, -1.0, 0.0, 1.0, 0.0, 0.0],
            ]))
            self.head.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(x).flatten(1))


# image 0: A^0 = [[1, 2], [3, 4]], A^1 = [[4, 2], [2, 0]]; image 1: A^0 = [[0, 0], [0, 3]], A^1 = 0.
HAND_IMAGES = torch.tensor([
    [[[1.0, 2.0], [3.0, 4.0]], [[4.0, 2.0], [2.0, 0.0]]],
    [[[0.0, 0.0], [0.0, 3.0]], [[0.0, 0.0], [0.0, 0.0]]],
])


@pytest.mark.parametrize(("image", "label", "logits", "cam", "reaction", "empty"), [
    # class 0, alpha = (1, -0.5): A^0 - A^1/2 = [[1 - 2, 2 - 1], [3 - 1, 4 - 0]] = [[-1, 1], [2, 4]]
    # → L = [[0, 1], [2, 4]] (the -1 is clipped), pN = 3, Reaction = 7/3.
    # logits: class 0 = 2·1 + 1·3 + 1·4 - 4 - 2 = 3; class 1 = -(1+2+3+4) + 2 = -8.
    (0, 0, [3.0, -8.0], [[0.0, 1.0], [2.0, 4.0]], 7.0 / 3.0, False),
    # class 1, alpha = (-1, 0.25): -A^0 + A^1/4 = [[-1 + 1, -2 + 0.5], [-3 + 0.5, -4]]
    # = [[0, -1.5], [-2.5, -4]] ≤ 0 everywhere → empty map, Reaction 0.
    (0, 1, [3.0, -8.0], [[0.0, 0.0], [0.0, 0.0]], 0.0, True),
    # class 0 on image 1: A^0 = [[0, 0], [0, 3]], A^1 = 0 → L = [[0, 0], [0, 3]], pN = 1,
    # Reaction = 3. logits: class 0 = 1·3 = 3; class 1 = -3.
    (1, 0, [3.0, -3.0], [[0.0, 0.0], [0.0, 3.0]], 3.0, False),
    # class 1 on image 1: -A^0 = [[0, 0], [0, -3]] → empty.
    (1, 1, [3.0, -3.0], [[0.0, 0.0], [0.0, 0.0]], 0.0, True),
])
def test_two_channel_network_gives_the_hand_derived_map_and_reaction(
        image: int, label: int, logits: list[float], cam: list[list[float]], reaction: float,
        empty: bool) -> None:
    backend = TorchBackend(TwoChannelNet(), ReactionSpec("layer"))
    result = backend.compute(HAND_IMAGES[image:image + 1], torch.tensor([label]), keep_maps=True)
    assert result.logits.tolist() == [logits]
    assert result.cam is not None
    assert result.cam.tolist() == [cam]
    assert result.reaction.item() == pytest.approx(reaction, rel=1e-7)
    assert result.empty.tolist() == [empty]


def test_two_channel_network_batch_gives_each_image_its_hand_derived_reaction() -> None:
    backend = TorchBackend(TwoChannelNet(), ReactionSpec("layer"))
    images = torch.cat([HAND_IMAGES, HAND_IMAGES])
    result = backend.compute(images, torch.tensor([0, 0, 1, 1]))
    assert result.reaction.tolist() == pytest.approx([7.0 / 3.0, 3.0, 0.0, 0.0], rel=1e-7)
    assert result.empty.tolist() == [False, False, True, True]


def test_keep_maps_false_returns_no_map() -> None:
    backend = TorchBackend(TwoChannelNet(), ReactionSpec("layer"))
    assert backend.compute(HAND_IMAGES, torch.tensor([0, 0])).cam is None


class LayerOffThePath(nn.Module):
    """Runs the layer but computes the logits from the input: ∂y/∂A = 0 everywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Conv2d(2, 2, kernel_size=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        self.layer(x)
        return self.head(x.flatten(1))


def test_a_score_that_does_not_depend_on_the_layer_gives_empty_maps() -> None:
    backend = TorchBackend(LayerOffThePath(), ReactionSpec("layer"))
    result = backend.compute(HAND_IMAGES, torch.tensor([0, 1]))
    assert result.reaction.tolist() == [0.0, 0.0]
    assert result.empty.tolist() == [True, True]


# ---- batch independence ----------------------------------------------------------------------

@pytest.mark.parametrize("case_name", ["small", "residual-block-out"])
def test_an_images_reaction_does_not_depend_on_its_batch(case_name: str) -> None:
    case = CASES[case_name]
    backend = _backend(case)
    backend.load_weights(make_checkpoint(case.build, case.input_shape, case.classes, 41))
    probes, probe_labels = random_batch(5, case.input_shape, case.classes, 41)
    alone = [backend.compute(probes[i:i + 1], probe_labels[i:i + 1], keep_maps=True)
             for i in range(5)]
    for batch_size, seed in ((7, 42), (64, 43), (64, 44)):
        companions, labels = random_batch(batch_size, case.input_shape, case.classes, seed)
        positions = torch.randperm(batch_size, generator=torch.Generator().manual_seed(seed))[:5]
        companions[positions] = probes
        labels[positions] = probe_labels
        result = backend.compute(companions, labels)
        for probe, position in enumerate(positions.tolist()):
            assert result.empty[position] == alone[probe].empty[0]
            # another batch size may take another convolution algorithm: equal up to float32
            # rounding of the map's terms (a Reaction far below its map's largest value is
            # a difference of such terms)
            rounding = NEAR_ZERO * float(alone[probe].cam.abs().max())
            assert result.reaction[position].item() == pytest.approx(
                alone[probe].reaction.item(), rel=1e-6, abs=rounding)


# ---- softmax score: seed 001's empty maps ----------------------------------------------------

def test_softmax_score_empties_maps_of_a_confident_network_where_the_logit_does_not() -> None:
    # Seed 001's MNIST network, made confident by scaling its last layer ×2000: logit gaps of
    # 50-200. Where the gap passes ~104, softmax is exactly 1 in float32 and the other
    # probabilities exactly 0, so ∂p_c/∂A vanishes and the map is empty; elsewhere the tiny
    # gradient may still leave a map. The logit's gradient is only scaled: no map empties.
    # (Seed 001: 217 of 500 maps empty with softmax, 0 of 500 with the logit.)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = build_model(ModelSpec("mnist", 1, (28, 28), 10))
    with torch.no_grad():
        model.classifier[-1].weight.mul_(2000.0)
        model.classifier[-1].bias.mul_(2000.0)
    images, _ = random_batch(200, (1, 28, 28), 10, 51)
    layer = gradcam_layer("mnist")
    with torch.no_grad():
        predicted = copy.deepcopy(model).eval()(images).argmax(dim=1)

    by_logit = TorchBackend(model, ReactionSpec(layer)).compute(images, predicted)
    by_softmax = TorchBackend(model, ReactionSpec(layer, "softmax")).compute(images, predicted)

    probabilities = torch.softmax(by_logit.logits, dim=1)
    saturated = (probabilities.max(dim=1).values == 1.0) & (
        (probabilities == 0).sum(dim=1) == probabilities.shape[1] - 1)
    assert int(by_logit.empty.sum()) == 0
    assert 0.25 <= by_softmax.empty.float().mean() < 1.0
    assert int(saturated.sum()) >= 10
    assert by_softmax.empty[saturated].all()
    assert (by_softmax.reaction[by_softmax.empty] == 0).all()


# ---- the model's state around compute --------------------------------------------------------

def test_compute_runs_in_eval_mode_and_restores_train_mode_and_parameters() -> None:
    case = CASES["small"]
    backend = _backend(case)
    backend.load_weights(make_checkpoint(case.build, case.input_shape, case.classes, 61))
    model = backend.model
    frozen = {"features.0.weight", "classifier.1.bias"}
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name not in frozen)
    model.train()
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    images, labels = random_batch(50, case.input_shape, case.classes, 61)

    first = backend.compute(images, labels, keep_maps=True)
    second = backend.compute(images, labels)

    assert all(module.training for module in model.modules())
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, buffers[name]), f"{name} changed"
    for name, parameter in model.named_parameters():
        assert parameter.grad is None, f"{name} has a gradient"
        assert parameter.requires_grad == (name not in frozen)
    # Dropout off and running statistics used: repeatable, and equal to the eval-mode loop.
    assert torch.equal(first.reaction, second.reaction)
    ref = reference_grad_cam(model, case.layer, images, labels)
    assert model.training
    agreement = assert_matches_reference(first.cam, first.reaction, first.empty, ref)
    assert agreement.compared >= 49 and agreement.max_rel_error <= REL_TOL


def test_compute_on_an_eval_model_leaves_it_in_eval_mode() -> None:
    case = CASES["small"]
    backend = _backend(case)
    backend.model.eval()
    backend.compute(*random_batch(4, case.input_shape, case.classes, 62))
    assert not any(module.training for module in backend.model.modules())


# ---- in-place operations after the layer -----------------------------------------------------

@pytest.mark.parametrize(("layer", "act", "after", "act_ref", "after_ref"), [
    ("conv", nn.Identity, lambda: nn.ReLU(inplace=True), nn.Identity, nn.ReLU),
    ("conv", nn.Identity, lambda: AddOne(inplace=True), nn.Identity,
     lambda: AddOne(inplace=False)),
    ("act", lambda: nn.ReLU(inplace=True), lambda: AddOne(inplace=True), nn.ReLU,
     lambda: AddOne(inplace=False)),
], ids=["relu-inplace-after-conv", "add-inplace-after-conv", "add-inplace-after-inplace-relu"])
def test_an_in_place_op_after_the_layer_does_not_corrupt_its_activations(
        layer: str, act: Callable[[], nn.Module], after: Callable[[], nn.Module],
        act_ref: Callable[[], nn.Module], after_ref: Callable[[], nn.Module]) -> None:
    # Trained out of place: autograd refuses `x += 1` on a ReLU output it saved for backward.
    checkpoint = make_checkpoint(lambda: InPlaceNet(act_ref(), after_ref()), (3, 8, 8), 5, 71)
    backend = TorchBackend(InPlaceNet(act(), after()), ReactionSpec(layer))
    backend.load_weights(checkpoint)
    out_of_place = InPlaceNet(act_ref(), after_ref())
    out_of_place.load_state_dict(checkpoint)
    images, labels = random_batch(100, (3, 8, 8), 5, 71)

    result = backend.compute(images, labels, keep_maps=True)
    ref = reference_grad_cam(out_of_place, layer, images, labels)

    assert result.cam is not None
    with torch.no_grad():
        logits = copy.deepcopy(out_of_place).double()(images.double())
    assert torch.allclose(result.logits.double(), logits, rtol=1e-5, atol=1e-5)
    agreement = assert_matches_reference(result.cam, result.reaction, result.empty, ref)
    assert agreement.excluded + agreement.floored <= MAX_EXCLUDED_SHARE * len(images)


# ---- errors ----------------------------------------------------------------------------------

def test_unknown_layer_is_an_input_error_listing_close_names() -> None:
    model = build_model(ModelSpec("small", 1, (8, 8), 10))
    with pytest.raises(InputError, match=r"'featres\.5'.*features\.5"):
        find_layer(model, "featres.5")
    with pytest.raises(InputError, match="featres"):
        TorchBackend(model, ReactionSpec("featres.5"))


def test_the_empty_name_is_not_a_layer() -> None:
    with pytest.raises(InputError):
        find_layer(build_model(ModelSpec("small", 1, (8, 8), 10)), "")


def test_find_layer_returns_the_named_sub_module() -> None:
    model = ResidualNet()
    assert find_layer(model, "block.out") is model.block.out


def test_a_layer_whose_output_is_not_a_feature_map_is_an_input_error() -> None:
    model = build_model(ModelSpec("small", 1, (8, 8), 10))
    images, labels = random_batch(4, (1, 8, 8), 10, 81)
    backend = TorchBackend(model, ReactionSpec("classifier.1"))
    with pytest.raises(InputError, match=r"classifier\.1"):
        backend.compute(images, labels)
    # The hook is gone: the model and a correct backend still work afterwards.
    model.eval()
    assert model(images).shape == (4, 10)
    backend = TorchBackend(model, ReactionSpec(gradcam_layer("small")))
    assert backend.compute(images, labels).reaction.shape == (4,)


def test_a_layer_the_forward_pass_does_not_use_is_an_input_error() -> None:
    model = build_model(ModelSpec("small", 1, (8, 8), 10))
    model.unused = nn.Conv2d(1, 1, 1)
    with pytest.raises(InputError, match="unused"):
        TorchBackend(model, ReactionSpec("unused")).compute(*random_batch(2, (1, 8, 8), 10, 82))


@pytest.mark.parametrize(("score", "target"), [("probability", "label"), ("logit", "truth")])
def test_unknown_score_or_target_is_an_input_error(score: str, target: str) -> None:
    with pytest.raises(InputError):
        ReactionSpec("layer", score=score, target=target)


def _mismatched(kind: str) -> tuple[dict[str, Tensor], list[str]]:
    state = {key: value.clone() for key, value in
             build_model(ModelSpec("small", 1, (8, 8), 10)).state_dict().items()}
    if kind == "missing":
        del state["classifier.1.bias"]
        return state, ["missing", "classifier.1.bias"]
    if kind == "unexpected":
        state["head.weight"] = torch.zeros(3)
        return state, ["unexpected", "head.weight"]
    if kind == "wrong shape":
        state["features.0.weight"] = torch.zeros(16, 3, 3, 3)
        return state, ["wrong shape", "features.0.weight"]
    del state["features.1.running_var"]
    state["extra"] = torch.zeros(1)
    state["classifier.3.weight"] = torch.zeros(11, 64)
    return state, ["missing", "features.1.running_var", "unexpected", "extra", "wrong shape",
                   "classifier.3.weight"]


@pytest.mark.parametrize("kind", ["missing", "unexpected", "wrong shape", "all three"])
def test_load_weights_names_the_keys_that_do_not_fit(kind: str) -> None:
    backend = TorchBackend(build_model(ModelSpec("small", 1, (8, 8), 10)),
                           ReactionSpec(gradcam_layer("small")))
    before = {key: value.clone() for key, value in backend.model.state_dict().items()}
    state, words = _mismatched(kind)
    with pytest.raises(InputError) as raised:
        backend.load_weights(state)
    for word in words:
        assert word in str(raised.value)
    for key, value in backend.model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed by a refused load"


def test_cpu_sub_batches_under_the_activation_budget_change_no_value(monkeypatch) -> None:
    case = CASES["small"]
    backend = _backend(case)
    backend.load_weights(make_checkpoint(case.build, case.input_shape, case.classes, 51))
    images, labels = random_batch(50, case.input_shape, case.classes, 51)
    whole = backend.compute(images, labels, keep_maps=True)
    # 16 channels x 6 x 6 float32 = 2304 bytes is the largest activation of one 8x8 image
    monkeypatch.setattr("analyzer.torch_backend.cpu_activation_budget", lambda: 2304 * 7)
    assert backend._sub_batch_size(images) == 7
    cut = backend.compute(images, labels, keep_maps=True)
    assert torch.equal(cut.empty, whole.empty)
    for name in ("logits", "reaction", "cam"):  # kernels block by batch size: float32 rounding
        torch.testing.assert_close(getattr(cut, name), getattr(whole, name), rtol=1e-5,
                                   atol=1e-7, msg=name)


@pytest.mark.parametrize("case_name", ["small", "model1-36x60"])
def test_channels_last_on_cpu_gives_the_default_layouts_results(case_name: str) -> None:
    case = CASES[case_name]
    weights = make_checkpoint(case.build, case.input_shape, case.classes, 61)
    images, labels = random_batch(60, case.input_shape, case.classes, 61)
    default = _backend(case)
    default.load_weights(weights)
    fast = TorchBackend(case.build(), ReactionSpec(case.layer), "cpu", channels_last=True)
    fast.load_weights(weights)
    assert fast.channels_last
    expected, got = default.compute(images, labels), fast.compute(images, labels)
    assert torch.equal(got.empty, expected.empty)
    torch.testing.assert_close(got.reaction, expected.reaction, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-6)


class FeatureMapNet(nn.Module):
    """A foreign model whose head flattens the feature map with ``.view`` or ``flatten``."""

    def __init__(self, flatten_with_view: bool) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(6, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8 * 6 * 7, 4)
        self.flatten_with_view = flatten_with_view

    def forward(self, x: Tensor) -> Tensor:
        maps = self.features(x)
        flat = maps.view(len(maps), -1) if self.flatten_with_view else maps.flatten(1)
        return self.head(flat)


@pytest.mark.parametrize(("flatten_with_view", "kept"), [(False, True), (True, False)],
                         ids=["flatten: channels-last kept", ".view: default layout"])
def test_a_foreign_models_layout_is_chosen_on_its_first_batch(flatten_with_view, kept,
                                                              caplog) -> None:
    torch.manual_seed(0)
    model = FeatureMapNet(flatten_with_view)
    backend = TorchBackend(model, ReactionSpec("features.3"), channels_last=None)
    images, labels = torch.rand(9, 3, 6, 7), torch.randint(0, 4, (9,))
    with caplog.at_level("WARNING"):
        results = [backend.compute(images, labels, keep_maps=True) for _ in range(2)]
    assert backend.channels_last is kept
    noted = [r.getMessage() for r in caplog.records if "memory layout" in r.getMessage()]
    assert len(noted) == (0 if kept else 1)  # once per backend, not per batch
    reference = reference_grad_cam(model, "features.3", images, labels)
    for result in results:  # the deciding batch and the next give the float64 loop's values
        assert result.cam is not None
        assert_matches_reference(result.cam, result.reaction, result.empty, reference)
