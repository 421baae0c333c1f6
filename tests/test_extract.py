"""Epoch picking (METHOD.md §4) on hand-built series, answers worked out in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest

from analyzer.extract import (
    SWEEP_THRESHOLDS,
    AutoAnswer,
    Extraction,
    accuracy_at,
    auto_criterion,
    auto_threshold_epoch,
    auto_window,
    best_accuracy,
    extract,
    format_table,
    minimum_epoch,
    none_notes,
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


# --- --window auto (issue 16) ---------------------------------------------------------------
#
# w = min(100, max(10, ⌊n/10⌋), ⌊m/2⌋), n analysed values, m values from the peak to the end.
# Exact one-sided p-values are checked against a count written here: with no ties, the number
# of concordant pairs C (i < j, V_i < V_j) of a random order of w values has the Mahonian
# distribution (permutations by inversions), so p = P(C ≤ c) = Σ_{k ≤ c} I(w, k) / w!.


def mahonian(size: int) -> list[int]:
    """I(size, k), k = 0 … size(size−1)/2: permutations of ``size`` items with k inversions."""
    counts = [1]
    for items in range(2, size + 1):
        grown = [0] * (len(counts) + items - 1)
        for k, count in enumerate(counts):
            for extra in range(items):
                grown[k + extra] += count
        counts = grown
    return counts


def exact_decrease_p(window: list[float]) -> float:
    """P(C ≤ c) under no trend, c the concordant pairs of ``window`` (no ties), by counting."""
    concordant = sum(1 for i in range(len(window)) for j in range(i + 1, len(window))
                     if window[i] < window[j])
    return sum(mahonian(len(window))[:concordant + 1]) / math.factorial(len(window))


@pytest.mark.parametrize(("n", "m", "expected"), [
    (1000, 900, 100),   # ⌊n/10⌋ = 100, ⌊m/2⌋ = 450: the thesis's 100
    (5000, 4000, 100),  # never more than 100
    (1000, 150, 75),    # a late peak: ⌊150/2⌋ = 75
    (300, 200, 30),     # a tenth of the run
    (150, 100, 15),
    (100, 21, 10),      # max(10, 10), ⌊21/2⌋ = 10
    (40, 31, 10),       # short run: the floor 10 beats ⌊40/10⌋ = 4, below ⌊31/2⌋ = 15
    (100, 19, None),    # ⌊19/2⌋ = 9 < 10: no window
])
def test_auto_window_rule(n, m, expected):
    assert auto_window(n, m) == expected


# Peak at 80 % of a 100-epoch run. Epochs 1-80: V = epoch (peak 80 at epoch 80); 81-89: 78, 76,
# …, 62 (the fall); 90-100: 50, 51, …, 60 (a slow rise below the fall). n = 100, m = 21 (epochs
# 80-100): w = min(100, max(10, 10), 10) = 10. The window ending at epoch 89 + j (j = 0 … 11)
# holds 10 − j falling values and j rising ones, all below the falling ones, so its concordant
# pairs are exactly the pairs among the rising values: c = j(j−1)/2.
#   j = 5 (epoch 94): c = 10, p = (1 + 9 + 44 + 155 + 440 + 1068 + 2298 + 4489 + 8095 + 13640
#                     + 21670) / 10! = 51909 / 3628800 = 0.0143 < 0.05: still decreasing;
#   j = 6 (epoch 95): c = 15, p = 392588 / 10! = 0.108 ≥ 0.05: stopped → epoch 95.
# The minimum after the peak is 50 at epoch 90. With --window 100 (today's behaviour) the window
# is the 21 values from the peak, one test at epoch 100: c = 11·10/2 = 55 of 210 pairs,
# p = Σ_{k ≤ 55} I(21, k) / 21! = 0.00104: still decreasing → none.
PEAK_AT_80 = np.r_[np.arange(1.0, 81), np.arange(78.0, 61, -2), np.arange(50.0, 61)]


def test_auto_window_answers_on_a_peak_at_80_percent_of_the_run():
    epochs = epochs_of(PEAK_AT_80)
    assert PEAK_AT_80.size == 100 and int(np.argmax(PEAK_AT_80)) + 1 == 80
    assert exact_decrease_p(list(PEAK_AT_80[84:94])) == pytest.approx(51909 / 3628800)
    assert exact_decrease_p(list(PEAK_AT_80[85:95])) == pytest.approx(392588 / 3628800)
    assert auto_criterion(epochs, PEAK_AT_80) == AutoAnswer(95, 10, None)
    assert minimum_epoch(epochs, PEAK_AT_80, after_peak=True) == 90


def test_a_fixed_window_keeps_todays_answer_and_says_why_there_is_none():
    p_value = exact_decrease_p(list(PEAK_AT_80[79:]))
    assert p_value == pytest.approx(0.00104, abs=5e-6)
    answer = auto_criterion(epochs_of(PEAK_AT_80), PEAK_AT_80, 100)
    assert answer == AutoAnswer(None, 21, "still decreasing at the last epoch 100: trend test "
                                f"p = {p_value:.2g} < 0.05 over the last 21 analysed epochs "
                                "(80–100)")
    assert auto_threshold_epoch(epochs_of(PEAK_AT_80), PEAK_AT_80, 100) is None


# A plateau: V = 1 … 10 at epochs 1-10, then 10 at epochs 11-40. The maximum 10 first comes at
# epoch 10 (ties go to the earliest epoch): m = 31, n = 40, w = min(100, max(10, 4), 15) = 10.
# The first full window, epochs 10-19, is constant: nothing decreases → epoch 19. The minimum
# after the peak: all 10, the earliest → epoch 11.
PLATEAU = np.r_[np.arange(1.0, 11), np.full(30, 10.0)]


def test_auto_window_on_a_plateau():
    assert auto_criterion(epochs_of(PLATEAU), PLATEAU) == AutoAnswer(19, 10, None)
    assert minimum_epoch(epochs_of(PLATEAU), PLATEAU, after_peak=True) == 11


def test_a_series_still_rising_has_a_reason_not_an_epoch():
    rising = np.arange(1.0, 51)
    reason = "still rising: the maximum is at the last analysed epoch (50)"
    assert auto_criterion(epochs_of(rising), rising) == AutoAnswer(None, None, reason)
    rows = extract("reaction:train", epochs_of(rising), rising, auto=True, after_peak=True)
    assert [(r.criterion, r.epoch, r.reason) for r in rows] == [
        ("auto", None, reason), ("minimum", None, reason)]


def test_a_loss_still_falling_says_where_and_how_significant():
    # Loss (no peak rule): V = 99, 98, …, 50 at epochs 1-50; n = m = 50,
    # w = min(100, max(10, 5), 25) = 10. Every window is strictly decreasing: c = 0,
    # p = 1/10! = 2.8e-07 → none; the last window is epochs 41-50.
    falling = 100.0 - np.arange(1, 51)
    assert 1 / math.factorial(10) == pytest.approx(2.756e-7, rel=1e-3)
    assert auto_criterion(epochs_of(falling), falling, after_peak=False) == AutoAnswer(
        None, 10, "still decreasing at the last epoch 50: trend test p = 2.8e-07 < 0.05 over "
                  "the last 10 analysed epochs (41–50)")


def test_too_few_epochs_after_the_peak_name_the_count_and_the_need():
    # Peak at epoch 90 of 100: m = 11 (epochs 90-100), ⌊11/2⌋ = 5 < 10.
    values = np.r_[np.arange(1.0, 91), np.arange(89.0, 79, -1)]
    assert auto_criterion(epochs_of(values), values) == AutoAnswer(
        None, None, "only 11 analysed epochs from the peak at epoch 90 to the end; the trend "
                    "test of --window auto needs at least 20")
    # A fixed window with fewer than 4 values from the peak: the test can never be significant.
    assert auto_criterion(epochs_of([1, 5, 4, 3]), np.array([1.0, 5, 4, 3]), 100) == AutoAnswer(
        None, None, "only 3 analysed epochs from the peak at epoch 2 to the end; the trend test "
                    "needs at least 4")
    assert auto_criterion(np.array([], int), np.array([])) == AutoAnswer(
        None, None, "the series has no analysed values")


# A noisy one (fixed by hand, no ties): 30 epochs, the peak 9.0 at epoch 6, then a noisy fall
# and a noisy floor. n = 30, m = 25 (epochs 6-30): w = min(100, max(10, 3), 12) = 10; the first
# full window ends at epoch 15. Counted by hand:
#   epochs 17-26 (3.6 2.2 2.9 2.0 2.6 1.7 2.4 1.9 2.3 1.8): concordant pairs 0+4+0+3+0+4+0+1+0
#     = 12, p = Σ_{k ≤ 12} I(10, k) / 10! = 131635 / 3628800 = 0.0363 < 0.05: decreasing;
#   epochs 18-27 (2.2 2.9 2.0 2.6 1.7 2.4 1.9 2.3 1.8 2.5): 5+0+4+0+5+1+2+1+1 = 19,
#     p = 0.300: stopped → epoch 27.
# The windows ending at epochs 15-25 have c ≤ 12 as well (the loop below counts them).
NOISY = np.array([1.0, 3.2, 5.1, 6.9, 8.2, 9.0, 8.1, 8.6, 7.0, 7.4, 6.1, 5.2, 5.9, 4.4, 4.0,
                  3.1, 3.6, 2.2, 2.9, 2.0, 2.6, 1.7, 2.4, 1.9, 2.3, 1.8, 2.5, 2.1, 1.6, 2.2])


def test_auto_window_on_a_noisy_series_matches_a_window_by_window_count():
    assert int(np.argmax(NOISY)) + 1 == 6 and auto_window(30, 25) == 10
    expected = None
    for end in range(5 + 10, 31):  # the window of epochs end−9 … end, all from epoch 6 on
        if not exact_decrease_p(list(NOISY[end - 10:end])) < 0.05:
            expected = end
            break
    assert expected == 27
    assert exact_decrease_p(list(NOISY[16:26])) == pytest.approx(131635 / 3628800)
    assert exact_decrease_p(list(NOISY[17:27])) == pytest.approx(
        sum(mahonian(10)[:20]) / math.factorial(10))
    assert sum(mahonian(10)[:20]) / math.factorial(10) == pytest.approx(0.300, abs=5e-4)
    assert auto_criterion(epochs_of(NOISY), NOISY) == AutoAnswer(27, 10, None)
    # Rank-based: a series scaled by 1e-7 (Reaction-sized values) gives the same epoch.
    assert auto_threshold_epoch(epochs_of(NOISY), NOISY * 1e-7) == 27


def test_every_none_row_carries_a_reason_and_the_table_lists_them():
    rising = np.arange(1.0, 51)
    rows = extract("reaction:train", epochs_of(rising), rising, thresholds=[0.1, 0.2],
                   auto=True, after_peak=True)
    assert all(row.epoch is None and row.reason for row in rows)
    assert none_notes(rows) == [
        "none: reaction:train threshold at 2 of 2 T (0.10…0.20): no step down smaller than T "
        "times its window's standard deviation in 50 analysed epochs",
        "none: reaction:train auto: still rising: the maximum is at the last analysed epoch (50)",
        "none: reaction:train minimum: still rising: the maximum is at the last analysed epoch "
        "(50)"]


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
