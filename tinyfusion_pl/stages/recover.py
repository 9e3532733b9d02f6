"""stage=recover: fine-tune the pruned model, plainly or distilled from a teacher (KD, masked KD)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn as nn
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tinyfusion_pl import distributed
from tinyfusion_pl.distill import DistillationModule, layer_pairing
from tinyfusion_pl.errors import MissingInputError, UsageError
from tinyfusion_pl.families import family_of
from tinyfusion_pl.io import (
    begin_output_set,
    check_output_set,
    file_digest,
    finish_output_set,
    save_json,
    save_torch,
)
from tinyfusion_pl.module import DiffusionModule
from tinyfusion_pl.pruning.calibration import calibration_batches, calibration_loss
from tinyfusion_pl.stages.common import (
    build_data,
    build_trainer,
    checkpoint_payload,
    clear_strays,
    finish_loggers,
    fit,
    gather_full_weights,
    judge_samples,
    load_model,
    model_title,
    pruned_checkpoint_name,
    read_decision,
    resume_checkpoint,
    sample_grid,
    stage_dir,
)

DISTILL_METHODS = ("none", "kd", "masked_kd")


def pruned_folder(cfg: DictConfig) -> Path:
    """recover.pruned when given, else this run's prune/ folder; it must hold one whole prune output.

    pruned.pt and decision.json must come from the same prune run (its manifest.json says so): a pruned model
    distilled with another run's decision would pair the wrong layers without a word.
    """
    folder = Path(cfg.recover.pruned) if cfg.recover.pruned else Path(cfg.paths.run_dir) / "prune"
    fix = (f"Run stage=prune again with hydra.run.dir={folder.parent} (pruning.resume_from=auto continues a killed "
           "learnable run), or pass recover.pruned=/path/to/<run>/prune (the folder of a finished stage=prune).")
    manifest = check_output_set(folder, "prune", ["decision.json"], fix)
    missing = [name for name in (pruned_checkpoint_name(folder), "decision.json") if not (folder / name).exists()]
    if missing:
        raise MissingInputError(
            f"recover.pruned={folder} lacks {', '.join(missing)}. Run stage=prune in this run folder first, or pass "
            "recover.pruned=/path/to/<run>/prune (the folder stage=prune wrote)."
        )
    if manifest is not None and pruned_checkpoint_name(folder) not in manifest["files"]:
        raise UsageError(f"{folder}/decision.json names {pruned_checkpoint_name(folder)}, which its manifest.json "
                         f"does not list: the files come from different runs. {fix}")
    return folder


def recovery_teacher(cfg: DictConfig, decision: dict[str, Any]) -> tuple[nn.Module, Path]:
    """The teacher: teacher.checkpoint (built as registry entry teacher.name when given) or the pruning teacher.

    Its depth is read from the checkpoint, so a shallow teacher (e.g. a recovered D14) needs no extra setting.
    """
    if cfg.teacher.name and not cfg.teacher.checkpoint:
        raise UsageError(
            f"teacher.name={cfg.teacher.name} needs its weights: pass teacher.checkpoint=/path/to/model.pt as well."
        )
    path = Path(cfg.teacher.checkpoint or decision["teacher"])
    if not path.exists():
        source = "teacher.checkpoint" if cfg.teacher.checkpoint else "the pruning teacher in decision.json"
        raise MissingInputError(f"{source}, {path}, does not exist. Pass teacher.checkpoint=/path/to/model.pt.")
    return load_model(cfg, path, cfg.teacher.name), path


def build_recovery_module(
    cfg: DictConfig, student: nn.Module, decision: dict[str, Any]
) -> tuple[DiffusionModule, Path | None]:
    """The module of the `distill` group's method, with its teacher (None for plain fine-tuning)."""
    distill, module_options = cfg.distill, OmegaConf.to_container(cfg.recover.module, resolve=True)
    objective = instantiate(cfg.objective)
    if distill.method not in DISTILL_METHODS:
        raise UsageError(f"distill.method='{distill.method}' is not one of {DISTILL_METHODS}. Pass e.g. distill=kd.")
    if distill.method == "none":
        return DiffusionModule(student, objective=objective, **module_options), None
    teacher, teacher_path = recovery_teacher(cfg, decision)
    feature_pairs = None
    if distill.method == "masked_kd":
        pairing = OmegaConf.to_object(distill.pairing) if OmegaConf.is_config(distill.pairing) else distill.pairing
        family = family_of(student)
        teacher_counts = family.block_counts(teacher)
        feature_pairs = layer_pairing(pairing, sum(family.block_counts(student)), sum(teacher_counts),
                                      kept_blocks=decision["kept_blocks"], pruned_depth=decision.get("num_blocks"),
                                      container_lengths=teacher_counts)
    module = DistillationModule(
        student, teacher, objective=objective, kd_weight=distill.kd_weight, gt_weight=distill.gt_weight,
        feature_pairs=feature_pairs, feature_weight=tuple(distill.get("feature_weight", (0.0, 0.0))),
        sigma_k=distill.get("sigma_k", 2.0), feature_loss=distill.get("feature_loss", "reference"),
        **module_options,
    )
    return module, teacher_path


def check_teacher_fits(module: DiffusionModule, batch: tuple[torch.Tensor, dict], cfg: DictConfig, teacher: Path) -> None:
    """The distillation losses of two samples, untrained: a teacher whose outputs or paired hidden states do not
    match the student's fails here, before the trainer writes anything (its own generator: no global RNG drawn)."""
    if not isinstance(module, DistillationModule):
        return
    x, cond = batch
    sample = x[:2] if "y" not in cond else (x[:2], cond["y"][:2])
    try:
        with torch.no_grad():
            module.distillation_losses(sample, generator=torch.Generator().manual_seed(cfg.seed))
    except ValueError as error:
        raise UsageError(
            f"the teacher {teacher} does not fit the pruned student for distill={cfg.distill.method}: {error} Distil "
            "from a teacher of the student's architecture (teacher.checkpoint, teacher.name), or pass distill=kd "
            "(outputs only) when only the hidden widths differ."
        ) from error


def run_recover(cfg: DictConfig) -> dict[str, Any]:
    """Fine-tune the pruned model of a prune folder; writes recover/model.pt ({'model','ema'}) and metrics.json."""
    clear_strays(cfg, "recover")
    source = pruned_folder(cfg)
    # A resumed recovery must distil the pruned model it started with: its decision is recorded in the checkpoints.
    inputs = {"recover.pruned's decision.json (sha256)": file_digest(source / "decision.json")}
    resume_from = resume_checkpoint(cfg, "recover", "recover.resume_from", inputs)
    decision = read_decision(source)
    datamodule = build_data(cfg)
    L.seed_everything(cfg.seed, workers=True)
    student = load_model(cfg, source / pruned_checkpoint_name(source))
    objective = instantiate(cfg.objective)
    batches = calibration_batches(datamodule, cfg.recover.calibration_batches, seed=cfg.seed)
    loss_before = distributed.on_rank_zero(calibration_loss, student, objective, batches, seed=cfg.seed)
    module, teacher_path = build_recovery_module(cfg, student, decision)
    check_teacher_fits(module, batches[0], cfg, teacher_path)
    folder = stage_dir(cfg, "recover")  # after every check: a refused run leaves no folder behind
    trainer = build_trainer(cfg, "recover", max_steps=cfg.recover.max_steps, inputs=inputs)
    fit(trainer, module, datamodule, resume_from)
    gather_full_weights(module, lambda: load_model(cfg, source / pruned_checkpoint_name(source)))
    return distributed.on_rank_zero(save_recovered, cfg, module, trainer, folder, {
        "steps": trainer.global_step,
        "nonfinite_steps": module.nonfinite_steps,
        "distill": cfg.distill.method,
        "teacher": None if teacher_path is None else str(teacher_path),
        "pruned": str(source),
        "kept_blocks": decision["kept_blocks"],
        "feature_pairs": [list(pair) for pair in getattr(module, "feature_pairs", [])],
    }, objective, batches, loss_before)


def save_recovered(
    cfg: DictConfig, module: DiffusionModule, trainer: L.Trainer, folder: Path, metrics: dict[str, Any],
    objective: Any, batches: list, loss_before: float,
) -> dict[str, Any]:
    """What stage=recover writes once its fit ended (on global rank zero): model.pt, the losses, samples."""
    finish_loggers(trainer.loggers, folder)
    payload = checkpoint_payload(module, cfg)
    payload["kept_blocks"] = metrics["kept_blocks"]
    begin_output_set(folder, "recover")
    checkpoint = save_torch(payload, folder / "model.pt")
    metrics["calibration_loss"] = {
        "pruned": loss_before,
        "recovered": calibration_loss(module.net, objective, batches, seed=cfg.seed),
        "recovered_ema": calibration_loss(module.sampling_net(), objective, batches, seed=cfg.seed),
    }
    metrics["checkpoint"] = str(checkpoint)
    outputs = ["model.pt", "metrics.json"]
    if cfg.sampling.samples_per_class > 0:
        title = f"{model_title(cfg)}, {len(metrics['kept_blocks'])} blocks, recovered ({cfg.distill.method})"
        images, labels = sample_grid(module, cfg, folder / "samples.png", title=title)
        metrics.update(judge_samples(cfg, images, labels))
        outputs.append("samples.png")
    save_json(metrics, folder / "metrics.json")
    finish_output_set(folder, "recover", outputs)
    return metrics
