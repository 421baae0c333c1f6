"""The Grad-CAM math as pure functions (METHOD.md §2; thesis eq. 3.1–3.3), worked by hand.

Every expected value below is written out as a literal with the arithmetic that gives it, so a
reader can check it on paper; nothing here calls one function of the module to test another.
"""

from __future__ import annotations

import math

import pytest
import torch

from analyzer.gradcam import (
    channel_weights,
    channel_weights_after_pool,
    channel_weights_from_dense,
    grad_cam_map,
    reaction_from_map,
    target_scores,
)

# A two-channel 2×2 layer used throughout: A^0 and A^1 of one image.
A0 = [[1.0, 2.0], [3.0, 4.0]]
A1 = [[4.0, 2.0], [2.0, 0.0]]

# ∂y/∂A per channel; means are alpha_0 = (2 + 0 + 1 + 1) / 4 = 1 and
# alpha_1 = (-1 + 0 - 1 + 0) / 4 = -0.5: the gradient varies over positions, only its mean counts.
G0 = [[2.0, 0.0], [1.0, 1.0]]
G1 = [[-1.0, 0.0], [-1.0, 0.0]]

# Σ_k alpha_k A^k = A^0 - 0.5 A^1 = [[1 - 2, 2 - 1], [3 - 1, 4 - 0]] = [[-1, 1], [2, 4]];
# ReLU clips the -1: L = [[0, 1], [2, 4]], pN = 3, Reaction = (0 + 1 + 2 + 4) / 3 = 7/3.
MAP = [[0.0, 1.0], [2.0, 4.0]]


def _tensor(values: list, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


# ---- target_scores (thesis eq. 3.1) ----------------------------------------------------------

def test_logit_score_is_the_target_class_logit_of_each_image() -> None:
    logits = _tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [-7.0, 8.0, 9.0]])
    scores = target_scores(logits, torch.tensor([2, 0, 1]))
    assert scores.tolist() == [3.0, 4.0, 8.0]


def test_logit_is_the_default_score() -> None:
    logits = _tensor([[0.5, -1.5]])
    assert target_scores(logits, torch.tensor([1])).tolist() == [-1.5]


@pytest.mark.parametrize(("logits", "target", "probability"), [
    ([0.0, 0.0, 0.0, 0.0], 2, 0.25),             # four equal logits: 1/4 each
    ([0.0, math.log(3.0)], 1, 0.75),             # e^0 : e^ln3 = 1 : 3
    ([0.0, math.log(3.0)], 0, 0.25),
    ([5.0 + 0.0, 5.0 + math.log(3.0)], 1, 0.75),  # softmax ignores a common shift
])
def test_softmax_score_is_the_target_class_probability(logits: list[float], target: int,
                                                        probability: float) -> None:
    scores = target_scores(_tensor([logits]), torch.tensor([target]), score="softmax")
    assert scores.item() == pytest.approx(probability, rel=1e-6)


def test_softmax_of_a_confident_logit_saturates_to_exactly_one_in_float32() -> None:
    # e^-200 underflows to 0 in float32: the probability is exactly 1 (seed 001's empty maps).
    scores = target_scores(_tensor([[200.0, 0.0, 0.0]]), torch.tensor([0]), score="softmax")
    assert scores.item() == 1.0


def test_unknown_score_is_refused() -> None:
    with pytest.raises(ValueError, match="score"):
        target_scores(_tensor([[1.0, 2.0]]), torch.tensor([0]), score="probability")


# ---- channel_weights -------------------------------------------------------------------------

def test_channel_weights_are_the_spatial_mean_of_each_channels_gradient() -> None:
    gradients = _tensor([[G0, G1]])
    assert channel_weights(gradients).tolist() == [[1.0, -0.5]]


def test_channel_weights_are_computed_per_image() -> None:
    # image 2: channel 0 all 3 → 3; channel 1 = [[0, 0], [0, 8]] → 8 / 4 = 2.
    gradients = _tensor([[G0, G1], [[[3.0, 3.0], [3.0, 3.0]], [[0.0, 0.0], [0.0, 8.0]]]])
    assert channel_weights(gradients).tolist() == [[1.0, -0.5], [3.0, 2.0]]


def test_channel_weights_average_over_a_non_square_map() -> None:
    # one channel 1×3: (1 + 2 + 6) / 3 = 3.
    gradients = _tensor([[[[1.0, 2.0, 6.0]]]])
    assert channel_weights(gradients).tolist() == [[3.0]]


def test_channel_weights_after_a_pool_divide_the_pooled_sum_by_the_layers_size() -> None:
    # A 2×2 max pool of a 4×5 map: 2×2 pooled gradients [[1, 2], [3, -2]] and [[0, 0], [0, 4]]
    # land on 4 of the 20 entries, the rest 0: alpha = 4 / 20 = 0.2 and 4 / 20 = 0.2.
    pooled = _tensor([[[[1.0, 2.0], [3.0, -2.0]], [[0.0, 0.0], [0.0, 4.0]]]])
    assert channel_weights_after_pool(pooled, 4, 5).tolist() == [
        [pytest.approx(0.2), pytest.approx(0.2)]]


def test_channel_weights_from_a_dense_layer_sum_its_weight_per_channel() -> None:
    # T: 2 channels of 2 entries, flattened to 4 inputs of a dense layer with 2 outputs,
    # W = [[1, 2, 3, 4], [0, -1, 5, 0]], ∂y/∂z = [1, 2]: ∂y/∂T = [1, 2]·W = [1, 0, 13, 4],
    # channel sums 1 + 0 = 1 and 13 + 4 = 17, over A's 2×3 map: alpha = 1/6 and 17/6.
    weight = _tensor([[1.0, 2.0, 3.0, 4.0], [0.0, -1.0, 5.0, 0.0]])
    alpha = channel_weights_from_dense(_tensor([[1.0, 2.0]]), weight, 2, 2, 3)
    assert alpha.tolist() == [[pytest.approx(1 / 6), pytest.approx(17 / 6)]]


# ---- grad_cam_map ----------------------------------------------------------------------------

def test_grad_cam_map_clips_the_negative_part_of_the_weighted_sum() -> None:
    cam = grad_cam_map(_tensor([[A0, A1]]), _tensor([[G0, G1]]))
    assert cam.shape == (1, 2, 2)
    assert cam.tolist() == [MAP]


def test_grad_cam_map_is_all_zero_when_the_weighted_sum_is_never_positive() -> None:
    # alpha = (-1, 0.25): -A^0 + A^1/4 = [[-1 + 1, -2 + 0.5], [-3 + 0.5, -4 + 0]]
    #                                  = [[0, -1.5], [-2.5, -4]] → ReLU → all zero.
    gradients = _tensor([[[[-1.0, -1.0], [-1.0, -1.0]], [[0.0, 1.0], [0.0, 0.0]]]])
    cam = grad_cam_map(_tensor([[A0, A1]]), gradients)
    assert cam.tolist() == [[[0.0, 0.0], [0.0, 0.0]]]


def test_grad_cam_map_keeps_the_layers_own_resolution() -> None:
    # 1 channel 2×3, alpha = 2: no upsampling, 2·A clipped at 0.
    activations = _tensor([[[[1.0, -1.0, 0.5], [0.0, 2.0, -3.0]]]])
    gradients = torch.full((1, 1, 2, 3), 2.0)
    cam = grad_cam_map(activations, gradients)
    assert cam.tolist() == [[[2.0, 0.0, 1.0], [0.0, 4.0, 0.0]]]


def test_grad_cam_map_treats_each_image_with_its_own_weights() -> None:
    # image 2 swaps the channels' gradients: alpha = (-0.5, 1):
    # -0.5 A^0 + A^1 = [[-0.5 + 4, -1 + 2], [-1.5 + 2, -2 + 0]] = [[3.5, 1], [0.5, -2]].
    activations = _tensor([[A0, A1], [A0, A1]])
    gradients = _tensor([[G0, G1], [G1, G0]])
    cam = grad_cam_map(activations, gradients)
    assert cam.tolist() == [MAP, [[3.5, 1.0], [0.5, 0.0]]]


# ---- reaction_from_map (thesis eq. 3.3) ------------------------------------------------------

def test_reaction_is_the_map_sum_over_its_positive_positions() -> None:
    reaction, empty = reaction_from_map(_tensor([MAP]))
    assert reaction.item() == pytest.approx(7.0 / 3.0, rel=1e-7)
    assert empty.tolist() == [False]


def test_reaction_counts_only_positive_positions_not_the_whole_map() -> None:
    # 3×3 map, two positive entries 0.5 and 1.5: Reaction = 2 / 2 = 1 (not 2 / 9).
    cam = _tensor([[[0.0, 0.5, 0.0], [0.0, 0.0, 0.0], [1.5, 0.0, 0.0]]])
    reaction, empty = reaction_from_map(cam)
    assert reaction.tolist() == [1.0]
    assert empty.tolist() == [False]


def test_a_map_with_one_positive_entry_has_that_entry_as_its_reaction() -> None:
    cam = _tensor([[[0.0, 0.0], [0.0, 0.375]]])
    reaction, empty = reaction_from_map(cam)
    assert reaction.tolist() == [0.375]
    assert empty.tolist() == [False]


def test_an_empty_map_has_reaction_zero_and_is_flagged_empty() -> None:
    reaction, empty = reaction_from_map(torch.zeros(1, 3, 4))
    assert reaction.tolist() == [0.0]
    assert not torch.isnan(reaction).any()
    assert empty.tolist() == [True]


def test_reaction_and_empty_flags_are_per_image() -> None:
    # image 1: 7/3; image 2: empty; image 3: a constant map of 2 → 2.
    cam = _tensor([MAP, [[0.0, 0.0], [0.0, 0.0]], [[2.0, 2.0], [2.0, 2.0]]])
    reaction, empty = reaction_from_map(cam)
    assert reaction.tolist() == pytest.approx([7.0 / 3.0, 0.0, 2.0], rel=1e-7)
    assert empty.tolist() == [False, True, False]


# ---- magnitudes: the thesis shows Reactions of 1.5e-7 ----------------------------------------

def test_float32_magnitudes_near_1e_7_are_kept_through_the_whole_chain() -> None:
    # A ~ 1e-4, ∂y/∂A ~ 1e-3: alpha = (1e-3, -5e-4) and the map is 1e-3 A^0 - 5e-4 A^1 with
    # A^k scaled by 1e-4: [[-1e-7, 1e-7], [2e-7, 4e-7]] → L = [[0, 1e-7], [2e-7, 4e-7]],
    # pN = 3, Reaction = 7e-7 / 3 ≈ 2.33e-7. Float16 would flush/round these; float32 must not.
    activations = _tensor([[A0, A1]]) * 1e-4
    gradients = _tensor([[G0, G1]]) * 1e-3
    cam = grad_cam_map(activations, gradients)
    reaction, empty = reaction_from_map(cam)
    assert cam.dtype == torch.float32
    assert reaction.dtype == torch.float32
    assert cam.flatten().tolist() == pytest.approx([0.0, 1e-7, 2e-7, 4e-7], rel=1e-5, abs=1e-13)
    assert reaction.item() == pytest.approx(7e-7 / 3.0, rel=1e-5)
    assert empty.tolist() == [False]


@pytest.mark.parametrize("value", [1.5e-7, 3e-9, 1e-30])
def test_tiny_positive_map_values_count_as_positive(value: float) -> None:
    cam = torch.zeros(1, 2, 2)
    cam[0, 1, 0] = value
    cam[0, 0, 1] = value
    reaction, empty = reaction_from_map(cam)
    assert reaction.item() == pytest.approx(value, rel=1e-6)
    assert empty.tolist() == [False]


def test_float64_inputs_stay_float64() -> None:
    activations = _tensor([[A0, A1]], dtype=torch.float64)
    gradients = _tensor([[G0, G1]], dtype=torch.float64)
    reaction, _ = reaction_from_map(grad_cam_map(activations, gradients))
    assert reaction.dtype == torch.float64
    assert reaction.item() == pytest.approx(7.0 / 3.0, rel=1e-15)
