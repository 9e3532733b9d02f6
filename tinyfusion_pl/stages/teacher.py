"""The model every later stage starts from: a given checkpoint, or the embedded default pretrained once and cached."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn
from hydra.utils import instantiate
from omegaconf import DictConfig

from tinyfusion_pl.models import extract_state_dict, infer_dit_config, load_checkpoint_file
from tinyfusion_pl.module import load_weights
from tinyfusion_pl.stages.pretrain import cached_teacher_path, is_embedded_default, run_pretrain


def resolve_teacher_checkpoint(cfg: DictConfig) -> Path:
    """teacher.checkpoint when given; else this run's pretrain output; else the cache, pretraining on a miss.

    Pretraining on a miss happens only for the embedded digits default: a real model needs a real checkpoint.
    """
    if cfg.teacher.checkpoint:
        path = Path(cfg.teacher.checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"teacher.checkpoint={path} does not exist. Pass the path of a DiT checkpoint.")
        return path
    this_run = Path(cfg.paths.run_dir) / "pretrain" / "model.pt"
    if this_run.is_file():
        return this_run
    cached = cached_teacher_path(cfg)
    if cached.is_file():
        return cached
    if not is_embedded_default(cfg):
        raise ValueError(
            f"stage={cfg.stage} needs a teacher for model={cfg.model.name}: pass teacher.checkpoint=/path/to/model.pt "
            "(e.g. DiT-XL-2-256x256.pt). Only the embedded digits default is pretrained automatically."
        )
    run_pretrain(cfg)  # fills the cache
    return cached


def build_teacher(cfg: DictConfig) -> nn.Module:
    """The configured model with the teacher's weights (EMA where the checkpoint has them)."""
    net = instantiate(cfg.model)
    load_weights(net, str(resolve_teacher_checkpoint(cfg)), prefer="ema")
    return net


def load_net(cfg: DictConfig, path: Path, registry_name: str | None = None) -> nn.Module:
    """The configured model (or registry entry `registry_name`) with the checkpoint's depth, loaded strictly.

    EMA weights are taken where the checkpoint has them.
    """
    state_dict = extract_state_dict(load_checkpoint_file(path), prefer="ema")
    architecture = {"depth": infer_dit_config(state_dict)["depth"]}
    if registry_name:
        architecture["name"] = registry_name
    net = instantiate(cfg.model, **architecture)
    load_weights(net, state_dict)
    return net
