"""Find the containers of blocks that depth pruning works on, and join several into one sequence of blocks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch.nn as nn

from tinyfusion_pl.families import ModelFamily, find_family

BlockContainer = nn.ModuleList | nn.Sequential
# What a user passes as `blocks`: one dotted path, or several whose blocks run one list after the other.
BlockPaths = str | Sequence[str]


def find_block_containers(root: nn.Module) -> dict[str, int]:
    """Every ModuleList/Sequential under `root` whose children all share one class, with its length."""
    found = {}
    for name, module in root.named_modules():
        if not name or not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < 2:
            continue
        if len({type(child) for child in module}) == 1:
            found[name] = len(module)
    return found


def describe_containers(root: nn.Module) -> str:
    """The candidate containers of `root` as a readable list, for messages that ask the user to pick one."""
    candidates = find_block_containers(root)
    return ", ".join(f"'{name}' ({depth} blocks)" for name, depth in candidates.items()) or "none"


def resolve_block_container(root: nn.Module, path: str, allow_empty: bool = False) -> BlockContainer:
    """Return the container at dotted `path` under `root`, or raise naming the containers that exist.

    An empty container is refused unless `allow_empty` (one list of several that pruning emptied).
    """
    module: nn.Module | None = root
    for part in path.split(".") if path else []:
        module = getattr(module, part, None) if isinstance(module, nn.Module) else None
        if module is None:
            break
    if isinstance(module, (nn.ModuleList, nn.Sequential)) and (allow_empty or len(module) > 0):
        return module
    what = "does not resolve" if module is None else f"is a {type(module).__name__}, not a non-empty container of blocks"
    raise ValueError(
        f"blocks='{path}' {what} on {type(root).__name__}. "
        f"Containers of same-class blocks found: {describe_containers(root)}. Pass one of them as `blocks`."
    )


def block_paths_problem(blocks: object) -> str | None:
    """Why `blocks` is neither one dotted path nor a list of distinct ones (None when it is fine)."""
    if isinstance(blocks, str) and blocks:
        return None
    if isinstance(blocks, str) or not isinstance(blocks, Sequence) or not blocks or not all(
        isinstance(path, str) and path for path in blocks
    ):
        return (
            f"blocks={blocks!r} must be the dotted path to the block container, e.g. 'net.blocks', or a list of "
            "such paths in computation order, e.g. ['transformer_blocks', 'single_transformer_blocks']"
        )
    if len(set(blocks)) != len(blocks):
        return f"blocks={list(blocks)!r} lists a container more than once; list each once, in computation order"
    return None


def block_paths(blocks: BlockPaths) -> tuple[str, ...]:
    """`blocks` as a tuple of dotted paths, in computation order; raise if it is neither a path nor a list of them."""
    problem = block_paths_problem(blocks)
    if problem is not None:
        raise ValueError(problem + ".")
    return (blocks,) if isinstance(blocks, str) else tuple(blocks)


def describe_paths(blocks: BlockPaths) -> str:
    """'net.blocks' for one path, ['a', 'b'] for several: how messages name the blocks the user gave."""
    return f"'{blocks}'" if isinstance(blocks, str) else repr(list(blocks))


@dataclass(frozen=True)
class BlockSequence:
    """The blocks of one or several containers as one sequence: global index i runs over the containers in order.

    With containers of lengths [2, 4], blocks 0-1 are the first container's and blocks 2-5 the second's.
    """

    paths: tuple[str, ...]
    containers: tuple[BlockContainer, ...]

    @property
    def blocks(self) -> list[nn.Module]:
        """Every block, in computation order (the global index is the position in this list)."""
        return [block for container in self.containers for block in container]

    @property
    def counts(self) -> list[int]:
        """The length of every container."""
        return [len(container) for container in self.containers]

    @property
    def starts(self) -> list[int]:
        """The global index of the first block of every container."""
        starts, position = [], 0
        for count in self.counts:
            starts.append(position)
            position += count
        return starts

    def __len__(self) -> int:
        return sum(self.counts)

    def split(self, indices: Sequence[int]) -> list[list[int]]:
        """Global block indices as per-container local indices (sorted), one list per container."""
        return [
            sorted(index - start for index in indices if start <= index < start + count)
            for start, count in zip(self.starts, self.counts, strict=True)
        ]


def resolve_block_sequence(root: nn.Module, blocks: BlockPaths) -> BlockSequence:
    """The containers at `blocks` (one dotted path or several) under `root`, as one sequence of blocks.

    Raises naming the containers that exist when a path does not resolve, and refuses a container given
    twice under two names (its blocks would be gated twice). One of several containers may be empty (a
    pruned MAR that kept no encoder block), as long as the sequence has a block.
    """
    paths = block_paths(blocks)
    containers = tuple(resolve_block_container(root, path, allow_empty=len(paths) > 1) for path in paths)
    if not any(len(container) for container in containers):
        raise ValueError(f"blocks={list(paths)!r} are all empty on {type(root).__name__}: there is no block to "
                         "prune or distil.")
    if len({id(container) for container in containers}) != len(containers):
        raise ValueError(f"blocks={list(paths)!r} names the same container more than once; list each once.")
    return BlockSequence(paths, containers)


# ---------------------------------------------------------------------------------------- model families


@dataclass(frozen=True)
class DescribedOwner:
    """A module above some of the given containers that a model family describes, and which of its containers they are."""

    path: str  # the owner's dotted path under the root ('' for the root itself)
    family: ModelFamily
    given: dict[str, str]  # the family's container path -> the path it was given under, below the root

    def module(self, root: nn.Module) -> nn.Module:
        """The owner under `root` (or under a copy of the root)."""
        return root.get_submodule(self.path)

    def family_kept_blocks(self, root: nn.Module, kept_by_path: Mapping[str, Sequence[int]]) -> list[int]:
        """A decision in the family's global indices: the given containers keep their share, the others keep all."""
        owner, kept, start = self.module(root), [], 0
        for family_path in self.family.blocks:
            count = len(owner.get_submodule(family_path))
            local = kept_by_path[self.given[family_path]] if family_path in self.given else range(count)
            kept.extend(start + index for index in local)
            start += count
        return kept

    def required_blocks(self, root: nn.Module, sequence: BlockSequence) -> list[int]:
        """The blocks the family requires (every exportable decision keeps them), as global indices over `sequence`.

        A required block in one of the family's containers that `sequence` does not hold is never gated: it stays.
        """
        owner = self.module(root)
        required, start = [], 0
        family_required = self.family.required_blocks(owner)
        for family_path in self.family.blocks:
            count = len(owner.get_submodule(family_path))
            if family_path in self.given:
                sequence_start = sequence.starts[sequence.paths.index(self.given[family_path])]
                required += [sequence_start + index - start for index in family_required if start <= index < start + count]
            start += count
        return sorted(required)


def find_owner(root: nn.Module, path: str) -> tuple[str, ModelFamily, str] | None:
    """The nearest module above `path` whose family lists `path` among its block containers:
    (its path, its family, the container's path under it); None when no family does."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        owner_path = ".".join(parts[:cut])
        family = find_family(root.get_submodule(owner_path))
        relative = ".".join(parts[cut:])
        if family is not None and relative in family.blocks:
            return owner_path, family, relative
    return None


def described_owners(root: nn.Module, paths: Sequence[str]) -> list[DescribedOwner]:
    """The family-described modules that own some of the containers at `paths`, each once."""
    owners: dict[str, DescribedOwner] = {}
    for path in paths:
        found = find_owner(root, path)
        if found is None:
            continue
        owner_path, family, relative = found
        owners.setdefault(owner_path, DescribedOwner(owner_path, family, {})).given[relative] = path
    return list(owners.values())
