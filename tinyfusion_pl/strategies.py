"""Strategy factories that Hydra configs can name (YAML cannot spell a set of module classes)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn
from hydra.utils import get_class
from lightning.pytorch.strategies import FSDPStrategy


def fsdp_strategy(
    wrap_blocks: Sequence[str] = ("tinyfusion_pl.models.dit.DiTBlock",),
    activation_checkpointing: bool = False,
    sharding_strategy: str = "FULL_SHARD",
    state_dict_type: str = "full",
) -> FSDPStrategy:
    """FSDP that shards each transformer block on its own (`wrap_blocks`: dotted class paths)."""
    block_classes: set[type[nn.Module]] = {get_class(path) for path in wrap_blocks}
    return FSDPStrategy(
        auto_wrap_policy=block_classes,
        activation_checkpointing_policy=block_classes if activation_checkpointing else None,
        sharding_strategy=sharding_strategy,
        state_dict_type=state_dict_type,
    )
