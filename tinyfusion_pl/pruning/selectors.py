"""Baseline block selectors the paper compares against: block influence, sensitivity, oracle, by index, random.

Every selector returns a Selection: the kept blocks and one score per block, where a higher score means
more worth keeping, so every selector keeps the N highest-scoring blocks of each group. `required_blocks`
(the model family's: `family.required_blocks(net)`, global indices) are kept whatever their score, and each
group is filled with the best-scoring of its other blocks; a fixed list that drops one is refused. Plain torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from tinyfusion_pl.errors import UsageError
from tinyfusion_pl.objectives import DiffusionObjective
from tinyfusion_pl.pruning.block_hooks import BlockMaskHooks, StreamsArgument, block_calls, sequence_streams
from tinyfusion_pl.pruning.calibration import Batch, calibration_loss, calibration_losses
from tinyfusion_pl.pruning.containers import BlockPaths, resolve_block_sequence
from tinyfusion_pl.pruning.export import check_kept_blocks
from tinyfusion_pl.pruning.patterns import (
    BlockPattern,
    Group,
    blocks_kept,
    group_starts,
    required_blocks_problem,
)


@dataclass(frozen=True)
class Selection:
    """The blocks a selector keeps, its score per block (higher = more worth keeping) and the groups it chose in."""

    kept_blocks: list[int]
    scores: list[float]
    groups: list[Group]

    def as_dict(self) -> dict[str, Any]:
        """The decision fields the learnable selector also writes, plus `scores`, JSON-able."""
        group_kept_blocks = [
            [block for block in self.kept_blocks if start <= block < start + size]
            for (_, size), start in zip(self.groups, group_starts(self.groups), strict=True)
        ]
        return {
            "groups": [list(group) for group in self.groups],
            "kept_blocks": list(self.kept_blocks),
            "group_kept_blocks": group_kept_blocks,
            "scores": list(self.scores),
        }


# ---------------------------------------------------------------------------------------- groups


def selection_groups(
    depth: int,
    pattern: str | Sequence[Sequence[int]] | None = None,
    keep_ratio: float | None = None,
    group_size: int | None = None,
) -> list[Group]:
    """The groups a baseline keeps its N highest blocks in: an N:M pattern, or one group of all blocks.

    keep_ratio alone (no group_size) ranks all blocks together, as ShortGPT and sensitivity analysis do.
    """
    request = BlockPattern.parse(pattern, keep_ratio, group_size)
    if request.keep_ratio is not None and request.group_size is None:
        keep = blocks_kept(request.keep_ratio, depth, grouping=f"with all {depth} blocks in one group")
        return [(keep, depth)]
    return request.groups_for_depth(depth)


def check_required_blocks(groups: Sequence[Group], required_blocks: Sequence[int]) -> list[int]:
    """`required_blocks` sorted, after checking that they are block indices every group can keep."""
    depth = sum(size for _, size in groups)
    required = check_kept_blocks(required_blocks, depth, blocks=None, argument="required_blocks") \
        if len(required_blocks) else []
    problem = required_blocks_problem(groups, required)
    if problem is not None:
        raise UsageError(f"required_blocks={required}: {problem}.")
    return required


def keep_highest(scores: torch.Tensor, groups: Sequence[Group], required_blocks: Sequence[int] = ()) -> list[int]:
    """The required blocks and the highest-scoring others, N in every (N, M) group, sorted; ties keep the earlier block."""
    depth = sum(size for _, size in groups)
    if scores.shape != (depth,):
        raise ValueError(f"scores has shape {tuple(scores.shape)} but the groups {list(groups)} cover {depth} blocks.")
    required = check_required_blocks(groups, required_blocks)
    kept = []
    for (keep, size), start in zip(groups, group_starts(groups), strict=True):
        order = torch.sort(scores[start:start + size], descending=True, stable=True).indices + start
        order = [int(block) for block in order]
        ranked = [block for block in order if block in required] + [block for block in order if block not in required]
        kept.extend(ranked[:keep])
    return sorted(kept)


def check_keeps_required(kept_blocks: Sequence[int], required_blocks: Sequence[int], source: str, fix: str) -> None:
    """Refuse a fixed list of kept blocks (`source` says where it comes from) that drops a required block."""
    dropped = sorted(set(required_blocks) - set(kept_blocks))
    if dropped:
        raise UsageError(
            f"{source} drops blocks {dropped}, which the model's family requires (required_blocks="
            f"{sorted(required_blocks)}: every exportable decision keeps them, and prune_blocks would refuse this "
            f"one). {fix}"
        )


# ---------------------------------------------------------------------------------------- scores


@torch.inference_mode()
def block_influence(
    net: nn.Module,
    objective: DiffusionObjective,
    batches: Sequence[Batch],
    blocks: BlockPaths = "blocks",
    hidden_state: int | str = 0,
    seed: int = 0,
    progress: bool = False,
    streams: StreamsArgument = None,
) -> torch.Tensor:
    """ShortGPT's block influence, (L,) float64: 1 - mean cosine similarity of each block's input and output tokens.

    The net sees the calibration batches noised at times spread over the whole process. `blocks` is one
    container or several (one score per block, global indices in the order listed). A multi-stream block
    (SD3, Flux; `streams`, by default the model family's) is scored on its first input stream, the image
    tokens `hidden_states`: its input against the output position that carries that stream.
    """
    sequence = resolve_block_sequence(net, blocks)
    calls = block_calls(sequence.blocks, sequence_streams(net, sequence, streams), hidden_state)
    similarity_sums = torch.zeros(len(sequence), dtype=torch.float64)
    token_counts = torch.zeros(len(sequence), dtype=torch.float64)

    def recorder(index: int) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            hidden_in = calls[index].find_inputs(args, kwargs)[0]
            hidden_out = calls[index].hidden_output(output)
            cosine = F.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)  # (N, T)
            similarity_sums[index] += cosine.double().sum().cpu()
            token_counts[index] += cosine.numel()

        return record

    handles = [block.register_forward_hook(recorder(index), with_kwargs=True)
               for index, block in enumerate(sequence.blocks)]
    try:
        calibration_losses(net, objective, batches, seed=seed, progress=progress, description="block influence")
    finally:
        for handle in handles:
            handle.remove()
    return 1.0 - similarity_sums / token_counts


@torch.inference_mode()
def removal_costs(
    net: nn.Module,
    objective: DiffusionObjective,
    batches: Sequence[Batch],
    blocks: BlockPaths = "blocks",
    hidden_state: int | str = 0,
    seed: int = 0,
    progress: bool = False,
    streams: StreamsArgument = None,
) -> torch.Tensor:
    """Sensitivity, (L,) float64: how much the calibration loss rises when each block alone is skipped.

    Every variant sees the same batches, timesteps and noise, so the differences are not sampling noise.
    A skipped multi-stream block passes every stream through (`streams`, by default the model family's).
    """
    sequence = resolve_block_sequence(net, blocks)
    per_block_streams = sequence_streams(net, sequence, streams)
    full_loss = calibration_loss(net, objective, batches, seed=seed)
    costs = torch.zeros(len(sequence), dtype=torch.float64)
    for skipped in tqdm(range(len(sequence)), desc="sensitivity", disable=not progress, leave=False):
        hooks = BlockMaskHooks(sequence.blocks, _skip_only(skipped), hidden_state=hidden_state,
                               streams=per_block_streams)
        try:
            costs[skipped] = calibration_loss(net, objective, batches, seed=seed) - full_loss
        finally:
            hooks.remove()
    return costs


def _skip_only(skipped: int) -> Callable[[int, torch.Tensor, nn.Module], bool]:
    return lambda index, hidden, block: index != skipped


# ---------------------------------------------------------------------------------------- selectors


def bi_score(
    net: nn.Module,
    objective: DiffusionObjective,
    batches: Sequence[Batch],
    groups: Sequence[Group],
    blocks: BlockPaths = "blocks",
    seed: int = 0,
    progress: bool = False,
    streams: StreamsArgument = None,
    required_blocks: Sequence[int] = (),
) -> Selection:
    """ShortGPT: keep the blocks with the highest block influence, i.e. drop those closest to the identity.

    A two-stream block (SD3, Flux) is compared on its hidden state `hidden_states` (the first input stream).
    `required_blocks` are kept whatever their influence.
    """
    check_required_blocks(groups, required_blocks)  # before the calibration passes
    scores = block_influence(net, objective, batches, blocks=blocks, seed=seed, progress=progress, streams=streams)
    return Selection(keep_highest(scores, groups, required_blocks), scores.tolist(), list(groups))


def sensitivity(
    net: nn.Module,
    objective: DiffusionObjective,
    batches: Sequence[Batch],
    groups: Sequence[Group],
    blocks: BlockPaths = "blocks",
    seed: int = 0,
    progress: bool = False,
    streams: StreamsArgument = None,
    required_blocks: Sequence[int] = (),
) -> Selection:
    """Sensitivity analysis: keep the blocks whose removal raises the calibration loss most, drop the cheapest.

    `required_blocks` are kept whatever their removal costs.
    """
    check_required_blocks(groups, required_blocks)  # before the calibration passes
    scores = removal_costs(net, objective, batches, blocks=blocks, seed=seed, progress=progress, streams=streams)
    return Selection(keep_highest(scores, groups, required_blocks), scores.tolist(), list(groups))


def random_blocks(depth: int, groups: Sequence[Group], seed: int, required_blocks: Sequence[int] = ()) -> Selection:
    """N of every M blocks uniformly at random, reproducible from `seed`; the scores are the random draws.

    `required_blocks` are kept; the rest of their group is drawn uniformly from its other blocks.
    """
    covered = sum(size for _, size in groups)
    if covered != depth:
        raise ValueError(f"groups={list(groups)} cover {covered} blocks but the model has depth={depth}.")
    # The top N of i.i.d. continuous draws is a uniformly random N-subset of each group.
    scores = torch.rand(depth, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return Selection(keep_highest(scores, groups, required_blocks), scores.tolist(), list(groups))


def by_index(
    depth: int, kept_blocks: Sequence[int], num_keep: int | None = None, required_blocks: Sequence[int] = ()
) -> Selection:
    """Exactly the listed blocks, checked: integers, in range, unique, `num_keep` of them when given, and
    keeping every one of `required_blocks`."""
    kept = check_kept_blocks(kept_blocks, depth, blocks=None, argument="kept_blocks")
    if num_keep is not None and len(kept) != num_keep:
        raise UsageError(
            f"kept_blocks={kept} keeps {len(kept)} blocks but num_keep={num_keep}: list exactly {num_keep} "
            "blocks, or set num_keep=null to accept any count."
        )
    check_keeps_required(kept, required_blocks, source=f"kept_blocks={kept}",
                         fix="Add them to kept_blocks (in place of others where num_keep fixes the count).")
    scores = [1.0 if block in kept else 0.0 for block in range(depth)]
    return Selection(kept, scores, [(len(kept), depth)])


def bk_sdm_blocks(depth: int) -> list[int]:
    """BK-SDM's rule on consecutive pairs: the first of each pair in the first half, the last in the second half.

    For DiT-XL's 28 blocks this is 0, 2, ..., 12, 15, 17, ..., 27, the oracle of the TinyFusion paper.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 4 or depth % 4:
        raise UsageError(
            f"depth={depth!r}: the BK-SDM oracle pairs the blocks of each half, so it needs a depth that is a "
            "multiple of 4 (28 for DiT-XL). Pass kept_blocks=[...] explicitly for this model."
        )
    half = depth // 2
    return list(range(0, half, 2)) + list(range(half + 1, depth, 2))


def oracle(depth: int, kept_blocks: Sequence[int] | None = None, required_blocks: Sequence[int] = ()) -> Selection:
    """A fixed expert list: `kept_blocks` when given, else BK-SDM's (0, 2, ..., 12, 15, ..., 27 for 28 blocks).

    A list that drops one of `required_blocks` is refused.
    """
    if kept_blocks is None:
        bk_sdm = bk_sdm_blocks(depth)
        check_keeps_required(bk_sdm, required_blocks, source=f"BK-SDM's oracle list for {depth} blocks {bk_sdm}",
                             fix="Pass kept_blocks=[...] that keeps them instead.")
        return by_index(depth, bk_sdm)
    return by_index(depth, kept_blocks, required_blocks=required_blocks)
