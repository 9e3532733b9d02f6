"""The recoverability study's numbers against reference functions written from the formulas, on planted cases."""

import itertools
import math

import numpy as np
import pytest
import torch

from tinyfusion_pl.evaluation.digits_classifier import DigitsClassifier
from tinyfusion_pl.evaluation.fid import digits_fid
from tinyfusion_pl.evaluation.recoverability import analyze, spread_labels
from tinyfusion_pl.evaluation.statistics import (
    fid_from_features,
    gaussian_statistics,
    kendall_tau,
    kendall_tau_with_interval,
    place,
    t_interval,
)
from tinyfusion_pl.pruning.choices import admits, choice_at, count_choices, ground_truth_choices

# --------------------------------------------------------------------------- reference functions


def reference_tau_b(x, y):
    """Kendall's tau-b by counting pairs: (C - D) / sqrt((n0 - n1)(n0 - n2))."""
    concordant = discordant = ties_x = ties_y = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
        if dx == 0 and dy == 0:
            ties_x, ties_y = ties_x + 1, ties_y + 1
        elif dx == 0:
            ties_x += 1
        elif dy == 0:
            ties_y += 1
        elif dx == dy:
            concordant += 1
        else:
            discordant += 1
    pairs = len(x) * (len(x) - 1) // 2
    return (concordant - discordant) / math.sqrt((pairs - ties_x) * (pairs - ties_y))


def reference_percentile(values, chosen, lower_is_better=True):
    """The share of the other values that `values[chosen]` beats, a tie counting half, in percent; rank, regret."""
    sign = 1 if lower_is_better else -1
    own = sign * values[chosen]
    others = [sign * value for index, value in enumerate(values) if index != chosen]
    beaten = sum(1.0 if own < other else 0.5 if own == other else 0.0 for other in others)
    rank = 1 + sum(other < own for other in others)
    return rank, 100.0 * beaten / len(others), own - min(sign * value for value in values)


def reference_percentile_interval(replicates, level):
    ordered = np.sort(replicates)
    return np.percentile(ordered, 50 * (1 - level)), np.percentile(ordered, 100 - 50 * (1 - level))


# --------------------------------------------------------------------------- statistics


def test_placement_matches_the_reference_on_random_values_with_ties():
    generator = np.random.default_rng(0)
    for _ in range(50):
        values = list(generator.integers(0, 6, size=9).astype(float))  # many ties
        chosen = int(generator.integers(0, 9))
        for lower in (True, False):
            placement = place(dict(enumerate(values)), chosen, lower_is_better=lower)
            rank, percentile, regret = reference_percentile(values, chosen, lower)
            assert (placement.rank, placement.size) == (rank, 9)
            assert placement.percentile == pytest.approx(percentile) and placement.regret == pytest.approx(regret)


def test_placement_of_the_best_and_the_worst():
    values = {"a": 3.0, "b": 1.0, "c": 2.0}
    assert place(values, "b").as_dict() == {"rank": 1, "percentile": 100.0, "regret": 0.0, "size": 3}
    assert place(values, "a").as_dict() == {"rank": 3, "percentile": 0.0, "regret": 2.0, "size": 3}
    assert place(values, "a", lower_is_better=False).percentile == 100.0
    with pytest.raises(ValueError, match="not among the 3 measured choices"):
        place(values, "d")


def test_kendall_tau_matches_pair_counting_with_and_without_ties():
    generator = np.random.default_rng(1)
    for _ in range(30):
        x, y = generator.integers(0, 5, size=12).astype(float), generator.normal(size=12)
        y[:3] = y[3]  # ties on both sides
        assert kendall_tau(x, y) == pytest.approx(reference_tau_b(x, y))
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))


def test_kendall_tau_interval_is_the_percentile_bootstrap_over_choices():
    generator = np.random.default_rng(2)
    x = generator.normal(size=15)
    y = x + generator.normal(scale=0.8, size=15)
    tau, interval = kendall_tau_with_interval(x, y, replicates=300, seed=7, level=0.9)
    rows = np.random.default_rng(7).integers(0, 15, size=(300, 15))  # the documented resampling
    replicates = []
    for row in rows:
        if np.ptp(x[row]) > 0 and np.ptp(y[row]) > 0:
            replicates.append(reference_tau_b(x[row], y[row]))
    low, high = reference_percentile_interval(np.array(replicates), 0.9)
    assert tau == pytest.approx(reference_tau_b(x, y))
    assert interval == pytest.approx((low, high))
    assert low < tau < high


def test_t_interval_uses_students_quantile():
    mean, (low, high) = t_interval([1.0, 2.0, 6.0], level=0.95)
    half = 4.302652729911275 * np.std([1.0, 2.0, 6.0], ddof=1) / math.sqrt(3)  # t(0.975, df=2) from the tables
    assert mean == pytest.approx(3.0) and (low, high) == pytest.approx((3.0 - half, 3.0 + half))
    assert t_interval([5.0]) == (5.0, None)


def test_fid_from_features_matches_the_fid_scorer(tmp_path):
    torch.manual_seed(0)
    scorer = digits_fid(DigitsClassifier(8), image_size=8)
    reference = torch.randint(0, 256, (300, 8, 8, 1), dtype=torch.uint8)
    images = torch.randint(0, 200, (200, 8, 8, 1), dtype=torch.uint8)
    scorer.set_reference(reference)
    expected = scorer.score(images)
    measured = fid_from_features(scorer.features(images).numpy(), *gaussian_statistics(scorer.features(reference).numpy()))
    assert measured == pytest.approx(expected, rel=1e-4, abs=1e-6)


# --------------------------------------------------------------------------- the admissible kept-sets


@pytest.mark.parametrize("groups", [[(4, 8)], [(2, 4), (2, 4)], [(1, 2)] * 4, [(1, 2), (2, 3), (1, 3)]])
def test_choices_are_every_admissible_kept_set_in_lexicographic_order(groups):
    depth = sum(size for _, size in groups)
    expected = [choice for choice in itertools.combinations(range(depth), sum(keep for keep, _ in groups))
                if admits(choice, groups)]
    assert count_choices(groups) == len(expected)
    assert [choice_at(index, groups) for index in range(len(expected))] == sorted(expected)
    assert ground_truth_choices(groups, max_choices=1000) == (sorted(expected), len(expected))


def test_required_blocks_are_in_every_choice():
    groups = [(2, 4), (2, 4)]
    choices, total = ground_truth_choices(groups, max_choices=100, required_blocks=[7])
    assert total == 6 * 3 and all(7 in choice for choice in choices) and len(set(choices)) == total


def test_a_large_space_is_sampled_uniformly_without_repeats_and_reproducibly():
    groups = [(14, 28)]  # 40,116,600 half-depth DiT-XL models: sampled, never listed
    choices, total = ground_truth_choices(groups, max_choices=100, seed=3)
    assert total == math.comb(28, 14) and len(choices) == 100 == len(set(choices))
    assert choices == sorted(choices) and all(admits(choice, groups) for choice in choices)
    assert ground_truth_choices(groups, max_choices=100, seed=3)[0] == choices
    assert ground_truth_choices(groups, max_choices=100, seed=4)[0] != choices
    assert set(ground_truth_choices(groups, max_choices=40, seed=3)[0]) < set(choices)  # a larger study extends it
    # uniform: over many draws from 8-of-4 (70 choices, 35 drawn), every choice is drawn about half the time
    position = {choice: index for index, choice in enumerate(itertools.combinations(range(8), 4))}
    counts = np.zeros(70)
    for seed in range(300):
        for choice in ground_truth_choices([(4, 8)], max_choices=35, seed=seed)[0]:
            counts[position[choice]] += 1
    assert abs(counts / 300 - 0.5).max() < 0.15


def test_a_bad_max_choices_is_refused():
    with pytest.raises(ValueError, match="max_choices=0 must be a positive integer"):
        ground_truth_choices([(1, 2)], max_choices=0)


# --------------------------------------------------------------------------- the analysis on a planted study


def planted_study(seeds=(0,), fid_noise=0.0):
    """Six 2-of-4 choices with known measures; the learnable selector picks under 1:2 (four of the six)."""
    keys = ["0-1", "0-2", "0-3", "1-2", "1-3", "2-3"]
    fid = {"0-1": 10.0, "0-2": 20.0, "0-3": 30.0, "1-2": 40.0, "1-3": 50.0, "2-3": 60.0}
    calibration = {"0-1": 6.0, "0-2": 5.0, "0-3": 4.0, "1-2": 3.0, "1-3": 2.0, "2-3": 1.0}  # tau = -1 with FID
    seeds_data = {}
    for seed in seeds:
        choices = {}
        for index, key in enumerate(keys):
            value = fid[key] + fid_noise * seed * (index % 2)
            choices[key] = {
                "kept_blocks": [int(block) for block in key.split("-")], "calibration_loss": calibration[key],
                "heldout_loss_pruned": calibration[key], "heldout_loss": value / 100, "heldout_losses": [value / 100] * 4,
                "fid": value, "fid_replicates": [value - 1, value, value + 1], "seconds": {"recover": 1.0},
            }
        seeds_data[seed] = {
            "choices": choices, "ground_truth": keys, "teacher": {"fid": 5.0, "heldout_loss": 0.05}, "fid": "planted",
            "selectors": {
                "learnable": {"kept_blocks": [0, 3] if seed == 0 else [1, 2], "groups": [[1, 2], [1, 2]]},
                "sensitivity": {"kept_blocks": [2, 3], "groups": [[2, 4]]},
            },
        }
    return {"model": "planted", "seeds": seeds_data, "level": 0.95, "bootstrap": 50, "enumerated": True,
            "measured": 6, "admissible": 6, "ground_truth_groups": [[2, 4]], "recover_steps": 1, "distill": "none",
            "num_samples": 3}


def test_planted_placements_within_the_selectors_own_set_and_within_all():
    analysis = analyze(planted_study())
    learnable = analysis["placements"][0]["learnable"]
    # 1:2 admits 0-2, 0-3, 1-2, 1-3 (FID 20, 30, 40, 50): [0, 3] is 2nd of those 4, 3rd of all 6
    assert learnable["own"]["fid"] == {"rank": 2, "percentile": pytest.approx(100 * 2 / 3), "regret": 10.0,
                                       "size": 4, "value": 30.0}
    assert learnable["all"]["fid"] == {"rank": 3, "percentile": pytest.approx(60.0), "regret": 20.0, "size": 6,
                                       "value": 30.0}
    sensitivity = analysis["placements"][0]["sensitivity"]  # the lowest calibration loss and the worst FID
    assert sensitivity["all"]["calibration_loss"]["rank"] == 1 and sensitivity["all"]["fid"]["rank"] == 6
    assert sensitivity["all"]["fid"]["regret"] == 50.0 and sensitivity["own"]["fid"]["size"] == 6
    assert analysis["rank_correlations"][0]["fid"]["tau"] == pytest.approx(-1.0)


def test_planted_differences_within_one_seed_use_the_paired_replicates():
    analysis = analyze(planted_study())
    row = next(row for row in analysis["differences"] if row["measure"] == "fid")
    assert (row["first"], row["second"], row["difference"]) == ("learnable", "sensitivity", -30.0)
    assert row["interval"] == pytest.approx((-30.0, -30.0)) and row["significant"]


def test_planted_summary_over_seeds_gives_t_intervals_and_paired_differences():
    analysis = analyze(planted_study(seeds=(0, 1, 2)))
    fid = analysis["summary"]["learnable"]["all"]["fid"]
    # seed 0 picks [0, 3] (3rd of 6: 60%), seeds 1 and 2 pick [1, 2] (4th of 6: 40%; the noise keeps the order)
    assert fid["percentile"]["per_seed"] == pytest.approx([60.0, 40.0, 40.0])
    mean, interval = t_interval([60.0, 40.0, 40.0])
    assert fid["percentile"]["mean"] == pytest.approx(mean) and fid["percentile"]["interval"] == pytest.approx(interval)
    row = next(row for row in analysis["differences"] if row["measure"] == "fid")
    assert row["difference"] == pytest.approx(np.mean([60.0, 40.0, 40.0]))  # sensitivity: 0 in every seed
    assert row["basis"].startswith("percentile difference, t over 3 seeds")
    assert row["significant"] == (row["interval"][0] > 0)


def test_labels_are_spread_apart_inside_the_bounds_in_order():
    positions = [0.5, 0.51, 0.52, 0.99, 0.98, 0.0]
    spread = spread_labels(positions, gap=0.1)
    ordered = sorted(range(len(positions)), key=lambda index: positions[index])
    heights = [spread[index] for index in ordered]
    assert all(b - a >= 0.1 - 1e-12 for a, b in itertools.pairwise(heights))
    assert 0.0 <= min(spread) and max(spread) <= 1.0
    assert spread_labels([0.3], gap=0.1) == [0.3]
