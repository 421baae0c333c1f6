"""Epoch picking (METHOD.md §4) on hand-built series, answers worked out in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest

from analyzer.extract import (
    SWEEP_THRESHOLDS,
    Extraction,
    accuracy_at,
    auto_threshold_epoch,
    best_accuracy,
    extract,
    format_table,
    minimum_epoch,
    step_ratios,
    sweep,
    threshold_epoch,
)


def epochs_of(values) -> np.ndarray:
    return np.arange(1, len(values) + 1)


# V = 0, 4, 2, 1 (epochs 1-4). With window 3:
#   i=2: V rises 0 → 4: rejected whatever T.
#   i=3: window {0, 4, 2}, mean 2, S = sqrt((4+4+0)/3) = sqrt(8/3) = 1.633;
#        |2 − 4| / S = 2 / 1.633 = 1.2247: a decrease, but a large one.
#   i=4: window {4, 2, 1}, mean 7/3, S = sqrt((25/9 + 1/9 + 16/9)/3) = sqrt(14)/3 = 1.2472;
#        |1 − 2| / S = 3/sqrt(14) = 0.8018.
# With window 4, i=4 sees {0, 4, 2, 1}: mean 7/4, S = sqrt((49+81+1+9)/16/4) = sqrt(35)/4,
#        ratio = 4/sqrt(35) = 0.6761.
RAMP = [0.0, 4.0, 2.0, 1.0]


def test_step_ratios_match_the_hand_derivation():
    np.testing.assert_allclose(step_ratios(np.array(RAMP), 3),
                               [math.inf, math.inf, 2 / math.sqrt(8 / 3), 3 / math.sqrt(14)])
    assert step_ratios(np.array(RAMP), 4)[3] == pytest.approx(4 / math.sqrt(35))


@pytest.mark.parametrize(("threshold", "expected"), [
    (0.80, None),   # 0.8018 is not < 0.80: a decrease too large for T rejects
    (0.81, 4),      # 0.8018 < 0.81
    (1.00, 4),      # epoch 3 (1.2247) is still too large
    (1.30, 3),      # 1.2247 < 1.30: the earlier epoch 3 wins
])
def test_threshold_criterion_accepts_only_decreases_smaller_than_t_deviations(threshold,
                                                                              expected):
    assert threshold_epoch(epochs_of(RAMP), np.array(RAMP), threshold, window=3) == expected


def test_threshold_criterion_needs_a_decrease_not_an_increase_of_the_same_size():
    # {0, 10, 9.5}: mean 6.5, S = sqrt((42.25 + 12.25 + 9)/3) = 4.6007; |Δ| / S = 0.1087.
    assert threshold_epoch(epochs_of([0, 1, 2]), np.array([0, 10, 9.5]), 0.3) == 3
    # {0, 10, 10.5}: the same |Δ| / S (0.1087 < 0.3), but V_{i-1} < V_i: rejected.
    assert threshold_epoch(epochs_of([0, 1, 2]), np.array([0, 10, 10.5]), 0.3) is None
    # {0, 10, 10}: |Δ| = 0 < T·S, but V_{i-1} = V_i is no decrease: rejected.
    assert threshold_epoch(epochs_of([0, 1, 2]), np.array([0, 10, 10.0]), 1.0) is None


def test_a_constant_window_never_accepts():
    # S = 0 and no decrease anywhere: nothing to divide by and nothing accepted.
    assert threshold_epoch(epochs_of([5] * 6), np.full(6, 5.0), 1.0) is None
    assert np.isinf(step_ratios(np.full(6, 5.0), 3)).all()


def test_second_epoch_can_never_pass_a_threshold_up_to_one():
    # A window of two values {a, b} has S = |a − b| / 2, so the ratio is exactly 2 for any
    # decrease at i = 2 (and for every i when the window is 2).
    assert step_ratios(np.array([3.0, 1.0]), 100)[1] == 2.0
    assert threshold_epoch(epochs_of([1, 2]), np.array([3.0, 1.0]), 1.0) is None
    assert threshold_epoch(epochs_of(RAMP), np.array(RAMP), 1.0, window=2) is None
    assert threshold_epoch(epochs_of([1, 2]), np.array([3.0, 1.0]), 2.5) == 2  # T > 2 would


def test_window_clipping_uses_only_the_last_window_values():
    # i=4 has ratio 0.8018 with window 3 but 0.6761 with window 4 (see RAMP above).
    assert threshold_epoch(epochs_of(RAMP), np.array(RAMP), 0.7, window=3) is None
    assert threshold_epoch(epochs_of(RAMP), np.array(RAMP), 0.7, window=4) == 4


def test_a_series_shorter_than_the_window_uses_all_its_values():
    assert threshold_epoch(epochs_of(RAMP), np.array(RAMP), 0.7, window=100) == 4
    assert threshold_epoch(np.array([7]), np.array([1.0]), 1.0) is None
    assert threshold_epoch(np.array([], int), np.array([]), 1.0) is None


def test_nan_gaps_are_dropped_and_real_epochs_reported():
    # Epochs 3 and 5 were not analysed: the series is RAMP at epochs 1, 2, 4, 6.
    values = np.array([0.0, 4.0, np.nan, 2.0, np.nan, 1.0])
    assert threshold_epoch(epochs_of(values), values, 0.9, window=3) == 6
    assert threshold_epoch(epochs_of(values), values, 1.3, window=3) == 4
    # Epochs given out of order are sorted first.
    assert threshold_epoch(np.array([6, 4, 2, 1]), np.array([1.0, 2.0, 4.0, 0.0]), 0.9,
                           window=3) == 6


def test_sweep_covers_one_hundred_thresholds_in_order():
    assert len(SWEEP_THRESHOLDS) == 100
    assert SWEEP_THRESHOLDS[0] == 0.01 and SWEEP_THRESHOLDS[-1] == 1.0
    picks = sweep(epochs_of(RAMP), np.array(RAMP), window=3)
    assert len(picks) == 100
    # Below 0.8018 nothing passes; from T = 0.81 on, epoch 4 (epoch 3 needs T > 1.2247).
    assert picks[79] is None and picks[80] == 4 and picks[99] == 4
    assert picks == [threshold_epoch(epochs_of(RAMP), np.array(RAMP), t, 3)
                     for t in SWEEP_THRESHOLDS]


def test_invalid_arguments_are_refused():
    with pytest.raises(ValueError, match="threshold"):
        threshold_epoch(epochs_of(RAMP), np.array(RAMP), 0.0)
    with pytest.raises(ValueError, match="window"):
        threshold_epoch(epochs_of(RAMP), np.array(RAMP), 0.5, window=1)
    with pytest.raises(ValueError, match="twice"):
        threshold_epoch(np.array([1, 1]), np.array([1.0, 0.0]), 0.5)
    with pytest.raises(ValueError, match="values"):
        threshold_epoch(np.array([1, 2]), np.array([1.0]), 0.5)


# Minimum criterion. V = 1, 5, 2, 3, 1.5, 4: the overall minimum is 1 at epoch 1; the peak is
# 5 at epoch 2, and after it the minimum is 1.5 at epoch 5.
PEAKED = [1.0, 5.0, 2.0, 3.0, 1.5, 4.0]


def test_minimum_criterion_for_loss_is_the_overall_minimum():
    assert minimum_epoch(epochs_of(PEAKED), np.array(PEAKED), after_peak=False) == 1


def test_minimum_criterion_for_reaction_ignores_the_epochs_before_the_peak():
    assert minimum_epoch(epochs_of(PEAKED), np.array(PEAKED), after_peak=True) == 5


def test_minimum_ties_go_to_the_earliest_epoch():
    assert minimum_epoch(epochs_of([3, 1, 2, 1]), np.array([3.0, 1, 2, 1]), False) == 2
    # Two equal peaks: the first one counts, so its minimum after is found after epoch 1.
    assert minimum_epoch(epochs_of([5, 1, 5, 0]), np.array([5.0, 1, 5, 0]), True) == 4


def test_minimum_after_a_peak_at_the_last_epoch_is_none():
    assert minimum_epoch(epochs_of([1, 2, 3]), np.array([1.0, 2, 3]), after_peak=True) is None
    assert minimum_epoch(epochs_of([1, 2, 3]), np.array([1.0, 2, 3]), after_peak=False) == 1
    assert minimum_epoch(np.array([], int), np.array([]), after_peak=False) is None


def test_minimum_skips_nan_gaps():
    values = np.array([1.0, 5.0, np.nan, 2.0, 1.5, np.nan])
    assert minimum_epoch(epochs_of(values), values, after_peak=True) == 5


# Auto criterion with window 4 and α = 0.05: Kendall's exact one-sided p-value of a strictly
# decreasing window of 4 is 1/4! = 0.0417 < 0.05; one pair out of order already gives
# (1 + 3)/24 = 0.167. So a window of 4 "is still decreasing" exactly when strictly decreasing.
# V = 1, 5, 4, 3, 2, 1.5, 1.6, 1.4, peak at epoch 2:
#   window ending at epoch 5 {5, 4, 3, 2}: decreasing; epoch 6 {4, 3, 2, 1.5}: decreasing;
#   epoch 7 {3, 2, 1.5, 1.6}: not strictly decreasing → accepted: epoch 7.
AUTO = [1.0, 5.0, 4.0, 3.0, 2.0, 1.5, 1.6, 1.4]


def test_auto_criterion_accepts_the_first_window_after_the_peak_that_stops_decreasing():
    assert auto_threshold_epoch(epochs_of(AUTO), np.array(AUTO), 4) == 7


def test_auto_criterion_without_the_peak_rule_starts_at_the_first_epoch():
    # Window ending at epoch 4 is {1, 5, 4, 3}: not decreasing.
    assert auto_threshold_epoch(epochs_of(AUTO), np.array(AUTO), 4, after_peak=False) == 4


def test_auto_criterion_is_none_while_the_series_still_decreases():
    ramp = np.arange(10, 0, -1, dtype=float)
    assert auto_threshold_epoch(epochs_of(ramp), ramp, 4) is None


def test_auto_criterion_accepts_a_constant_window():
    # Kendall's tau is undefined (NaN) for a constant window: nothing decreases there.
    assert auto_threshold_epoch(epochs_of([5] * 4), np.full(4, 5.0), 4) == 4


def test_auto_criterion_cannot_decide_on_too_few_values():
    # Three values after the peak, or a window of 3: even a strict decrease has p = 1/6.
    assert auto_threshold_epoch(epochs_of([1, 5, 4, 3]), np.array([1.0, 5, 4, 3]), 100) is None
    assert auto_threshold_epoch(epochs_of(AUTO), np.array(AUTO), 3) is None
    assert auto_threshold_epoch(np.array([], int), np.array([]), 100) is None


def test_auto_criterion_clips_the_window_to_a_short_series_and_keeps_real_epochs():
    # Window 100 but only 7 values from the peak on: one test on {5, 4, 3, 2, 1.5, 1.6, 1.4}
    # (p of tau = -19/21 ≈ 0.0014 decreasing) → None; with a NaN gap the epochs are real.
    assert auto_threshold_epoch(epochs_of(AUTO), np.array(AUTO), 100) is None
    values = np.array([1.0, 5.0, np.nan, 4.0, 3.0, 2.0, 1.5, 1.6, 1.4])
    assert auto_threshold_epoch(epochs_of(values), values, 4) == 8


def test_auto_criterion_is_blind_to_the_scale_of_the_series():
    scaled = np.array(AUTO) * 1e-7
    assert auto_threshold_epoch(epochs_of(AUTO), scaled, 4) == 7


def test_accuracy_lookup_and_best_accuracy():
    epochs, accuracy = np.array([1, 2, 4]), np.array([0.5, 0.9, np.nan])
    assert accuracy_at(epochs, accuracy, 2) == 0.9
    assert accuracy_at(epochs, accuracy, 3) is None   # not analysed
    assert accuracy_at(epochs, accuracy, 4) is None   # NaN
    assert accuracy_at(epochs, accuracy, None) is None
    assert best_accuracy(np.array([1, 2, 3]), np.array([0.5, 0.9, 0.9])) == (2, 0.9)
    assert best_accuracy(np.array([1]), np.array([np.nan])) is None


def test_extract_rows_come_in_order_with_the_test_accuracy_at_each_epoch():
    rows = extract("reaction:train", epochs_of(PEAKED), np.array(PEAKED), thresholds=[0.5],
                   auto=True, after_peak=True, window=3, test_epochs=np.array([1, 5]),
                   test_accuracy=np.array([0.1, 0.8]))
    assert [r.criterion for r in rows] == ["threshold", "auto", "minimum"]
    assert rows[0].threshold == 0.5 and rows[1].threshold is None
    assert rows[2] == Extraction("reaction:train", "minimum", None, 5, 0.8)
    assert rows[2].to_json() == {"series": "reaction:train", "criterion": "minimum",
                                 "threshold": None, "window": None, "epoch": 5,
                                 "reason": None, "test_accuracy": 0.8}
    assert rows[0].window == 3


def test_table_says_none_and_shows_percentages():
    rows = [Extraction("loss:val", "threshold", 0.3, None, None, 100, "no step"),
            Extraction("loss:val", "minimum", None, 12, 0.975)]
    lines = format_table(rows, (40, 0.9825)).splitlines()
    assert lines[0].split()[:5] == ["series", "criterion", "threshold", "window", "epoch"]
    assert lines[1].split() == ["loss:val", "threshold", "0.30", "100", "none", "-", "98.25",
                                "(40)"]
    assert lines[2].split() == ["loss:val", "minimum", "-", "-", "12", "97.50", "98.25", "(40)"]
    assert lines[3:] == ["none: loss:val threshold T=0.30: no step"]
