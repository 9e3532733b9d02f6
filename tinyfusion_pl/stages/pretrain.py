"""stage=pretrain: train a diffusion transformer from scratch or from a checkpoint, then sample from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tinyfusion_pl.io import save_json, save_torch
from tinyfusion_pl.loggers import log_images
from tinyfusion_pl.module import DiffusionModule
from tinyfusion_pl.stages.common import (
    build_trainer,
    config_fingerprint,
    finish_loggers,
    save_image_grid,
    stage_dir,
)


def cached_teacher_path(cfg: DictConfig) -> Path:
    """Where the pretrained checkpoint for this model, data, objective, pretraining and seed is cached."""
    key = config_fingerprint(cfg.model, cfg.data, cfg.objective, cfg.pretrain, cfg.seed)
    return Path(cfg.paths.cache_dir) / "teachers" / key / "model.pt"


def is_embedded_default(cfg: DictConfig) -> bool:
    return cfg.data._target_.endswith("DigitsDataModule")


def build_module(cfg: DictConfig, stage_cfg: DictConfig, net: torch.nn.Module | None = None) -> DiffusionModule:
    """A DiffusionModule for the configured model and objective with this stage's optimisation settings."""
    net = net if net is not None else instantiate(cfg.model)
    return DiffusionModule(net, objective=instantiate(cfg.objective), **stage_cfg.module)


def checkpoint_payload(module: DiffusionModule, cfg: DictConfig) -> dict[str, Any]:
    """The reference code's checkpoint layout ({'model', 'ema'}) plus the config that made it."""
    payload = {"model": module.net.state_dict(), "config": OmegaConf.to_container(cfg, resolve=True)}
    if module.ema is not None:
        payload["ema"] = module.ema.module.state_dict()
    return payload


def sample_grid(module: DiffusionModule, cfg: DictConfig, path: Path, title: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample `samples_per_class` images of every class with the configured sampler; save them as a grid."""
    sampling = cfg.sampling
    num_classes = module.sampling_net().num_classes
    labels = torch.arange(num_classes).repeat_interleave(sampling.samples_per_class)
    images = module.sample(labels, steps=sampling.steps, method=sampling.method, cfg_scale=sampling.cfg_scale,
                           clip_denoised=sampling.clip_denoised, seed=cfg.seed, progress=sampling.progress)
    # one row per sample index, one column per class: each column is a class
    order = torch.arange(len(labels)).view(num_classes, -1).t().reshape(-1)
    save_image_grid(images[order], path, nrow=num_classes, title=title)
    return images, labels


def run_pretrain(cfg: DictConfig) -> dict[str, Any]:
    """Train the configured model on the configured data; write model.pt, samples.png and metrics.json."""
    folder = stage_dir(cfg, "pretrain")
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    module = build_module(cfg, cfg.pretrain)
    trainer = build_trainer(cfg, "pretrain", max_steps=cfg.pretrain.max_steps)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.pretrain.resume_from)
    payload = checkpoint_payload(module, cfg)
    checkpoint = save_torch(payload, folder / "model.pt")
    save_torch(payload, cached_teacher_path(cfg))  # later stages and runs reuse it instead of retraining
    metrics: dict[str, Any] = {"steps": trainer.global_step, "checkpoint": str(checkpoint)}
    if cfg.sampling.samples_per_class > 0:
        images, labels = sample_grid(module, cfg, folder / "samples.png", title=f"{cfg.model.name}, pretrained")
        metrics.update(evaluate_digits_samples(cfg, images, labels))
        log_images(trainer.loggers, {"pretrain/samples": folder / "samples.png"})
    save_json(metrics, folder / "metrics.json")
    finish_loggers(trainer.loggers, folder)
    return metrics


def evaluate_digits_samples(cfg: DictConfig, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Conditional accuracy of digits samples under the cached digits classifier; nothing for other data."""
    if not is_embedded_default(cfg):
        return {}
    from tinyfusion_pl.evaluation.digits_classifier import (
        conditional_accuracy,
        load_or_train_digits_classifier,
    )

    classifier = load_or_train_digits_classifier(cfg.paths.cache_dir, cfg.data.image_size)
    return {"conditional_accuracy": conditional_accuracy(classifier, images, labels)}
