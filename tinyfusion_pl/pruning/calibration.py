"""Calibration loss: the diffusion loss of a model on fixed batches, timesteps and noise (no training)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from tinyfusion_pl.objectives import DiffusionObjective, split_batch

Batch = tuple[torch.Tensor, dict[str, torch.Tensor]]


def calibration_batches(datamodule: Any, count: int, seed: int = 0) -> list[Batch]:
    """The first `count` training batches under a fixed seed, as (x, cond) pairs kept in memory."""
    if count < 1:
        raise ValueError(f"calibration_batches={count} must be >= 1.")
    datamodule.setup("fit")
    batches = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for batch in datamodule.train_dataloader():
            batches.append(split_batch(batch))
            if len(batches) == count:
                break
    return batches


def stratified_timesteps(batch_size: int, num_timesteps: int, offset: int, device: torch.device) -> torch.Tensor:
    """Timesteps spread evenly over [0, T) across the batch, shifted by `offset`: low variance, every noise level."""
    spread = torch.arange(batch_size, device=device) * num_timesteps // batch_size
    return (spread + offset) % num_timesteps


@torch.inference_mode()
def calibration_loss(
    net: nn.Module, objective: DiffusionObjective, batches: list[Batch], seed: int = 0, progress: bool = False
) -> float:
    """Mean diffusion loss of `net` over `batches`, with the same timesteps and noise for every model it scores."""
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for index, (x, cond) in enumerate(tqdm(batches, desc="calibration loss", disable=not progress, leave=False)):
        noise = torch.randn(x.shape, generator=generator).to(device)
        t = stratified_timesteps(len(x), objective.num_timesteps, offset=index * 7, device=device)
        terms = objective.training_losses(net, x.to(device), t, noise=noise,
                                          model_kwargs={k: v.to(device) for k, v in cond.items()})
        total += terms["loss"].sum().item()
        count += len(x)
    net.train(was_training)
    return total / count
