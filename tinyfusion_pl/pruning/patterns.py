"""N:M block patterns: which consecutive groups of blocks exist and which keep-options each group has."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch

from tinyfusion_pl.errors import UsageError

Group = tuple[int, int]  # (N kept, M in the group)

# Each group holds one logit per option and draws one Gumbel score per option and sample; this bound keeps
# those tables small (7:14 has 3,432 options, 8:16 has 12,870, 10:20 would have 184,756).
MAX_OPTIONS_PER_GROUP = 20_000

_RATIO_TOLERANCE = 1e-4
_PATTERN_EXAMPLES = "'1:2', '2:4', '7:14' or [[2, 4], [3, 4], ...]"


def enumerate_options(keep: int, size: int) -> torch.Tensor:
    """All C(size, keep) binary keep-masks of one group, (C, size) float, in lexicographic order of kept indices."""
    combinations = list(itertools.combinations(range(size), keep))
    options = torch.zeros(len(combinations), size)
    for row, kept in enumerate(combinations):
        options[row, list(kept)] = 1.0
    return options


def group_starts(groups: Sequence[Group]) -> list[int]:
    """Global index of the first block of every group."""
    starts, position = [], 0
    for _, size in groups:
        starts.append(position)
        position += size
    return starts


def required_blocks_problem(groups: Sequence[Group], required_blocks: Sequence[int]) -> str | None:
    """Why the groups cannot keep every required block (global indices), naming the group and the fix; None if they can."""
    depth = sum(size for _, size in groups)
    outside = sorted(block for block in required_blocks if not 0 <= block < depth)
    if outside:
        return f"blocks {outside} are outside the {depth} blocks the groups cover (0 to {depth - 1})"
    for position, ((keep, size), start) in enumerate(zip(groups, group_starts(groups), strict=True)):
        inside = sorted(block for block in set(required_blocks) if start <= block < start + size)
        if len(inside) > keep:
            widened = [list(group) for group in groups]
            widened[position] = [len(inside), size]
            return (
                f"group {position} (blocks {start}-{start + size - 1}, [{keep}, {size}]) keeps {keep} of its {size} "
                f"blocks, fewer than its required blocks {inside}. Let that group keep at least {len(inside)}, e.g. "
                f"pattern={widened}, or use larger groups that hold them among more blocks"
            )
    return None


def _divisors(number: int) -> list[int]:
    return [d for d in range(1, number + 1) if number % d == 0]


def _check_group(keep: int, size: int, where: str) -> None:
    """Raise if one [N, M] group is not 1 <= N <= M or has too many options."""
    if not (1 <= keep <= size):
        raise UsageError(
            f"{where} keeps N={keep} of M={size} blocks per group; N must satisfy 1 <= N <= M "
            f"(valid patterns look like {_PATTERN_EXAMPLES})."
        )
    options = math.comb(size, keep)
    if options > MAX_OPTIONS_PER_GROUP:
        raise UsageError(
            f"{where} gives C({size}, {keep}) = {options} options in one group, more than the "
            f"{MAX_OPTIONS_PER_GROUP} this learner supports. Use smaller groups (e.g. '7:14' or '2:4')."
        )


def _parse_pair(text: str) -> Group | None:
    parts = text.split(":")
    if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
        return None
    return int(parts[0]), int(parts[1])


def _keep_count(keep_ratio: float, size: int) -> int | None:
    """N with N / size == keep_ratio up to the 4 significant digits refusals print ratios with, else None."""
    keep = round(keep_ratio * size)
    return keep if keep >= 1 and math.isclose(keep / size, keep_ratio, abs_tol=_RATIO_TOLERANCE) else None


def check_keep_ratio(keep_ratio: object) -> float:
    """keep_ratio as a float; raise unless it is a number in (0, 1]."""
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not 0 < keep_ratio <= 1:
        raise UsageError(
            f"keep_ratio={keep_ratio!r} must be a number in (0, 1], the fraction of blocks kept "
            "(e.g. 0.5 keeps half the depth)."
        )
    return float(keep_ratio)


def blocks_kept(keep_ratio: float, size: int, grouping: str) -> int:
    """The N of a group of `size` blocks that keeps the fraction keep_ratio; raise listing the realisable ratios.

    grouping names how the blocks are grouped, for the message: "with group_size=4", "with all 28 blocks in one group".
    """
    keep = _keep_count(keep_ratio, size)
    if keep is None:
        realisable = ", ".join(f"{k / size:.4g}" for k in range(1, size + 1))
        raise UsageError(
            f"keep_ratio={keep_ratio!r} {grouping} would keep {keep_ratio * size:.4g} blocks per group, not a whole "
            f"number. {grouping[0].upper()}{grouping[1:]} the realisable keep ratios are {realisable}."
        )
    return keep


def _as_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


@dataclass(frozen=True)
class BlockPattern:
    """A validated pattern request: a repeated 'N:M', an explicit list of groups, or a keep ratio."""

    repeated: Group | None = None
    explicit: tuple[Group, ...] | None = None
    keep_ratio: float | None = None
    group_size: int | None = None

    @classmethod
    def parse(
        cls,
        pattern: str | Sequence[Sequence[int]] | None = None,
        keep_ratio: float | None = None,
        group_size: int | None = None,
    ) -> BlockPattern:
        """Validate the user's pattern arguments; raise one ValueError that says what would be valid."""
        if pattern is not None and (keep_ratio is not None or group_size is not None):
            raise UsageError(
                f"pattern={pattern!r} and keep_ratio={keep_ratio!r}/group_size={group_size!r} were both given. "
                "Give either pattern or keep_ratio (with an optional group_size), not both."
            )
        if pattern is None and keep_ratio is None:
            if group_size is not None:
                raise UsageError(
                    f"group_size={group_size!r} was given without keep_ratio. Add keep_ratio "
                    "(e.g. keep_ratio=0.5, group_size=2 means '1:2') or pass pattern instead."
                )
            raise UsageError(
                f"No pattern given. Pass pattern ({_PATTERN_EXAMPLES}) or keep_ratio "
                "(e.g. keep_ratio=0.5 with an optional group_size)."
            )
        if pattern is not None:
            return cls._parse_pattern(pattern)
        return cls._parse_ratio(keep_ratio, group_size)

    @classmethod
    def _parse_pattern(cls, pattern: object) -> BlockPattern:
        if isinstance(pattern, str):
            pair = _parse_pair(pattern)
            if pair is None:
                raise UsageError(
                    f"pattern={pattern!r} is not 'N:M' with two non-negative integers nor a list of [N, M] groups. "
                    f"Valid examples: {_PATTERN_EXAMPLES}."
                )
            _check_group(*pair, where=f"pattern={pattern!r}")
            return cls(repeated=pair)
        if not isinstance(pattern, Sequence) or len(pattern) == 0:
            raise UsageError(
                f"pattern={pattern!r} is neither an 'N:M' string nor a non-empty list of [N, M] groups. "
                f"Valid examples: {_PATTERN_EXAMPLES}."
            )
        groups = []
        for position, item in enumerate(pattern):
            pair = None
            if isinstance(item, str):
                pair = _parse_pair(item)
            elif isinstance(item, Sequence) and len(item) == 2:
                keep, size = _as_int(item[0]), _as_int(item[1])
                pair = None if keep is None or size is None else (keep, size)
            if pair is None:
                raise UsageError(
                    f"pattern[{position}]={item!r} is not a group [N, M] of two integers. "
                    f"Valid examples: {_PATTERN_EXAMPLES}."
                )
            _check_group(*pair, where=f"pattern[{position}]={list(pair)}")
            groups.append(pair)
        return cls(explicit=tuple(groups))

    @classmethod
    def _parse_ratio(cls, keep_ratio: object, group_size: object) -> BlockPattern:
        ratio = check_keep_ratio(keep_ratio)
        if group_size is None:
            return cls(keep_ratio=ratio)
        size = _as_int(group_size)
        if size is None or size < 1:
            raise UsageError(
                f"group_size={group_size!r} must be a positive integer, the M of N:M (e.g. 4 for groups of 4)."
            )
        keep = blocks_kept(ratio, size, grouping=f"with group_size={size}")
        _check_group(keep, size, where=f"keep_ratio={keep_ratio!r} with group_size={size}")
        return cls(keep_ratio=ratio, group_size=size)

    @property
    def fixed_groups(self) -> list[Group] | None:
        """The groups when they do not depend on the depth (an explicit list), else None."""
        return list(self.explicit) if self.explicit is not None else None

    def describe(self) -> str | list[list[int]] | dict[str, float | int | None]:
        """A JSON-able echo of what the user asked for."""
        if self.repeated is not None:
            return f"{self.repeated[0]}:{self.repeated[1]}"
        if self.explicit is not None:
            return [list(group) for group in self.explicit]
        return {"keep_ratio": self.keep_ratio, "group_size": self.group_size}

    def groups_for_depth(self, depth: int) -> list[Group]:
        """The consecutive groups covering exactly `depth` blocks; raise saying which patterns would fit."""
        fitting_sizes = ", ".join(str(d) for d in _divisors(depth))
        if self.explicit is not None:
            covered = sum(size for _, size in self.explicit)
            if covered != depth:
                raise UsageError(
                    f"pattern={self.describe()} covers {covered} blocks but the block container has {depth}. "
                    f"The group sizes M must add up to {depth} exactly; for equal groups, use 'N:M' with M "
                    f"one of {fitting_sizes}."
                )
            return list(self.explicit)
        if self.repeated is not None:
            keep, size = self.repeated
            if depth % size:
                raise UsageError(
                    f"pattern='{keep}:{size}' needs a depth that is a multiple of M={size}, but the block "
                    f"container has {depth} blocks. Use M among {fitting_sizes}, or an explicit list of "
                    f"[N, M] groups whose M add up to {depth}."
                )
            return [(keep, size)] * (depth // size)
        return self._ratio_groups(depth)

    def _ratio_groups(self, depth: int) -> list[Group]:
        ratio = self.keep_ratio
        if self.group_size is not None:
            if depth % self.group_size:
                raise UsageError(
                    f"group_size={self.group_size} does not divide the depth {depth}. "
                    f"Use a group_size among {', '.join(str(d) for d in _divisors(depth))}."
                )
            return [(_keep_count(ratio, self.group_size), self.group_size)] * (depth // self.group_size)
        # The smallest group that realises the ratio keeps each choice local and the option tables small.
        for size in _divisors(depth):
            keep = _keep_count(ratio, size)
            if keep is not None:
                _check_group(keep, size, where=f"keep_ratio={ratio!r} on {depth} blocks")
                return [(keep, size)] * (depth // size)
        realisable = sorted(
            {Fraction(k, size) for size in _divisors(depth) for k in range(1, size + 1)
             if math.comb(size, k) <= MAX_OPTIONS_PER_GROUP}
        )
        listing = ", ".join(f"{float(fraction):.4g}" for fraction in realisable)
        raise UsageError(
            f"keep_ratio={ratio!r} cannot be realised on {depth} blocks with equal groups. "
            f"Realisable keep ratios on {depth} blocks: {listing}."
        )
