"""stage=prune: choose the blocks to keep (learnable or a baseline selector) and export the shallow model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch.nn as nn
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tinyfusion_pl import distributed
from tinyfusion_pl.callbacks.block_mask import DifferentiableBlockMask
from tinyfusion_pl.callbacks.weight_update import CoOptimizedWeightUpdate
from tinyfusion_pl.errors import UsageError
from tinyfusion_pl.families import family_of
from tinyfusion_pl.io import begin_output_set, finish_output_set, save_json
from tinyfusion_pl.loggers import log_images
from tinyfusion_pl.module import DiffusionModule
from tinyfusion_pl.pruning.calibration import calibration_batches, calibration_loss
from tinyfusion_pl.pruning.export import prune_blocks
from tinyfusion_pl.pruning.selectors import (
    bi_score,
    by_index,
    oracle,
    random_blocks,
    selection_groups,
    sensitivity,
)
from tinyfusion_pl.stages.common import (
    build_data,
    build_trainer,
    clear_strays,
    finish_loggers,
    fit,
    gather_full_weights,
    load_teacher,
    model_family,
    resolve_teacher_checkpoint,
    resume_checkpoint,
    stage_dir,
)


def learnable_callbacks(cfg: DictConfig, blocks: str | list[str]) -> tuple[DifferentiableBlockMask, CoOptimizedWeightUpdate]:
    """The mask and the weight update of the `pruning` group, built (and so checked) before any model is loaded."""
    pruning = cfg.pruning
    pattern, tau = (OmegaConf.to_object(value) if OmegaConf.is_config(value) else value
                    for value in (pruning.pattern, pruning.tau))
    mask = DifferentiableBlockMask(
        blocks=blocks, pattern=pattern, keep_ratio=pruning.keep_ratio, group_size=pruning.group_size,
        scaling=pruning.scaling, tau=tuple(tau) if isinstance(tau, list) else tau, lr_multiplier=pruning.gate_lr_multiplier,
        ema_decay=pruning.gate_ema_decay, estimator=pruning.get("gate_estimator") or "straight_through",
        plot=False,
        log_every_n_steps=max(1, pruning.max_steps // 100),  # about 100 points on the dynamics figure
    )
    weight_update = CoOptimizedWeightUpdate(method=pruning.weight_update, rank=pruning.rank, alpha=pruning.alpha)
    return mask, weight_update


def learnable_selection(
    cfg: DictConfig, net: nn.Module, datamodule: L.LightningDataModule, folder: Path,
    callbacks: tuple[DifferentiableBlockMask, CoOptimizedWeightUpdate], resume_from: str | None = None,
) -> tuple[dict[str, Any], nn.Module]:
    """TinyFusion: learn the kept blocks with Gumbel gates while a weight update estimates recoverability.

    Returns the decision and the teacher with its original weights (the weight update hands them back), whole.
    """
    mask, weight_update = callbacks
    module = DiffusionModule(net, objective=instantiate(cfg.objective), lr=cfg.pruning.lr, ema_decay=None)
    trainer = build_trainer(cfg, "prune", max_steps=cfg.pruning.max_steps, callbacks=[mask, weight_update])
    fit(trainer, module, datamodule, resume_from)
    gather_full_weights(module, lambda: load_teacher(cfg))  # sharded by trainer=fsdp2: whole weights again

    def plot_and_close() -> None:
        begin_output_set(folder, "prune")  # from here on, the folder's older result is no longer whole
        log_images(trainer.loggers, {"prune/decision_dynamics": mask.plot_dynamics(folder / "decision_dynamics.png")})
        finish_loggers(trainer.loggers, folder)

    distributed.on_rank_zero(plot_and_close)
    return mask.decision(), module.net


BASELINE_SELECTORS = ("bi_score", "sensitivity", "oracle", "by_index", "random")


def baseline_selection(cfg: DictConfig, net: nn.Module, objective: Any, batches: list) -> dict[str, Any]:
    """A baseline selector of the paper's comparison; the learnable selector's decision fields plus `scores`."""
    family = family_of(net)
    blocks, depth = family.block_argument(), sum(family.block_counts(net))
    required = family.required_blocks(net)  # e.g. SD3's context-pre-only last block
    pruning = cfg.pruning
    options = OmegaConf.to_container(pruning, resolve=True, throw_on_missing=True)
    if pruning.selector in ("oracle", "by_index"):
        pattern = None
        if pruning.selector == "oracle":
            selection = oracle(depth, options["kept_blocks"], required_blocks=required)
        else:
            selection = by_index(depth, options["kept_blocks"], num_keep=options["num_keep"],
                                 required_blocks=required)
    else:
        pattern = options["pattern"]
        groups = selection_groups(depth, pattern, options["keep_ratio"], options["group_size"])
        if pruning.selector == "random":
            seed = cfg.seed if options.get("seed") is None else options["seed"]
            selection = random_blocks(depth, groups, seed=seed, required_blocks=required)
        else:
            score = bi_score if pruning.selector == "bi_score" else sensitivity
            selection = score(net, objective, batches, groups, blocks=blocks, seed=cfg.seed, progress=pruning.progress,
                              required_blocks=required)
    return {"depth": depth, "pattern": pattern, **selection.as_dict()}


def run_prune(cfg: DictConfig) -> dict[str, Any]:
    """Select the kept blocks of the teacher, export the shallow model; writes pruned.pt (in the family's own
    format) and decision.json."""
    if cfg.pruning.selector not in ("learnable", *BASELINE_SELECTORS):
        raise UsageError(
            f"pruning.selector='{cfg.pruning.selector}' is not one of {['learnable', *BASELINE_SELECTORS]}. "
            "Pick it with the pruning group, e.g. pruning=bi_score."
        )
    clear_strays(cfg, "prune")
    callbacks, resume_from = None, None
    if cfg.pruning.selector == "learnable":  # a bad pruning setting stops the run before the teacher is trained
        callbacks = learnable_callbacks(cfg, model_family(cfg).block_argument(prefix="net."))
        resume_from = resume_checkpoint(cfg, "prune", "pruning.resume_from")
    elif cfg.pruning.get("resume_from"):
        raise UsageError(f"pruning.resume_from={cfg.pruning.resume_from}: pruning.selector={cfg.pruning.selector} "
                         "trains nothing, so there is nothing to resume. Drop pruning.resume_from.")
    datamodule = build_data(cfg)
    teacher_path = resolve_teacher_checkpoint(cfg)
    L.seed_everything(cfg.seed, workers=True)
    net = load_teacher(cfg)
    if callbacks is not None:  # the pattern against the teacher's depth, before the trainer writes anything
        callbacks[0].pattern.groups_for_depth(sum(family_of(net).block_counts(net)))
    objective = instantiate(cfg.objective)
    batches = calibration_batches(datamodule, cfg.pruning.calibration_batches, seed=cfg.seed)
    if callbacks is not None:
        decision, net = learnable_selection(cfg, net, datamodule, stage_dir(cfg, "prune"), callbacks,
                                            resume_from)
    else:
        decision = baseline_selection(cfg, net, objective, batches)
    # Every rank exports what rank zero exports: a decision that differs anywhere stops the run here.
    distributed.check_same_on_every_rank(decision["kept_blocks"], "The pruning decision (kept_blocks)")
    folder = stage_dir(cfg, "prune")  # a baseline writes nothing before its decision is exported
    return distributed.on_rank_zero(export_decision, cfg, net, decision, objective, batches, folder, teacher_path,
                                    learned=callbacks is not None)


def export_decision(
    cfg: DictConfig, net: nn.Module, decision: dict[str, Any], objective: Any, batches: list, folder: Path,
    teacher_path: Path, learned: bool,
) -> dict[str, Any]:
    """Prune the teacher to the decision, measure its calibration loss, write pruned.pt and decision.json (once)."""
    family = family_of(net)
    if not learned:  # a learned decision began the set when its fit ended
        begin_output_set(folder, "prune")
    shallow = prune_blocks(net, blocks=family.block_argument(), keep=decision["kept_blocks"])
    decision.update(
        selector=cfg.pruning.selector,
        blocks=family.block_argument(),  # the containers' paths under the model, whichever selector chose
        checkpoint=family.checkpoint_name("pruned"),  # pruned.pt, or a save_pretrained folder
        teacher=str(teacher_path),
        num_blocks=sum(family.block_counts(net)),
        calibration_loss=calibration_loss(shallow, objective, batches, seed=cfg.seed),
    )
    checkpoint = family.save(shallow, folder / decision["checkpoint"])
    save_json(decision, folder / "decision.json")
    outputs = [decision["checkpoint"], "decision.json"]
    if learned:
        outputs.append("decision_dynamics.png")
    finish_output_set(folder, "prune", outputs)  # last: the set is whole
    return {"kept_blocks": decision["kept_blocks"], "calibration_loss": decision["calibration_loss"],
            "pruned": str(checkpoint)}

