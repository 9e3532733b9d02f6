"""FID through torchmetrics: in the digits classifier's feature space offline, or Inception's for ImageNet-scale.

torchmetrics' FrechetInceptionDistance (1.9) calls a custom feature module on exactly the tensors given to
`update` (no resizing or scaling); `normalize` and `input_img_size` only shape the dummy image it passes once
to learn the feature width: normalize=False makes that a uint8 image, the input type used here throughout.
Features are accumulated in float64; the distance comes back in the features' dtype.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed
import torch.nn as nn
from torchmetrics.image.fid import FrechetInceptionDistance

from tinyfusion_pl.errors import MissingInputError, UsageError
from tinyfusion_pl.evaluation.digits_classifier import DigitsClassifier
from tinyfusion_pl.evaluation.sampling import check_uint8_nhwc

INCEPTION_FEATURES = (64, 192, 768, 2048)
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"


class DigitsFeatureExtractor(nn.Module):
    """uint8 digits (N, 1, H, W) in [0, 255] -> the digits classifier's penultimate features (N, feature_dim)."""

    def __init__(self, classifier: DigitsClassifier) -> None:
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise ValueError(f"DigitsFeatureExtractor expects uint8 images in [0, 255], got {images.dtype}; "
                             "convert samples in [-1, 1] with images_to_uint8.")
        scaled = images.float() / 127.5 - 1.0  # (N, 1, H, W) in [-1, 1], the classifier's input range
        return self.classifier.features(scaled)  # (N, feature_dim)


class FIDScorer:
    """FID of uint8 (N, H, W, C) image sets against one reference set, kept between scores."""

    def __init__(self, metric: FrechetInceptionDistance, channels: int, batch_size: int = 256) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels={channels!r} is invalid: the feature extractor reads 1 (gray) or 3 (RGB).")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} is invalid: expected a positive int (images per feature batch).")
        self.metric = metric
        self.channels = channels
        self.batch_size = batch_size
        self.metric.reset_real_features = False  # reset() then clears the samples only: the reference stays

    def to(self, device: torch.device | str) -> FIDScorer:
        self.metric = self.metric.to(device)
        return self

    @property
    def reference_size(self) -> int:
        """Number of reference images whose statistics are held."""
        return int(self.metric.real_features_num_samples)

    def set_reference(self, images: torch.Tensor | np.ndarray) -> None:
        """Replace the reference statistics by those of `images` (uint8, N >= 2).

        Under torch.distributed every process passes the whole reference set and adds its own part of it:
        torchmetrics sums the parts when it computes, so the statistics are those of the whole set.
        """
        images = self._checked(images, "reference images", shared=False)
        rank, processes = _process_rank()
        self.metric.reset_real_features = True
        self.metric.reset()
        self.metric.reset_real_features = False
        self._add(images[rank * len(images) // processes: (rank + 1) * len(images) // processes], real=True)

    def score(self, images: torch.Tensor | np.ndarray) -> float:
        """FID between `images` (uint8, N >= 2) and the reference set.

        Under torch.distributed each process passes its own share of the samples (every process calls this
        together): torchmetrics gathers their feature statistics, so the distance is that of all of them.
        """
        if self.reference_size < 1:
            raise RuntimeError("FIDScorer has no reference statistics: call set_reference(real_images) first.")
        images = self._checked(images, "images", shared=True)
        self.metric.reset()
        self._add(images, real=False)
        return float(self.metric.compute())

    def _checked(self, images: torch.Tensor | np.ndarray, name: str, shared: bool = False) -> torch.Tensor:
        images = check_uint8_nhwc(images, name)
        if len(images) < 2 and not (shared and _process_rank()[1] > 1):  # a share may be small; the union counts
            raise ValueError(f"{name} hold {len(images)} image(s); FID needs at least 2 (a covariance), and far more "
                             "than the feature width for a stable value.")
        if images.shape[-1] != self.channels and not (images.shape[-1] == 1 and self.channels == 3):
            raise ValueError(f"{name} have {images.shape[-1]} channels but this feature extractor reads "
                             f"{self.channels}.")
        return images

    @torch.no_grad()
    def features(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The feature vectors (N, D) that FID compares, float64 on the CPU: what a bootstrap of FID resamples."""
        images = self._checked(images, "images")
        return torch.cat([self.metric.inception(batch).double().cpu() for batch in self._batches(images)])

    def _batches(self, images: torch.Tensor) -> Iterator[torch.Tensor]:
        device = self.metric.device
        for batch in images.split(self.batch_size):
            batch = batch.to(device).permute(0, 3, 1, 2)  # (B, C, H, W) uint8
            if batch.shape[1] != self.channels:
                batch = batch.expand(-1, self.channels, -1, -1)  # gray as RGB for Inception
            yield batch

    def _add(self, images: torch.Tensor, real: bool) -> None:
        # a process without a share adds nothing (no batch), and still joins the sync in compute()
        for batch in self._batches(images):
            self.metric.update(batch, real=real)


def _process_rank() -> tuple[int, int]:
    """(rank, number of processes) of the torch.distributed group torchmetrics syncs over; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def digits_fid(classifier: DigitsClassifier, image_size: int, batch_size: int = 500) -> FIDScorer:
    """FID in the feature space of the project's digits classifier: offline, for the embedded default."""
    metric = FrechetInceptionDistance(feature=DigitsFeatureExtractor(classifier), normalize=False,
                                      input_img_size=(1, image_size, image_size), reset_real_features=False)
    return FIDScorer(metric, channels=1, batch_size=batch_size)


def inception_fid(weights_path: str | Path | None = None, feature: int = 2048, batch_size: int = 100) -> FIDScorer:
    """The standard Inception-v3 FID (torch-fidelity's port of the TF weights), for ImageNet-scale models.

    weights_path: a local copy of the Inception weights for machines without network; None lets
    torch-fidelity download them once into torch hub's cache.
    """
    if feature not in INCEPTION_FEATURES:
        raise UsageError(f"feature={feature!r} is invalid: Inception FID uses one of {INCEPTION_FEATURES} "
                         "(2048 is the standard FID).")
    if weights_path is not None and not Path(weights_path).is_file():
        raise MissingInputError(
            f"weights_path={str(weights_path)!r} does not exist. Download {INCEPTION_WEIGHTS_FILE} from "
            f"{INCEPTION_WEIGHTS_URL} on a machine with network, copy it here and pass its path."
        )
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ModuleNotFoundError(
            "Inception FID needs torch-fidelity, which is not installed: `pip install torch-fidelity` (or "
            "`pip install 'tinyfusion_pl[fid]'`). Without network, also download the Inception weights from "
            f"{INCEPTION_WEIGHTS_URL} and pass their path as weights_path (evaluate.inception_weights). "
            "The digits default needs neither: its FID uses the cached digits classifier."
        )
    metric = FrechetInceptionDistance(
        feature=feature, normalize=False, reset_real_features=False,
        feature_extractor_weights_path=None if weights_path is None else str(weights_path),
    )
    return FIDScorer(metric, channels=3, batch_size=batch_size)
