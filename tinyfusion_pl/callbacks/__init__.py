"""Lightning callbacks that a user adds to an existing Trainer to prune its model's blocks (and to resume exactly)."""

from tinyfusion_pl.callbacks.block_mask import DifferentiableBlockMask
from tinyfusion_pl.callbacks.random_state import RandomStateCheckpoint
from tinyfusion_pl.callbacks.weight_update import CoOptimizedWeightUpdate

__all__ = ["CoOptimizedWeightUpdate", "DifferentiableBlockMask", "RandomStateCheckpoint"]
