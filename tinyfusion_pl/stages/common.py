"""What every stage shares: run folders, trainers and loggers built from the config, the sample grid."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from tinyfusion_pl.io import write_atomically
from tinyfusion_pl.loggers import describe_offline_runs, wandb_loggers


def stage_dir(cfg: DictConfig, stage: str) -> Path:
    """The folder of one stage inside the run folder (created)."""
    path = Path(cfg.paths.run_dir) / stage
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_loggers(cfg: DictConfig, stage: str) -> list[Logger]:
    """The `logger` group's loggers for one stage, writing into its folder."""
    root = stage_dir(cfg, stage)
    return [instantiate(node, save_dir=str(root)) for node in (cfg.logger or {}).values()]


def build_trainer(cfg: DictConfig, stage: str, max_steps: int, callbacks: list | None = None, **overrides: Any) -> L.Trainer:
    """A Trainer from the `trainer` group, with this stage's steps, logger and callbacks, writing into its folder."""
    root = stage_dir(cfg, stage)
    loggers = build_loggers(cfg, stage)
    extra_callbacks = [instantiate(node) for node in (cfg.callbacks or {}).values()]
    return instantiate(
        cfg.trainer,
        max_steps=max_steps,
        default_root_dir=str(root),
        logger=loggers or False,
        callbacks=extra_callbacks + list(callbacks or []),
        **overrides,
    )


def finish_loggers(loggers: list[Logger], stage_folder: Path) -> None:
    """Close a stage's loggers (each stage is its own W&B run) and say where offline W&B runs are."""
    for logger in loggers:
        logger.finalize("success")
    describe_offline_runs(loggers, stage_folder)
    for logger in wandb_loggers(loggers):
        logger.experiment.finish()


def config_fingerprint(*nodes: DictConfig | dict | Any) -> str:
    """A short stable hash of config nodes: the cache key of a trained teacher."""
    resolved = [OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node for node in nodes]
    return hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, title: str | None = None) -> Path:
    """Save (N, C, H, W) images in [-1, 1] as one PNG grid, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2)
    count, channels, height, width = images.shape
    nrow = nrow or int(count ** 0.5 + 0.999)
    rows = (count + nrow - 1) // nrow
    grid = torch.ones(channels, rows * (height + 1) + 1, nrow * (width + 1) + 1)
    for index, image in enumerate(images):
        row, col = divmod(index, nrow)
        grid[:, 1 + row * (height + 1): 1 + row * (height + 1) + height,
             1 + col * (width + 1): 1 + col * (width + 1) + width] = image
    figure = plt.figure(figsize=(grid.shape[2] / 12, grid.shape[1] / 12 + (0.4 if title else 0)), dpi=100)
    axes = figure.add_axes((0, 0, 1, 1 if not title else 0.92))
    axes.imshow(grid[0] if channels == 1 else grid.permute(1, 2, 0), cmap="gray" if channels == 1 else None,
                vmin=0, vmax=1, interpolation="nearest")
    axes.axis("off")
    if title:
        figure.suptitle(title, fontsize=9)
    write_atomically(path, lambda temporary: figure.savefig(temporary, format="png"))
    plt.close(figure)
    return Path(path)
