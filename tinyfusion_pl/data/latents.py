"""Pre-extracted VAE latents in the reference code's folder layout (imagenet256_features/, imagenet256_labels/)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from tinyfusion_pl.data.digits import split_indices
from tinyfusion_pl.data.resumable import ResumableDataLoader, training_share
from tinyfusion_pl.errors import UsageError


class LatentDataError(UsageError):
    """A latent dataset that cannot be trained on; the message names the file."""


def _read_npy_shape(path: Path) -> tuple[int, ...]:
    """The array shape in an .npy header, without reading the data."""
    try:
        shape = np.load(path, mmap_mode="r").shape  # memory-mapped: only the header is read
    except (OSError, ValueError) as error:
        raise LatentDataError(f"{path} is not a readable .npy file ({error}). Re-extract it or remove the pair.") from error
    return shape


def _load_label(path: Path) -> int:
    try:
        label = np.load(path)
    except (OSError, ValueError) as error:
        raise LatentDataError(f"{path} is not a readable .npy file ({error}). Re-extract it or remove the pair.") from error
    if label.size != 1:
        raise LatentDataError(f"{path} holds {label.size} values; a label file must hold exactly one class index.")
    return int(label.reshape(()))


class LatentFolderDataset(Dataset):
    """(latent, label) pairs from `<root>/<features_dir>/*.npy` and `<root>/<labels_dir>/*.npy`.

    Each feature file holds (2, C, H, W): an image and its horizontal flip, one of which is drawn at random per read;
    (1, C, H, W) and (C, H, W) files are used as they are. Everything is checked when the dataset is built.
    """

    def __init__(
        self,
        root: str | Path,
        num_classes: int = 1000,
        features_dir: str = "imagenet256_features",
        labels_dir: str = "imagenet256_labels",
        random_flip: bool = True,
    ) -> None:
        root = Path(root)
        self.features_path, self.labels_path = root / features_dir, root / labels_dir
        for folder in (self.features_path, self.labels_path):
            if not folder.is_dir():
                raise LatentDataError(f"{folder} does not exist. Point data.root at the folder that holds "
                                      f"'{features_dir}/' and '{labels_dir}/'.")
        self.feature_files = sorted(self.features_path.glob("*.npy"))
        label_files = sorted(self.labels_path.glob("*.npy"))
        if not self.feature_files:
            raise LatentDataError(f"{self.features_path} holds no .npy files: extract the latents first.")
        if len(self.feature_files) != len(label_files):
            raise LatentDataError(
                f"{self.features_path} holds {len(self.feature_files)} files but {self.labels_path} holds "
                f"{len(label_files)}: every feature file needs a label file of the same name."
            )
        self.random_flip = random_flip
        self.labels = [self._checked_label(feature, num_classes) for feature in self.feature_files]
        self.latent_shape = self._checked_shape()

    def _checked_label(self, feature_file: Path, num_classes: int) -> int:
        label_file = self.labels_path / feature_file.name
        if not label_file.is_file():
            raise LatentDataError(f"{feature_file} has no label file {label_file}.")
        label = _load_label(label_file)
        if not 0 <= label < num_classes:
            raise LatentDataError(f"{label_file} holds label {label}, outside [0, {num_classes}). "
                                  f"Set data.num_classes to the dataset's class count.")
        return label

    def _checked_shape(self) -> tuple[int, ...]:
        latent_shape = None
        for path in self.feature_files:
            shape = _read_npy_shape(path)
            if len(shape) == 4 and shape[0] in (1, 2):
                shape = shape[1:]
            if len(shape) != 3:
                raise LatentDataError(f"{path} has shape {shape}; expected (2, C, H, W), (1, C, H, W) or (C, H, W).")
            if latent_shape is None:
                latent_shape = shape
            elif shape != latent_shape:
                raise LatentDataError(f"{path} has latent shape {shape}, unlike the first file's {latent_shape}.")
        return latent_shape

    def __len__(self) -> int:
        return len(self.feature_files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        features = np.load(self.feature_files[index])
        if features.ndim == 4:
            pick = int(torch.randint(features.shape[0], ())) if self.random_flip else 0
            features = features[pick]
        return torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)), self.labels[index]


class LatentsDataModule(L.LightningDataModule):
    """Batches of (latent, label) from a reference-layout latent folder, with a fixed validation split."""

    def __init__(
        self,
        root: str,
        num_classes: int = 1000,
        batch_size: int = 32,
        val_fraction: float = 0.01,
        split_seed: int = 0,
        num_workers: int = 4,
        features_dir: str = "imagenet256_features",
        labels_dir: str = "imagenet256_labels",
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise UsageError(f"batch_size={batch_size} must be >= 1.")
        if not 0.0 <= val_fraction < 1.0:
            raise UsageError(f"val_fraction={val_fraction} must be in [0, 1).")
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.num_workers = num_workers
        self.dataset = LatentFolderDataset(root, num_classes, features_dir, labels_dir)
        self.in_channels = self.dataset.latent_shape[0]
        train_idx, val_idx = split_indices(len(self.dataset), val_fraction, split_seed)
        self.train_set = Subset(self.dataset, train_idx.tolist())
        self.val_set = Subset(self.dataset, val_idx.tolist())

    def train_dataloader(self) -> DataLoader:
        return ResumableDataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                                   num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                                   persistent_workers=self.num_workers > 0, share=training_share(self.trainer))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)
