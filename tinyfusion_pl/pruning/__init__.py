"""Depth pruning machinery: N:M patterns, Gumbel gates, block masks, LoRA, selectors, export. No Lightning here."""

from tinyfusion_pl.pruning.block_hooks import BlockCall, BlockMaskHooks
from tinyfusion_pl.pruning.calibration import calibration_batches, calibration_loss
from tinyfusion_pl.pruning.containers import (
    BlockSequence,
    find_block_containers,
    resolve_block_container,
    resolve_block_sequence,
)
from tinyfusion_pl.pruning.export import prune_blocks
from tinyfusion_pl.pruning.gates import BlockGates, straight_through_gumbel
from tinyfusion_pl.pruning.lora import (
    LoRALinear,
    SharedInputLoRA,
    inject_block_lora,
    inject_lora,
    remove_lora,
    share_lora_inputs,
)
from tinyfusion_pl.pruning.patterns import BlockPattern, enumerate_options
from tinyfusion_pl.pruning.selectors import bi_score, by_index, oracle, random_blocks, sensitivity

__all__ = [
    "BlockCall",
    "BlockGates",
    "BlockMaskHooks",
    "BlockPattern",
    "BlockSequence",
    "LoRALinear",
    "SharedInputLoRA",
    "bi_score",
    "by_index",
    "calibration_batches",
    "calibration_loss",
    "enumerate_options",
    "find_block_containers",
    "inject_block_lora",
    "inject_lora",
    "oracle",
    "prune_blocks",
    "random_blocks",
    "remove_lora",
    "resolve_block_container",
    "resolve_block_sequence",
    "sensitivity",
    "share_lora_inputs",
    "straight_through_gumbel",
]
