"""The kept-sets a pattern admits: counted, listed in order, or drawn uniformly without listing them all.

A choice keeps N of the M blocks of every group (and every required block). The choices are numbered in
lexicographic order (group by group, the first group most significant), so choice i is computed from i alone:
a uniform sample of a huge space (C(28, 14) = 40,116,600 half-depth DiT-XL models) is a uniform sample of
numbers, unranked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from tinyfusion_pl.pruning.patterns import Group, group_starts, required_blocks_problem


def _free_blocks(groups: Sequence[Group], required_blocks: Sequence[int]) -> list[tuple[list[int], int]]:
    """Per group: the blocks it may drop or keep, and how many of them it keeps besides its required ones."""
    problem = required_blocks_problem(groups, list(required_blocks))
    if problem is not None:
        raise ValueError(f"required_blocks={sorted(required_blocks)}: {problem}.")
    free = []
    for (keep, size), start in zip(groups, group_starts(groups), strict=True):
        members = range(start, start + size)
        required = [block for block in members if block in required_blocks]
        free.append(([block for block in members if block not in required_blocks], keep - len(required)))
    return free


def count_choices(groups: Sequence[Group], required_blocks: Sequence[int] = ()) -> int:
    """How many kept-sets the groups admit."""
    return math.prod(math.comb(len(blocks), keep) for blocks, keep in _free_blocks(groups, required_blocks))


def _unrank_combination(index: int, items: Sequence[int], keep: int) -> list[int]:
    """The `index`-th `keep`-subset of `items` in lexicographic order."""
    chosen, start = [], 0
    for remaining in range(keep, 0, -1):
        for position in range(start, len(items)):
            starting_here = math.comb(len(items) - position - 1, remaining - 1)
            if index < starting_here:
                chosen.append(items[position])
                start = position + 1
                break
            index -= starting_here
    return chosen


def choice_at(index: int, groups: Sequence[Group], required_blocks: Sequence[int] = ()) -> tuple[int, ...]:
    """The kept blocks (sorted global indices) of choice number `index` in lexicographic order."""
    free = _free_blocks(groups, required_blocks)
    counts = [math.comb(len(blocks), keep) for blocks, keep in free]
    if not 0 <= index < math.prod(counts):
        raise ValueError(f"index={index} is outside the {math.prod(counts)} choices of groups {list(groups)}.")
    kept = sorted(required_blocks)
    for (blocks, keep), later in zip(free, [math.prod(counts[position + 1:]) for position in range(len(counts))],
                                     strict=True):
        group_index, index = divmod(index, later)
        kept.extend(_unrank_combination(group_index, blocks, keep))
    return tuple(sorted(kept))


def ground_truth_choices(
    groups: Sequence[Group], max_choices: int, seed: int = 0, required_blocks: Sequence[int] = ()
) -> tuple[list[tuple[int, ...]], int]:
    """Every admissible choice when there are at most `max_choices`, else a uniform sample of that many without
    repeats (reproducible from `seed`; the sample of a smaller max_choices is part of it), in lexicographic order;
    and the number of admissible choices."""
    if isinstance(max_choices, bool) or not isinstance(max_choices, int) or max_choices < 1:
        raise ValueError(f"max_choices={max_choices!r} must be a positive integer (how many choices to recover).")
    total = count_choices(groups, required_blocks)
    if total <= max_choices:
        indices = range(total)
    else:
        # the first max_choices distinct numbers of a seeded uniform stream: a uniform sample without a list of all
        # choices, and nested, so that a larger max_choices extends a study instead of replacing it
        generator, drawn = np.random.default_rng(seed), {}
        while len(drawn) < max_choices:
            drawn.setdefault(int(generator.integers(0, total)), None)
        indices = sorted(drawn)
    return [choice_at(index, groups, required_blocks) for index in indices], total


def admits(kept_blocks: Sequence[int], groups: Sequence[Group]) -> bool:
    """Whether a kept-set keeps exactly N blocks of every (N, M) group."""
    kept = set(kept_blocks)
    return all(len(kept & set(range(start, start + size))) == keep
               for (keep, size), start in zip(groups, group_starts(groups), strict=True)) \
        and kept <= set(range(sum(size for _, size in groups)))
