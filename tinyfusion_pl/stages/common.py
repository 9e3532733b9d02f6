"""What the stages share, and the only module they share it through.

Run folders, trainers and loggers built from the config; the model of the config and its checkpoints at
any depth (through the model's family); the teacher, pretrained and cached on first use for the embedded
default; the objective's sampler options; sample grids and the digits judge. Stages never import each
other; the pipeline and the selector comparison compose them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn as nn
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from tinyfusion_pl import distributed
from tinyfusion_pl.callbacks.random_state import RandomStateCheckpoint
from tinyfusion_pl.errors import MissingInputError, UsageError, find_usage_error
from tinyfusion_pl.families import ModelFamily, family_of
from tinyfusion_pl.io import (
    atomic_path,
    begin_output_set,
    finish_output_set,
    remove_stray_temporaries,
    save_json,
    save_torch,
    write_atomically,
)
from tinyfusion_pl.loggers import describe_offline_runs, log_images, wandb_loggers
from tinyfusion_pl.models.checkpoints import CheckpointMismatchError
from tinyfusion_pl.module import DiffusionModule
from tinyfusion_pl.objectives import DiffusionObjective

# Keys of the `sampling` group that are not options of the objective's sampler.
SAMPLING_SETTINGS = ("cfg_scale", "samples_per_class", "progress")
JUDGES = ("digits", None)
SWEEP_DIR_VARIABLE = "TINYFUSION_SWEEP_DIR"
CHECKPOINT_FOLDER = "checkpoints"  # <stage>/checkpoints: the periodic Lightning checkpoints of a training stage
CHECKPOINT_RECORD = "tinyfusion_pl"  # the entry of a Lightning checkpoint that says which stage wrote it
SHARDED_METADATA = "meta.pt"  # the file of a sharded checkpoint folder that Lightning's ModelParallelStrategy writes last


def stage_dir(cfg: DictConfig, stage: str) -> Path:
    """The folder of one stage inside the run folder (created), rid of the temporaries a killed run left there."""
    path = Path(cfg.paths.run_dir) / stage
    path.mkdir(parents=True, exist_ok=True)
    clear_strays(cfg, stage)
    return path


def clear_strays(cfg: DictConfig, stage: str) -> None:
    """Remove the temporaries a killed run left in a stage's folder, creating nothing: stages call it first, so
    strays go even when a check then refuses the run."""
    if distributed.global_rank() == 0:  # the only rank that writes: another could take its temporaries for strays
        path = Path(cfg.paths.run_dir) / stage
        remove_stray_temporaries(path)
        remove_stray_temporaries(path.parent, recursive=False)  # the run folder's own files (report.md, metrics.json)


def start_processes(cfg: DictConfig) -> None:
    """Start the processes the `trainer` group asks for (one per device and node) before any stage runs.

    Every rank then runs the stages in step and writes into rank zero's run folder (ranks that torchrun or
    srun started apart may have stamped their own folders with another second).
    """
    trainer = cfg.trainer
    target = strategy_target(trainer)
    if names_fsdp(trainer):
        if trainer.get("accelerator") == "cpu" or not torch.cuda.is_available():
            raise UsageError(
                "trainer=fsdp (Lightning's FSDPStrategy) needs CUDA GPUs, and this machine has none. On CPUs shard "
                "with trainer=fsdp2 trainer.accelerator=cpu (FSDP2 over gloo), or replicate with trainer=ddp "
                "trainer.accelerator=cpu."
            )
    if "spawn" in target or "notebook" in target:
        raise UsageError(f"trainer.strategy={target} starts its processes inside trainer.fit, but every stage "
                         "of train.py runs on every rank: use trainer.strategy=ddp.")
    name_the_sweep_folder()
    processes = distributed.start_processes(trainer.get("accelerator", "auto"), trainer.get("devices", "auto"),
                                            trainer.get("num_nodes", 1))
    if processes is not None:
        cfg.paths.run_dir = processes.broadcast(str(cfg.paths.run_dir), src=0)


def strategy_target(trainer: DictConfig) -> str:
    """What `trainer.strategy` names: a registered name (ddp) or a class or factory path."""
    strategy = trainer.get("strategy")
    return strategy.get("_target_", "") if OmegaConf.is_dict(strategy) else str(strategy or "")


def names_fsdp(trainer: DictConfig) -> bool:
    """Whether `trainer.strategy` is Lightning's FSDPStrategy (trainer=fsdp), which needs CUDA GPUs."""
    target = strategy_target(trainer)
    return "fsdp_strategy" in target or target.endswith("FSDPStrategy") or target == "fsdp"


def writes_sharded_checkpoints(trainer: DictConfig) -> bool:
    """Whether the `trainer` config saves folders of shards (trainer=fsdp2, unless told to gather one file)."""
    strategy = trainer.get("strategy")
    return "fsdp2_strategy" in strategy_target(trainer) and strategy.get("save_distributed_checkpoint", True)


def name_the_sweep_folder() -> None:
    """In a Hydra sweep, pass its folder to the ranks Lightning is about to start (conf/train.yaml reads it).

    Lightning re-runs `python train.py -m ...` for them, so they run the same jobs in step; without this they
    would stamp their own sweep folder with the second they started in.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        os.environ.setdefault(SWEEP_DIR_VARIABLE, str(HydraConfig.get().sweep.dir))


def build_loggers(cfg: DictConfig, stage: str) -> list[Logger]:
    """The `logger` group's loggers for one stage, writing into its folder (W&B: grouped, see wandb_run_settings)."""
    root = stage_dir(cfg, stage)
    # merged into the node, not passed as keywords: `config` is also instantiate's own first argument
    return [instantiate(OmegaConf.merge(OmegaConf.to_container(node, resolve=True), wandb_run_settings(cfg, node, stage))
                        if is_wandb(node) else node, save_dir=str(root))
            for node in (cfg.logger or {}).values()]


WANDB_TARGETS = ("tinyfusion_pl.loggers.wandb_logger", "lightning.pytorch.loggers.WandbLogger",
                 "lightning.pytorch.loggers.wandb.WandbLogger")


def is_wandb(node: DictConfig) -> bool:
    return node.get("_target_") in WANDB_TARGETS


def wandb_run_settings(cfg: DictConfig, node: DictConfig, stage: str) -> dict[str, Any]:
    """group, job_type and config of one stage's W&B run.

    The stage runs of one run folder share a group (its path), and so do all jobs of a Hydra sweep (the sweep
    folder's path), each with its overrides (the swept values among them) in its config. A group set in the
    `logger` group wins. Only global rank zero ever creates the run (WandbLogger's experiment is rank-zero-only).
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    settings: dict[str, Any] = {"job_type": stage, "_convert_": "all"}  # W&B takes plain dicts, not DictConfig
    group = str(cfg.paths.run_dir)
    if HydraConfig.initialized():
        hydra = HydraConfig.get()
        group = str(hydra.sweep.dir) if hydra.mode == RunMode.MULTIRUN else str(hydra.runtime.output_dir)
        overrides = {key: value for key, _, value in (item.partition("=") for item in hydra.overrides.task)}
        settings["config"] = {"overrides": overrides, "job": hydra.job.get("num")}
    if node.get("group") is None:
        settings["group"] = group
    return settings


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written like every other output: a temporary beside the file, then a rename."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage: Lightning's own writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_path(path) as temporary:
            torch.save(checkpoint, temporary)


class StageRecord(Callback):
    """Writes which stage a checkpoint belongs to, and what it was trained on, into it: resuming another stage from
    it, or the same stage on other inputs, is refused."""

    def __init__(self, stage: str, inputs: dict[str, str] | None = None) -> None:
        self.stage = stage
        self.inputs = dict(inputs or {})

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_RECORD] = {"stage": self.stage, "inputs": self.inputs}


def build_trainer(cfg: DictConfig, stage: str, max_steps: int, callbacks: list | None = None,
                  inputs: dict[str, str] | None = None, **overrides: Any) -> L.Trainer:
    """A Trainer from the `trainer` group, with this stage's steps, logger and callbacks, writing into its folder.

    Periodic checkpoints (the `callbacks` group's ModelCheckpoint) go to <stage>/checkpoints, written atomically,
    with the stage's name, its `inputs` (name -> digest) and the random state of every rank in them, so that
    `<stage>.resume_from` continues exactly.
    """
    root = stage_dir(cfg, stage)
    loggers = build_loggers(cfg, stage)
    extra_callbacks = [instantiate(node) for node in (cfg.callbacks or {}).values()]
    for callback in extra_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
            callback.dirpath = str((root / CHECKPOINT_FOLDER).resolve())
    trainer = instantiate(
        cfg.trainer,
        max_steps=max_steps,
        default_root_dir=str(root),
        logger=loggers or False,
        callbacks=extra_callbacks + list(callbacks or []) + [RandomStateCheckpoint(), StageRecord(stage, inputs)],
        **overrides,
    )
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    return trainer


def resume_checkpoint(cfg: DictConfig, stage: str, option: str, inputs: dict[str, str] | None = None) -> str | None:
    """The Lightning checkpoint that `option` (e.g. pruning.resume_from) names for `stage`, checked; None to start anew.

    `auto` takes the newest checkpoint in <run folder>/<stage>/checkpoints, the run folder being the one this run
    writes to (hydra.run.dir). A checkpoint of another stage, of the same stage trained on other `inputs` (as
    build_trainer records them), or a file that is not a Lightning checkpoint, is refused.
    """
    value = OmegaConf.select(cfg, option)
    if value in (None, ""):
        return None
    folder = Path(cfg.paths.run_dir) / stage / CHECKPOINT_FOLDER
    if str(value) == "auto":
        candidates = sorted((path for path in folder.glob("*.ckpt") if not path.name.startswith(".")),
                            key=lambda path: (path.name == "last.ckpt", path.stat().st_mtime), reverse=True)
        if not candidates:
            raise MissingInputError(
                f"{option}=auto found no checkpoint in {folder}. `auto` resumes the run in the folder this run writes "
                "to, so pass that run's folder: hydra.run.dir=<the run folder> (e.g. outputs/prune/2026-01-01_12-00-00); "
                f"or pass {option}=/path/to/<run>/{stage}/{CHECKPOINT_FOLDER}/last.ckpt, or drop {option} to start at "
                "step 0. (Runs with callbacks=none write no checkpoints.)"
            )
        path = candidates[0]
    else:
        path = Path(value)
        if not path.exists():
            raise MissingInputError(f"{option}={path} does not exist. Pass a checkpoint from <run>/{stage}/"
                                    f"{CHECKPOINT_FOLDER}/ (last.ckpt), or {option}=auto with hydra.run.dir=<the run folder>.")
    if path.is_dir() != writes_sharded_checkpoints(cfg.trainer):
        written = "a folder of shards that trainer=fsdp2 writes" if path.is_dir() else "one file, not trainer=fsdp2's shards"
        raise UsageError(f"{option}={path} is {written}, and this run's trainer reads the other kind. Resume with the "
                         f"trainer the checkpoint was written with, or drop {option} to start at step 0.")
    record = checkpoint_record(path, option)
    if record is not None and record.get("stage") != stage:
        raise UsageError(
            f"{option}={path} is a checkpoint of stage={record.get('stage')}, not of stage={stage}. Pass one from "
            f"<run>/{stage}/{CHECKPOINT_FOLDER}/, or {option}=auto with hydra.run.dir=<the run folder>."
        )
    recorded = (record or {}).get("inputs", {})
    changed = [name for name, digest in (inputs or {}).items() if name in recorded and recorded[name] != digest]
    if changed:
        raise UsageError(
            f"{option}={path} was trained on other inputs than this run's: "
            + "; ".join(f"{name} was {recorded[name][:12]}..., is {inputs[name][:12]}... now" for name in changed)
            + f". Resume with the inputs the run started from, or drop {option} to start at step 0."
        )
    return str(path)


def checkpoint_record(path: Path, option: str) -> dict[str, Any] | None:
    """The stage record of a Lightning checkpoint (None for one written elsewhere), or an error naming the file.

    The file is memory-mapped: only the few entries read here are loaded, whatever the model's size. A sharded
    checkpoint (trainer=fsdp2) is a folder whose meta.pt holds everything but the weights and optimizer states.
    """
    sharded = path.is_dir()
    if sharded:
        if not (path / SHARDED_METADATA).is_file():
            raise UsageError(f"{option}={path} is a folder without {SHARDED_METADATA}, so not a whole sharded checkpoint "
                             f"(a kill while it was written leaves one). Pass another checkpoint, or drop {option} to "
                             "start at step 0.")
        path = path / SHARDED_METADATA
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - a truncated or foreign file fails in many ways
        raise UsageError(f"{option}={path} cannot be read as a checkpoint ({type(error).__name__}: {error}). It may be "
                         "cut short by a kill while it was written; pass another checkpoint, or drop "
                         f"{option} to start at step 0.") from error
    needed = {"global_step"} if sharded else {"state_dict", "global_step"}
    if not isinstance(checkpoint, dict) or not needed <= set(checkpoint):
        raise UsageError(f"{option}={path} is not a Lightning checkpoint (no state_dict/global_step): it takes the "
                         f".ckpt files in <run>/<stage>/{CHECKPOINT_FOLDER}/. To start from a model's weights instead, "
                         "use teacher.checkpoint or pretrain.module.init_checkpoint.")
    return checkpoint.get(CHECKPOINT_RECORD)


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


# --------------------------------------------------------------------------- the model and its checkpoints


def model_blueprint(cfg: DictConfig, registry_name: str | None = None) -> nn.Module:
    """The configured model (or registry entry `registry_name` of its family) on the meta device: no memory.

    It tells the family and the architecture; `ModelFamily.load` builds the real model at a checkpoint's depth.
    """
    overrides = {}
    if registry_name:
        if "name" not in cfg.model:
            raise UsageError(f"teacher.name={registry_name} picks a registry entry, but model={cfg.model._target_} "
                             "is not built from a registry (no model.name). Leave teacher.name unset.")
        overrides["name"] = registry_name
    with torch.device("meta"):
        return instantiate(cfg.model, **overrides)


def model_family(cfg: DictConfig) -> ModelFamily:
    return family_of(model_blueprint(cfg))


def load_model(cfg: DictConfig, checkpoint: str | Path, registry_name: str | None = None) -> nn.Module:
    """The configured model with a checkpoint's weights at the checkpoint's own depth, loaded strictly (EMA first)."""
    blueprint = model_blueprint(cfg, registry_name)
    try:
        return family_of(blueprint).load(checkpoint, like=blueprint)
    except CheckpointMismatchError as error:
        raise CheckpointMismatchError(
            f"{checkpoint}: {error}\nIn the config: set model.name to the entry that fits it (teacher.name for a "
            f"teacher of another size than the model), or pass a checkpoint of {registry_name or model_title(cfg)}."
        ) from error


def model_title(cfg: DictConfig) -> str:
    """How reports and grids name the configured model: its registry name, else its family's class."""
    return cfg.model.get("name") or model_family(cfg).class_name


# --------------------------------------------------------------------------- the teacher


def cached_teacher_path(cfg: DictConfig) -> Path:
    """Where the pretrained checkpoint for this model, data, objective, pretraining and seed is cached."""
    key = config_fingerprint(cfg.model, cfg.data, cfg.objective, cfg.pretrain, cfg.seed)
    return Path(cfg.paths.cache_dir) / "teachers" / key / "model.pt"


def resolve_teacher_checkpoint(cfg: DictConfig, pretrain: bool = True) -> Path | None:
    """teacher.checkpoint when given; else this run's pretrain output; else the cache, pretraining on a miss.

    Pretraining on a miss happens only where the config allows it (`teacher.pretrain_if_missing`, set by the
    embedded defaults): a real model needs a real checkpoint. With pretrain=False, None stands for that pretraining.
    """
    if cfg.teacher.checkpoint:
        path = Path(cfg.teacher.checkpoint)
        if not path.exists():
            raise MissingInputError(f"teacher.checkpoint={path} does not exist. Pass the path of a model checkpoint "
                                    "(a file, or a save_pretrained folder for a diffusers model).")
        return path
    this_run = Path(cfg.paths.run_dir) / "pretrain" / "model.pt"
    if this_run.is_file():
        return this_run
    cached = cached_teacher_path(cfg)
    if cached.is_file():
        return cached
    if not cfg.teacher.get("pretrain_if_missing"):
        raise UsageError(
            f"stage={cfg.stage} needs a teacher for model={model_title(cfg)}: pass teacher.checkpoint=/path/to/model.pt "
            "(e.g. DiT-XL-2-256x256.pt). Only the embedded digits defaults are pretrained automatically."
        )
    if not pretrain:
        return None
    run_pretrain(cfg)  # fills the cache
    return cached


def load_teacher(cfg: DictConfig) -> nn.Module:
    """The teacher of resolve_teacher_checkpoint, built as the configured model at its own depth (EMA weights)."""
    return load_model(cfg, resolve_teacher_checkpoint(cfg))


def instantiate_group(cfg: DictConfig, group: str, **overrides: Any) -> Any:
    """instantiate(cfg.<group>), with a mistake in the group's settings raised as a UsageError naming the group."""
    try:
        return instantiate(cfg[group], **overrides)
    except InstantiationException as error:
        raise group_error(error, group) from error


def group_error(error: InstantiationException, group: str) -> UsageError:
    """A UsageError for a group Hydra could not instantiate: its cause's message, or Hydra's for a wrong setting."""
    cause = find_usage_error(error)
    if cause is not None:
        return type(cause)(f"{group}: {cause}")
    reason = error.__cause__ or error
    if isinstance(reason, TypeError):  # e.g. +model.dpeth=4: an argument the target does not take
        return UsageError(f"{group}: {reason}. Remove the setting or correct its name (see conf/{group}/).")
    return UsageError(f"{group} cannot be built: {reason}")


def build_data(cfg: DictConfig) -> L.LightningDataModule:
    """The `data` group's datamodule, checked against the configured model: sample shape, classes, a full batch.

    Stages build it before loading or training anything, so data that cannot work stops the run at its start.
    """
    datamodule = instantiate_group(cfg, "data")
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    if len(loader) == 0:
        raise UsageError(
            f"data.batch_size={cfg.data.batch_size} is larger than the {len(loader.dataset)} training samples, so "
            f"training would see no full batch. Lower data.batch_size to at most {len(loader.dataset)}."
        )
    blueprint = model_blueprint(cfg)
    family = family_of(blueprint)
    sample_shape, expected = tuple(loader.dataset[0][0].shape), tuple(family.sample_shape(blueprint))
    if sample_shape != expected:
        raise UsageError(
            f"the data's samples have shape {sample_shape} (channels, height, width) but model={model_title(cfg)} "
            f"takes {expected}. Configure the model for the data (model.in_channels, model.input_size) or pick data "
            "that fits it (data.image_size for the digits)."
        )
    model_classes, data_classes = family.num_classes(blueprint), getattr(datamodule, "num_classes", None)
    if model_classes is not None and data_classes is not None and data_classes > model_classes:
        raise UsageError(
            f"the data has {data_classes} classes but model={model_title(cfg)} has num_classes={model_classes}: "
            f"labels {model_classes} to {data_classes - 1} have no row in its label table. Set "
            f"model.num_classes={data_classes}, or data.num_classes to the data's own count."
        )
    return datamodule


def build_module(cfg: DictConfig, stage_cfg: DictConfig, net: nn.Module | None = None) -> DiffusionModule:
    """A DiffusionModule for the configured model and objective with this stage's optimisation settings."""
    check_objective(cfg)
    net = net if net is not None else instantiate(cfg.model)
    return DiffusionModule(net, objective=instantiate(cfg.objective), **stage_cfg.module)


def check_objective(cfg: DictConfig) -> None:
    """Refuse an objective that cannot train the configured model: a family with its own objective (MAR) takes no other.

    Read from the objective's class before its config is resolved (another objective's config may point at
    model settings this model does not have).
    """
    own = model_family(cfg).own_objective
    objective_class = get_class(cfg.objective._target_)
    if own is not None and objective_class.config_name != own:
        raise UsageError(f"model={model_title(cfg)} is trained and sampled only by its own objective, objective={own}; "
                         f"got {objective_class.__name__}. Pass objective={own} (or an experiment that sets it, "
                         "e.g. experiment=mar_digits).")


def gather_full_weights(module: DiffusionModule, fresh_net: Callable[[], nn.Module]) -> None:
    """After a sharded fit (trainer=fsdp2): put plain nets with the full weights back into `module` (net and EMA).

    Every rank takes part in the gather; afterwards each holds whole models, so rank zero alone can export, sample
    and score them. `fresh_net` builds an unsharded net of the same architecture to load the weights into.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    if not any(isinstance(parameter, DTensor) for parameter in module.net.parameters()):
        return
    options = StateDictOptions(full_state_dict=True)
    for owner, name in ((module, "net"), (module.ema, "module")):
        if owner is None:
            continue
        full = get_model_state_dict(getattr(owner, name), options=options)
        plain = fresh_net()
        plain.load_state_dict(full)
        setattr(owner, name, plain.to(module.device))


def fit(trainer: L.Trainer, module: L.LightningModule, datamodule: L.LightningDataModule,
        resume_from: str | None = None) -> None:
    """trainer.fit from the seed's fresh random state, as Lightning's DDP starts every rank (it reseeds in its
    setup): one process then draws what several draw, and a run with the global batch of a data-parallel run
    trains on the same data, times and noise."""
    reset_seed()
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)


def checkpoint_payload(module: DiffusionModule, cfg: DictConfig) -> dict[str, Any]:
    """The reference code's checkpoint layout ({'model', 'ema'}) plus the config that made it."""
    payload = {"model": module.net.state_dict(), "config": OmegaConf.to_container(cfg, resolve=True)}
    if module.ema is not None:
        payload["ema"] = module.ema.module.state_dict()
    return payload


def run_pretrain(cfg: DictConfig) -> dict[str, Any]:
    """stage=pretrain: train the configured model on the configured data; write model.pt, samples.png, metrics.json.

    The checkpoint is also cached, so later stages and runs reuse it instead of retraining.
    """
    clear_strays(cfg, "pretrain")
    resume_from = resume_checkpoint(cfg, "pretrain", "pretrain.resume_from")
    datamodule = build_data(cfg)
    L.seed_everything(cfg.seed, workers=True)
    module = build_module(cfg, cfg.pretrain)
    trainer = build_trainer(cfg, "pretrain", max_steps=cfg.pretrain.max_steps)
    fit(trainer, module, datamodule, resume_from)
    if trainer.global_step == 0:  # an untrained teacher must never reach the cache that later runs reuse
        raise UsageError(
            f"stage=pretrain trained 0 of pretrain.max_steps={cfg.pretrain.max_steps} steps: the training data gave "
            f"no full batch (data.batch_size={cfg.data.batch_size} is larger than the training split?). Lower "
            "data.batch_size; nothing was saved or cached."
        )
    gather_full_weights(module, lambda: instantiate(cfg.model))
    folder = stage_dir(cfg, "pretrain")  # after every check: a refused run leaves no folder
    return distributed.on_rank_zero(save_pretrained_teacher, cfg, module, trainer, folder)


def save_pretrained_teacher(cfg: DictConfig, module: DiffusionModule, trainer: L.Trainer, folder: Path) -> dict[str, Any]:
    """What stage=pretrain writes once its fit ended (on global rank zero): the checkpoint, its cache entry, samples."""
    payload = checkpoint_payload(module, cfg)
    begin_output_set(folder, "pretrain")
    checkpoint = save_torch(payload, folder / "model.pt")
    remove_stray_temporaries(cached_teacher_path(cfg).parent)
    save_torch(payload, cached_teacher_path(cfg))
    metrics: dict[str, Any] = {"steps": trainer.global_step, "checkpoint": str(checkpoint)}
    outputs = ["model.pt", "metrics.json"]
    if cfg.sampling.samples_per_class > 0:
        images, labels = sample_grid(module, cfg, folder / "samples.png", title=f"{model_title(cfg)}, pretrained")
        metrics.update(judge_samples(cfg, images, labels))
        log_images(trainer.loggers, {"pretrain/samples": folder / "samples.png"})
        outputs.append("samples.png")
    save_json(metrics, folder / "metrics.json")
    finish_output_set(folder, "pretrain", outputs)
    finish_loggers(trainer.loggers, folder)
    return metrics


# --------------------------------------------------------------------------- sampling and judging samples


def sampler_options(cfg: DictConfig, objective: DiffusionObjective) -> dict[str, Any]:
    """The `sampling` settings that belong to the objective's sampler (null ones left out), checked by it."""
    options = {key: value for key, value in OmegaConf.to_container(cfg.sampling, resolve=True).items()
               if key not in SAMPLING_SETTINGS and value is not None}
    objective.check_sampler_options(options)
    return options


def sample_grid(module: DiffusionModule, cfg: DictConfig, path: Path, title: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample `samples_per_class` images of every class with the configured sampler; save them as a grid."""
    sampling = cfg.sampling
    num_classes = family_of(module.sampling_net()).num_classes(module.sampling_net())
    labels = torch.arange(num_classes).repeat_interleave(sampling.samples_per_class)
    images = module.sample(labels, cfg_scale=sampling.cfg_scale, seed=cfg.seed, progress=sampling.progress,
                           **sampler_options(cfg, module.objective))
    # one row per sample index, one column per class: each column is a class
    order = torch.arange(len(labels)).view(num_classes, -1).t().reshape(-1)
    save_image_grid(images[order], path, nrow=num_classes, title=title)
    return images, labels


def judge(cfg: DictConfig) -> str | None:
    """evaluate.judge, checked: 'digits' (the digits classifier scores samples) or null (no classifier)."""
    name = cfg.evaluate.get("judge")
    if name not in JUDGES:
        raise UsageError(f"evaluate.judge={name!r} is not one of {list(JUDGES)}: 'digits' for the digits data "
                         "(set by data=digits), null for any other data.")
    return name


def judge_samples(cfg: DictConfig, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Conditional accuracy of the samples under the configured judge; nothing without one."""
    if judge(cfg) is None:
        return {}
    from tinyfusion_pl.evaluation.digits_classifier import (
        conditional_accuracy,
        load_or_train_digits_classifier,
    )

    classifier = load_or_train_digits_classifier(cfg.paths.cache_dir, cfg.data.image_size)
    return {"conditional_accuracy": conditional_accuracy(classifier, images, labels)}


def read_decision(prune_folder: Path) -> dict[str, Any]:
    """decision.json of a prune folder, or an error naming the file and how to make it again."""
    path = prune_folder / "decision.json"
    try:
        decision = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(f"{path} cannot be read ({error}). Run stage=prune again to rewrite it, or point "
                         "recover.pruned / evaluate.pruned_checkpoint at another prune folder.") from error
    if not isinstance(decision, dict) or "kept_blocks" not in decision:
        raise UsageError(f"{path} is not a pruning decision (no kept_blocks). Run stage=prune again to rewrite it.")
    return decision


def pruned_checkpoint_name(prune_folder: Path) -> str:
    """The name of the pruned model in a prune folder: what decision.json records (pruned.pt by default)."""
    if (prune_folder / "decision.json").is_file():
        return read_decision(prune_folder).get("checkpoint", "pruned.pt")
    return "pruned.pt"
