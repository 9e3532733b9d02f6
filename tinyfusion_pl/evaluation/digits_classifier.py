"""A small digits classifier: judges class-conditional samples and gives FID an offline feature space."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyfusion_pl.data.digits import NUM_CLASSES, load_digits_tensors, split_indices
from tinyfusion_pl.io import save_torch


class DigitsClassifier(nn.Module):
    """A two-convolution CNN for digits in [-1, 1]; `features` is its penultimate layer."""

    def __init__(self, image_size: int = 8, feature_dim: int = 64) -> None:
        super().__init__()
        self.image_size = image_size
        self.feature_dim = feature_dim
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(64 * 4 * 4, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, NUM_CLASSES)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images.clamp(-1.0, 1.0))  # (N, feature_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))  # (N, 10) logits


def train_digits_classifier(image_size: int = 8, epochs: int = 30, seed: int = 0) -> tuple[DigitsClassifier, float]:
    """Train on the digits train split (the same split the diffusion models see); returns (model, val accuracy)."""
    generator = torch.Generator().manual_seed(seed)
    images, labels = load_digits_tensors(image_size)
    train_idx, val_idx = split_indices(len(labels), 0.1, 0)
    torch.manual_seed(seed)
    classifier = DigitsClassifier(image_size)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=2e-3)
    train_images, train_labels = images[train_idx], labels[train_idx]
    for _ in range(epochs):
        for batch in torch.randperm(len(train_idx), generator=generator).split(64):
            # mild noise makes the classifier judge imperfect samples by shape, not by exact pixel values
            noisy = train_images[batch] + 0.1 * torch.randn(train_images[batch].shape, generator=generator)
            loss = F.cross_entropy(classifier(noisy), train_labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    classifier.eval()
    with torch.no_grad():
        accuracy = (classifier(images[val_idx]).argmax(1) == labels[val_idx]).float().mean().item()
    return classifier, accuracy


def load_or_train_digits_classifier(cache_dir: str | Path, image_size: int = 8) -> DigitsClassifier:
    """The cached classifier for this image size, trained (seconds on a CPU) and cached on first use."""
    path = Path(cache_dir) / f"digits_classifier_{image_size}px.pt"
    classifier = DigitsClassifier(image_size)
    if path.is_file():
        classifier.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        classifier, _ = train_digits_classifier(image_size)
        save_torch(classifier.state_dict(), path)
    return classifier.eval().requires_grad_(False)


@torch.no_grad()
def conditional_accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of samples that the classifier assigns to the class they were conditioned on."""
    predictions = classifier(images.to(next(classifier.parameters()).device)).argmax(1).cpu()
    return (predictions == labels.cpu()).float().mean().item()

