"""Export a pruning decision: a physically shallower copy of a model that keeps only the chosen blocks."""

from __future__ import annotations

import copy
import operator
from collections.abc import Iterable

import torch.nn as nn

from tinyfusion_pl.errors import UsageError
from tinyfusion_pl.pruning.containers import BlockPaths, described_owners, resolve_block_sequence
from tinyfusion_pl.pruning.lora import remove_lora

# Hook tables that gating machinery may have filled; the exported copy starts without any of them.
_RUNTIME_HOOK_TABLES = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def check_kept_blocks(
    keep: Iterable[int], depth: int, blocks: str | list[str] | None = "blocks", argument: str = "keep"
) -> list[int]:
    """Return `keep` as sorted block indices after checking they are distinct integers in [0, depth).

    `argument` is the name the caller's user wrote the list under, `blocks` the attribute path of the
    block container (None when the caller has none), so every message points at what to change.
    """
    hint = f"Pass {argument} as a list of distinct block indices from 0 to {depth - 1}, e.g. [0, 2, 4]."
    if isinstance(keep, (str, bytes)) or not isinstance(keep, Iterable):
        raise TypeError(f"{argument}={keep!r} is not a list of block indices. {hint}")
    entries = list(keep)
    try:
        # A bool is an int to Python, but True in a list of blocks is a mistake, not block 1.
        indices = [operator.index(entry) for entry in entries if not isinstance(entry, bool)]
    except TypeError:
        indices = []
    if len(indices) != len(entries):
        raise TypeError(f"{argument}={entries!r} holds entries that are not integers. {hint}")
    if not indices:
        raise UsageError(f"{argument}=[] keeps nothing; keep at least one of the {depth} blocks. {hint}")
    container = f" in {blocks!r}" if blocks is not None else ""
    out_of_range = [index for index in indices if not 0 <= index < depth]
    if out_of_range:
        raise UsageError(
            f"{argument}={indices} holds {out_of_range}, outside the model's {depth} blocks{container} "
            f"(valid indices: 0 to {depth - 1}; negative indices are not accepted). {hint}"
        )
    repeated = sorted({index for index in indices if indices.count(index) > 1})
    if repeated:
        raise UsageError(f"{argument}={indices} lists {repeated} more than once; list each kept block once.")
    return sorted(indices)


def prune_blocks(model: nn.Module, blocks: BlockPaths, keep: Iterable[int], merge: bool = False) -> nn.Module:
    """Return a deep copy of `model` holding only the blocks in `keep`, renumbered 0..K-1; `model` is untouched.

    `blocks` is one container path or several; with several, `keep` holds global indices over their blocks
    in the order listed, and each container keeps its own share. Blocks keep their original order whatever
    the order of `keep`. When a model family describes the module owning the containers, it may refuse the
    decision first (with the reason) and records the new depths afterwards (e.g. a diffusers config), so
    the copy is the same class and rebuilds at its depth. The copy carries no forward or backward hooks and
    no LoRA wrappers: their update is discarded (the original weights, the paper's choice) unless
    merge=True merges it into the kept weights.
    """
    sequence = resolve_block_sequence(model, blocks)
    kept = check_kept_blocks(keep, len(sequence), blocks if isinstance(blocks, str) else list(sequence.paths))
    kept_by_container = dict(zip(sequence.paths, sequence.split(kept), strict=True))
    owners = described_owners(model, sequence.paths)
    for owner in owners:
        owner.family.check_kept_blocks(owner.module(model), owner.family_kept_blocks(model, kept_by_container))
    # Pre-seeding deepcopy's memo keeps hooks and dropped blocks out of the copy without touching `model`.
    memo: dict[int, object] = {}
    for container, local_kept in zip(sequence.containers, kept_by_container.values(), strict=True):
        for index, block in enumerate(container):
            if index not in local_kept:
                memo[id(block)] = None
    for module in model.modules():
        for table_name in _RUNTIME_HOOK_TABLES:
            table = getattr(module, table_name, None)
            if table is not None:
                memo[id(table)] = type(table)()
    shallow = copy.deepcopy(model, memo)
    for path, local_kept in kept_by_container.items():
        # Deleting from a ModuleList/Sequential renumbers the rest, so the kept blocks end up as 0..K-1.
        shallow_container = shallow.get_submodule(path)
        for index in reversed(range(len(shallow_container))):
            if index not in local_kept:
                del shallow_container[index]
    remove_lora(shallow, merge=merge)
    # A model that stores its depth (DiT derives it from len(blocks) instead) must report the new one.
    if vars(shallow).get("depth") == len(sequence):
        shallow.depth = len(kept)
    for owner in owners:
        shallow_owner = owner.module(shallow)
        owner.family.after_depth_change(shallow_owner, owner.family.block_counts(shallow_owner))
    return shallow
