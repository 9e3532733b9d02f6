"""N:M patterns: parsing, the refusals users see, option enumeration and keep_ratio derivation."""

import itertools
import math

import pytest

from tinyfusion_pl.pruning.patterns import BlockPattern, enumerate_options, group_starts


@pytest.mark.parametrize("keep, size", [(1, 1), (1, 2), (2, 4), (3, 4), (1, 4), (7, 14)])
def test_options_are_every_distinct_keep_set_of_the_group_once(keep, size):
    options = enumerate_options(keep, size)
    assert options.shape == (math.comb(size, keep), size)
    kept_sets = [tuple(row.nonzero().flatten().tolist()) for row in options]
    # brute force over all 2^M binary masks, independent of itertools.combinations
    brute = [
        tuple(i for i in range(size) if bits >> i & 1) for bits in range(2**size) if bin(bits).count("1") == keep
    ]
    assert sorted(kept_sets) == sorted(brute)
    assert kept_sets == sorted(kept_sets), "options are in lexicographic order, option 0 keeps the first N"
    assert set(options.flatten().tolist()) <= {0.0, 1.0}


def test_a_repeated_pattern_tiles_the_depth():
    assert BlockPattern.parse("2:4").groups_for_depth(12) == [(2, 4)] * 3
    assert BlockPattern.parse("7:14").groups_for_depth(28) == [(7, 14)] * 2
    assert BlockPattern.parse(" 1 : 2 ").groups_for_depth(4) == [(1, 2)] * 2


def test_an_explicit_mixed_pattern_is_kept_in_order_and_known_before_the_depth():
    pattern = BlockPattern.parse([[2, 4], [3, 4], (1, 2)])
    assert pattern.fixed_groups == [(2, 4), (3, 4), (1, 2)]
    assert pattern.groups_for_depth(10) == [(2, 4), (3, 4), (1, 2)]
    assert BlockPattern.parse(["1:2", "2:4"]).fixed_groups == [(1, 2), (2, 4)]
    assert BlockPattern.parse("1:2").fixed_groups is None
    assert group_starts([(2, 4), (3, 4), (1, 2)]) == [0, 4, 8]


@pytest.mark.parametrize(
    "keep_ratio, group_size, depth, expected",
    [
        (0.5, 2, 8, [(1, 2)] * 4),
        (0.5, 4, 8, [(2, 4)] * 2),
        (0.75, 4, 12, [(3, 4)] * 3),
        (0.5, 14, 28, [(7, 14)] * 2),
        (0.5, None, 28, [(1, 2)] * 14),  # the smallest group that realises the ratio
        (0.75, None, 28, [(3, 4)] * 7),
        (5 / 7, None, 28, [(5, 7)] * 4),
        (1.0, None, 6, [(1, 1)] * 6),
    ],
)
def test_keep_ratio_derives_the_groups(keep_ratio, group_size, depth, expected):
    groups = BlockPattern.parse(keep_ratio=keep_ratio, group_size=group_size).groups_for_depth(depth)
    assert groups == expected
    assert sum(keep for keep, _ in groups) == pytest.approx(keep_ratio * depth)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"pattern": "3:2"}, r"pattern='3:2' keeps N=3 of M=2 .* 1 <= N <= M"),
        ({"pattern": "0:4"}, r"pattern='0:4' keeps N=0 of M=4 .* 1 <= N <= M"),
        ({"pattern": "half"}, r"pattern='half' is not 'N:M'.*'2:4'"),
        ({"pattern": "2:4:8"}, r"pattern='2:4:8' is not 'N:M'"),
        ({"pattern": []}, r"pattern=\[\] is neither"),
        ({"pattern": [[2, 4], [5, 4]]}, r"pattern\[1\]=\[5, 4\] keeps N=5 of M=4"),
        ({"pattern": [[2, 4], [2]]}, r"pattern\[1\]=\[2\] is not a group \[N, M\]"),
        ({"pattern": "10:20"}, r"C\(20, 10\) = 184756 options.*smaller groups"),
        ({"pattern": "1:2", "keep_ratio": 0.5}, r"both given.*either pattern or keep_ratio"),
        ({}, r"No pattern given\. Pass pattern"),
        ({"group_size": 4}, r"group_size=4 was given without keep_ratio"),
        ({"keep_ratio": 0.0}, r"keep_ratio=0\.0 must be a number in \(0, 1\]"),
        ({"keep_ratio": 1.5}, r"keep_ratio=1\.5 must be a number in \(0, 1\]"),
        ({"keep_ratio": 0.5, "group_size": 0}, r"group_size=0 must be a positive integer"),
        (
            {"keep_ratio": 0.3, "group_size": 4},
            r"keep 1\.2 blocks per group.*realisable keep ratios are 0\.25, 0\.5, 0\.75, 1",
        ),
    ],
)
def test_invalid_patterns_are_refused_with_what_would_be_valid(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BlockPattern.parse(**kwargs)


@pytest.mark.parametrize(
    "kwargs, depth, message",
    [
        ({"pattern": "2:4"}, 10, r"'2:4' needs a depth that is a multiple of M=4.*10 blocks.*M among 1, 2, 5, 10"),
        ({"pattern": [[2, 4], [2, 4]]}, 12, r"covers 8 blocks but the block container has 12.*add up to 12"),
        ({"keep_ratio": 0.5, "group_size": 4}, 6, r"group_size=4 does not divide the depth 6.*1, 2, 3, 6"),
        ({"keep_ratio": 0.3}, 28, r"keep_ratio=0\.3 cannot be realised on 28 blocks.*0\.25.*0\.5.*0\.75"),
    ],
)
def test_groups_that_do_not_cover_the_depth_are_refused_with_valid_choices(kwargs, depth, message):
    with pytest.raises(ValueError, match=message):
        BlockPattern.parse(**kwargs).groups_for_depth(depth)


def test_every_ratio_the_refusal_lists_is_realisable():
    with pytest.raises(ValueError) as refusal:
        BlockPattern.parse(keep_ratio=0.3).groups_for_depth(12)
    listed = [float(text) for text in str(refusal.value).split(": ")[-1].rstrip(".").split(", ")]
    assert listed, "the refusal lists alternatives"
    for ratio in listed:
        groups = BlockPattern.parse(keep_ratio=ratio).groups_for_depth(12)
        assert sum(keep for keep, _ in groups) == pytest.approx(ratio * 12, abs=1e-3)
    # and nothing realisable on 12 blocks with groups of up to 4 is missing from the list
    for size, keep in itertools.product((1, 2, 3, 4), range(1, 5)):
        if keep <= size:
            assert any(math.isclose(keep / size, ratio, abs_tol=1e-3) for ratio in listed)


def test_describe_echoes_the_request_for_decision_json():
    assert BlockPattern.parse("2:4").describe() == "2:4"
    assert BlockPattern.parse([[1, 2], [2, 4]]).describe() == [[1, 2], [2, 4]]
    assert BlockPattern.parse(keep_ratio=0.5, group_size=4).describe() == {"keep_ratio": 0.5, "group_size": 4}
