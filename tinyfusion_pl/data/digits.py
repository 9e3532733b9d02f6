"""The embedded default dataset: scikit-learn's bundled 8x8 digits, no download needed."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from tinyfusion_pl.data.resumable import ResumableDataLoader, training_share
from tinyfusion_pl.errors import UsageError

NUM_CLASSES = 10
DIGITS_MAX_VALUE = 16.0  # sklearn stores the 8x8 digits as integers 0..16


def load_digits_tensors(image_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as (N, 1, S, S) float images in [-1, 1] and (N,) int64 labels."""
    if image_size not in (8, 16):
        raise UsageError(f"image_size={image_size} is not supported; use 8 (native) or 16 (bilinear upsampling).")
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32)).unsqueeze(1)  # (N, 1, 8, 8)
    images = images / DIGITS_MAX_VALUE * 2.0 - 1.0
    if image_size == 16:
        images = F.interpolate(images, size=16, mode="bilinear", align_corners=False).clamp(-1.0, 1.0)
    return images, torch.from_numpy(digits.target.astype(np.int64))


def split_indices(count: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed, seeded train/validation split of range(count)."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    val_count = round(count * val_fraction)
    return order[val_count:], order[:val_count]


class DigitsDataModule(L.LightningDataModule):
    """Class-conditional 8x8 (or 16x16) digits in [-1, 1], batches of (image, label)."""

    num_classes = NUM_CLASSES
    in_channels = 1

    def __init__(
        self,
        batch_size: int = 64,
        image_size: int = 8,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise UsageError(f"batch_size={batch_size} must be >= 1.")
        if not 0.0 < val_fraction < 1.0:
            raise UsageError(f"val_fraction={val_fraction} must be in (0, 1).")
        if image_size not in (8, 16):
            raise UsageError(f"image_size={image_size} is not supported; use 8 (native) or 16 (bilinear upsampling).")
        self.batch_size = batch_size
        self.image_size = image_size
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.num_workers = num_workers
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = load_digits_tensors(self.image_size)
        train_idx, val_idx = split_indices(len(labels), self.val_fraction, self.split_seed)
        self.train_set = TensorDataset(images[train_idx], labels[train_idx])
        self.val_set = TensorDataset(images[val_idx], labels[val_idx])

    def train_dataloader(self) -> DataLoader:
        # drop_last keeps every step the same size: throughput logs and the gate schedules stay comparable
        return ResumableDataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                                   num_workers=self.num_workers, share=training_share(self.trainer))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
