"""Diffusion transformers: a DiT that loads public facebookresearch/DiT checkpoints, and its registry."""

from tinyfusion_pl.models.dit import DiT, DiT_models, DiTBlock, build_dit

__all__ = ["DiT", "DiTBlock", "DiT_models", "build_dit"]
