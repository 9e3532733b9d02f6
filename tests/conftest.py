"""Shared test fixtures: small models and Trainers that run in seconds on a 2-core CPU."""

import lightning as L
import pytest
import torch

from tinyfusion_pl.models import build_dit

torch.set_num_threads(1)  # tiny ops: a second thread costs more in sync than it gains


def tiny_dit(depth: int = 2, **kwargs) -> torch.nn.Module:
    """A DiT for 8x8 single-channel digits, small enough for a few CPU steps per second."""
    options = dict(input_size=8, in_channels=1, num_classes=10, depth=depth)
    options.update(kwargs)
    return build_dit("DiT-Tiny/2", **options)


def quick_trainer(tmp_path, max_steps: int, **kwargs) -> L.Trainer:
    """A CPU Trainer with no progress bar, checkpoints or sanity validation unless asked for."""
    options = dict(
        accelerator="cpu", devices=1, max_steps=max_steps, default_root_dir=str(tmp_path), logger=False,
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0,
    )
    options.update(kwargs)
    return L.Trainer(**options)


@pytest.fixture
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")
