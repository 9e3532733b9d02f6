"""Baseline block selectors the paper compares against: block influence, sensitivity, oracle, by index, random.

Every selector returns a Selection: the kept blocks and one score per block, where a higher score means
more worth keeping, so every selector keeps the N highest-scoring blocks of each group. Plain torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from tinyfusion_pl.objectives import DiffusionObjective
from tinyfusion_pl.pruning.block_hooks import BlockMaskHooks, StreamsArgument, block_calls, sequence_streams
from tinyfusion_pl.pruning.calibration import Batch, calibration_loss, calibration_losses
from tinyfusion_pl.pruning.containers import BlockPaths, resolve_block_sequence
from tinyfusion_pl.pruning.export import check_kept_blocks
from tinyfusion_pl.pruning.patterns import BlockPattern, Group, blocks_kept, group_starts


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


def keep_highest(scores: torch.Tensor, groups: Sequence[Group]) -> list[int]:
    """The N highest-scoring blocks of every (N, M) group, sorted; ties keep the earlier block."""
    depth = sum(size for _, size in groups)
    if scores.shape != (depth,):
        raise ValueError(f"scores has shape {tuple(scores.shape)} but the groups {list(groups)} cover {depth} blocks.")
    kept = []
    for (keep, size), start in zip(groups, group_starts(groups), strict=True):
        order = torch.sort(scores[start:start + size], descending=True, stable=True).indices
        kept.extend(start + int(index) for index in order[:keep])
    return sorted(kept)


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
) -> Selection:
    """ShortGPT: keep the blocks with the highest block influence, i.e. drop those closest to the identity.

    A two-stream block (SD3, Flux) is compared on its hidden state `hidden_states` (the first input stream).
    """
    scores = block_influence(net, objective, batches, blocks=blocks, seed=seed, progress=progress, streams=streams)
    return Selection(keep_highest(scores, groups), scores.tolist(), list(groups))


def sensitivity(
    net: nn.Module,
    objective: DiffusionObjective,
    batches: Sequence[Batch],
    groups: Sequence[Group],
    blocks: BlockPaths = "blocks",
    seed: int = 0,
    progress: bool = False,
    streams: StreamsArgument = None,
) -> Selection:
    """Sensitivity analysis: keep the blocks whose removal raises the calibration loss most, drop the cheapest."""
    scores = removal_costs(net, objective, batches, blocks=blocks, seed=seed, progress=progress, streams=streams)
    return Selection(keep_highest(scores, groups), scores.tolist(), list(groups))


def random_blocks(depth: int, groups: Sequence[Group], seed: int) -> Selection:
    """N of every M blocks uniformly at random, reproducible from `seed`; the scores are the random draws."""
    covered = sum(size for _, size in groups)
    if covered != depth:
        raise ValueError(f"groups={list(groups)} cover {covered} blocks but the model has depth={depth}.")
    # The top N of i.i.d. continuous draws is a uniformly random N-subset of each group.
    scores = torch.rand(depth, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return Selection(keep_highest(scores, groups), scores.tolist(), list(groups))


def by_index(depth: int, kept_blocks: Sequence[int], num_keep: int | None = None) -> Selection:
    """Exactly the listed blocks, checked: integers, in range, unique, and `num_keep` of them when given."""
    kept = check_kept_blocks(kept_blocks, depth, blocks=None, argument="kept_blocks")
    if num_keep is not None and len(kept) != num_keep:
        raise ValueError(
            f"kept_blocks={kept} keeps {len(kept)} blocks but num_keep={num_keep}: list exactly {num_keep} "
            "blocks, or set num_keep=null to accept any count."
        )
    scores = [1.0 if block in kept else 0.0 for block in range(depth)]
    return Selection(kept, scores, [(len(kept), depth)])


def bk_sdm_blocks(depth: int) -> list[int]:
    """BK-SDM's rule on consecutive pairs: the first of each pair in the first half, the last in the second half.

    For DiT-XL's 28 blocks this is 0, 2, ..., 12, 15, 17, ..., 27, the oracle of the TinyFusion paper.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 4 or depth % 4:
        raise ValueError(
            f"depth={depth!r}: the BK-SDM oracle pairs the blocks of each half, so it needs a depth that is a "
            "multiple of 4 (28 for DiT-XL). Pass kept_blocks=[...] explicitly for this model."
        )
    half = depth // 2
    return list(range(0, half, 2)) + list(range(half + 1, depth, 2))


def oracle(depth: int, kept_blocks: Sequence[int] | None = None) -> Selection:
    """A fixed expert list: `kept_blocks` when given, else BK-SDM's (0, 2, ..., 12, 15, ..., 27 for 28 blocks)."""
    return by_index(depth, bk_sdm_blocks(depth) if kept_blocks is None else kept_blocks)
