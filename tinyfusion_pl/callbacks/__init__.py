"""Lightning callbacks that a user adds to an existing Trainer to prune its model's blocks."""

from tinyfusion_pl.callbacks.block_mask import DifferentiableBlockMask
from tinyfusion_pl.callbacks.weight_update import CoOptimizedWeightUpdate

__all__ = ["CoOptimizedWeightUpdate", "DifferentiableBlockMask"]
