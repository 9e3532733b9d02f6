"""stage=prune: choose the blocks to keep (learnable or a baseline selector) and export the shallow model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn as nn
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tinyfusion_pl.callbacks.block_mask import DifferentiableBlockMask
from tinyfusion_pl.callbacks.weight_update import CoOptimizedWeightUpdate
from tinyfusion_pl.io import save_json, save_torch
from tinyfusion_pl.module import DiffusionModule
from tinyfusion_pl.pruning.calibration import calibration_batches, calibration_loss
from tinyfusion_pl.pruning.export import prune_blocks
from tinyfusion_pl.stages.common import build_trainer, finish_loggers, stage_dir
from tinyfusion_pl.stages.teacher import build_teacher, resolve_teacher_checkpoint

BLOCKS = "blocks"  # the block container of a DiT


def learnable_selection(cfg: DictConfig, net: nn.Module, datamodule: L.LightningDataModule, folder: Path) -> dict[str, Any]:
    """TinyFusion: learn the kept blocks with Gumbel gates while a weight update estimates recoverability."""
    pruning = cfg.pruning
    module = DiffusionModule(net, objective=instantiate(cfg.objective), lr=pruning.lr, ema_decay=None)
    mask = DifferentiableBlockMask(
        blocks=f"net.{BLOCKS}", pattern=OmegaConf.to_object(pruning.pattern) if pruning.pattern else None,
        keep_ratio=None if pruning.pattern else pruning.keep_ratio,
        group_size=None if pruning.pattern else pruning.group_size,
        scaling=pruning.scaling, tau=tuple(pruning.tau), lr_multiplier=pruning.gate_lr_multiplier,
        ema_decay=pruning.gate_ema_decay, plot=False,
    )
    weight_update = CoOptimizedWeightUpdate(method=pruning.weight_update, rank=pruning.rank, alpha=pruning.alpha,
                                            blocks=f"net.{BLOCKS}")
    trainer = build_trainer(cfg, "prune", max_steps=pruning.max_steps, callbacks=[mask, weight_update])
    trainer.fit(module, datamodule=datamodule)
    finish_loggers(trainer, folder)
    mask.plot_dynamics(folder / "decision_dynamics.png")
    return mask.decision()


def run_prune(cfg: DictConfig) -> dict[str, Any]:
    """Select the kept blocks of the teacher, export the shallow model; writes pruned.pt and decision.json."""
    folder = stage_dir(cfg, "prune")
    teacher_path = resolve_teacher_checkpoint(cfg)
    L.seed_everything(cfg.seed, workers=True)
    net = build_teacher(cfg)
    datamodule = instantiate(cfg.data)
    objective = instantiate(cfg.objective)
    if cfg.pruning.selector == "learnable":
        decision = learnable_selection(cfg, net, datamodule, folder)
    else:
        raise ValueError(f"pruning.selector='{cfg.pruning.selector}' is not one of ['learnable'].")
    shallow = prune_blocks(net, blocks=BLOCKS, keep=decision["kept_blocks"])
    batches = calibration_batches(datamodule, cfg.pruning.calibration_batches, seed=cfg.seed)
    decision.update(
        selector=cfg.pruning.selector,
        teacher=str(teacher_path),
        num_blocks=len(getattr(net, BLOCKS)),
        calibration_loss=calibration_loss(shallow, objective, batches, seed=cfg.seed),
    )
    save_torch(shallow.state_dict(), folder / "pruned.pt")
    save_json(decision, folder / "decision.json")
    return {"kept_blocks": decision["kept_blocks"], "calibration_loss": decision["calibration_loss"],
            "pruned": str(folder / "pruned.pt")}


def load_pruned(cfg: DictConfig, folder: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The shallow model and decision that stage=prune wrote into `folder`."""
    decision = json.loads((folder / "decision.json").read_text())
    net = instantiate(cfg.model, depth=len(decision["kept_blocks"]))
    net.load_state_dict(torch.load(folder / "pruned.pt", map_location="cpu", weights_only=True), strict=True)
    return net, decision
