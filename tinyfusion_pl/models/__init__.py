"""Diffusion transformers: DiT and SiT (one backbone, public checkpoints), MAR, their registries and loading."""

from tinyfusion_pl.models.checkpoints import (
    CheckpointMismatchError,
    dit_from_checkpoint,
    extract_state_dict,
    infer_dit_config,
    load_checkpoint_file,
    load_dit_state_dict,
    match_registry,
    sit_from_checkpoint,
)
from tinyfusion_pl.models.dit import DiT, DiT_models, DiTBlock, build_dit
from tinyfusion_pl.models.mar import MAR, MAR_models, build_mar, mar_from_checkpoint
from tinyfusion_pl.models.sit import SiT, SiT_models, build_sit

__all__ = [
    "CheckpointMismatchError",
    "DiT",
    "DiTBlock",
    "DiT_models",
    "MAR",
    "MAR_models",
    "SiT",
    "SiT_models",
    "build_dit",
    "build_mar",
    "build_sit",
    "dit_from_checkpoint",
    "extract_state_dict",
    "infer_dit_config",
    "load_checkpoint_file",
    "load_dit_state_dict",
    "mar_from_checkpoint",
    "match_registry",
    "sit_from_checkpoint",
]
