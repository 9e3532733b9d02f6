"""TinyFusion learnable depth pruning for diffusion transformers, as PyTorch Lightning callbacks."""

from tinyfusion_pl.callbacks import CoOptimizedWeightUpdate, DifferentiableBlockMask
from tinyfusion_pl.distill import DistillationModule
from tinyfusion_pl.models import DiT, DiT_models, build_dit, dit_from_checkpoint
from tinyfusion_pl.module import DiffusionModule
from tinyfusion_pl.objectives import GaussianDiffusion
from tinyfusion_pl.pruning import prune_blocks

__all__ = [
    "CoOptimizedWeightUpdate",
    "DiT",
    "DiT_models",
    "DifferentiableBlockMask",
    "DiffusionModule",
    "DistillationModule",
    "GaussianDiffusion",
    "build_dit",
    "dit_from_checkpoint",
    "prune_blocks",
]
