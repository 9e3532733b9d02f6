"""Datamodules: the embedded digits default and reference-layout latent folders."""

from tinyfusion_pl.data.digits import DigitsDataModule, load_digits_tensors
from tinyfusion_pl.data.latents import LatentDataError, LatentFolderDataset, LatentsDataModule

__all__ = ["DigitsDataModule", "LatentDataError", "LatentFolderDataset", "LatentsDataModule", "load_digits_tensors"]
