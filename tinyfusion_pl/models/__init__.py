"""Diffusion transformers: a DiT that loads public facebookresearch/DiT checkpoints, and its registry."""

from tinyfusion_pl.models.checkpoints import (
    CheckpointMismatchError,
    dit_from_checkpoint,
    extract_state_dict,
    infer_dit_config,
    load_checkpoint_file,
    load_dit_state_dict,
    match_registry,
)
from tinyfusion_pl.models.dit import DiT, DiT_models, DiTBlock, build_dit

__all__ = [
    "CheckpointMismatchError",
    "DiT",
    "DiTBlock",
    "DiT_models",
    "build_dit",
    "dit_from_checkpoint",
    "extract_state_dict",
    "infer_dit_config",
    "load_checkpoint_file",
    "load_dit_state_dict",
    "match_registry",
]
