"""Calibration: fixed batches, times and noise on which models are scored without training.

Every model scored on the same batches sees the same times (the objective's stratified times) and the
same noise, so differences between models are not sampling noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from tinyfusion_pl.errors import UsageError
from tinyfusion_pl.objectives import DiffusionObjective, split_batch

Batch = tuple[torch.Tensor, dict[str, torch.Tensor]]


def calibration_batches(datamodule: Any, count: int, seed: int = 0) -> list[Batch]:
    """The first `count` training batches under a fixed seed, as (x, cond) pairs kept in memory."""
    if count < 1:
        raise UsageError(f"calibration_batches={count} must be >= 1.")
    datamodule.setup("fit")
    batches = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for batch in datamodule.train_dataloader():
            batches.append(split_batch(batch))
            if len(batches) == count:
                break
    return batches


@torch.inference_mode()
def calibration_losses(
    net: nn.Module,
    objective: DiffusionObjective,
    batches: Sequence[Batch],
    seed: int = 0,
    progress: bool = False,
    description: str = "calibration loss",
) -> list[torch.Tensor]:
    """The per-sample losses (N,) of `net` in eval mode on every batch, one tensor per batch.

    Batch i is noised at `objective.stratified_timesteps(N, i, ...)` with noise (and any other randomness of the
    objective, e.g. MAR's orders) drawn from `seed`, the same for every model scored. Forward hooks on the net see every calibration forward (block influence uses this).
    """
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    losses = []
    try:
        for index, (x, cond) in enumerate(tqdm(batches, desc=description, disable=not progress, leave=False)):
            noise = torch.randn(x.shape, generator=generator).to(device)
            t = objective.stratified_timesteps(len(x), index, device)
            terms = objective.training_losses(net, x.to(device), t, noise=noise,
                                              model_kwargs={name: value.to(device) for name, value in cond.items()},
                                              generator=generator)
            losses.append(terms["loss"])
    finally:
        net.train(was_training)
    return losses


def calibration_loss(
    net: nn.Module, objective: DiffusionObjective, batches: Sequence[Batch], seed: int = 0, progress: bool = False
) -> float:
    """Mean loss of `net` over `batches`, with the same times and noise for every model it scores."""
    losses = calibration_losses(net, objective, batches, seed=seed, progress=progress)
    return sum(loss.sum().item() for loss in losses) / sum(len(loss) for loss in losses)
