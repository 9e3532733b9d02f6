"""The whole config checked before a stage starts: everything that can be known without a model's weights or the data.

`run_stage` runs `check_config` first, so a setting that cannot work stops the run before a teacher is trained or
loaded and before anything is written. What needs the weights or the data (a checkpoint that does not fit, a
pattern for the teacher's depth, data of the wrong shape) is checked by the stages as soon as they have it.
`RunFolderCheck` does the same for Hydra's own output folder, which Hydra creates before any stage runs.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from tinyfusion_pl.errors import MissingInputError, UsageError
from tinyfusion_pl.families import family_of
from tinyfusion_pl.loggers import wandb_mode
from tinyfusion_pl.stages.added_settings import check_added_settings, job_overrides
from tinyfusion_pl.stages.common import (
    SAMPLING_SETTINGS,
    check_objective,
    group_error,
    instantiate_group,
    model_blueprint,
    model_family,
    names_fsdp,
    resolve_teacher_checkpoint,
    sampler_options,
    strategy_target,
)
from tinyfusion_pl.stages.prune import learnable_callbacks

# Stages that may pretrain a teacher or the digits classifier, and so write into paths.cache_dir.
CACHING_STAGES = ("pretrain", "prune", "evaluate", "pipeline", "compare_selectors")
# The step counts each stage trains for, by the stages that run them.
TRAINED_STEPS = {"pretrain.max_steps": ("pretrain",), "pruning.max_steps": ("prune", "pipeline", "compare_selectors"),
                 "recover.max_steps": ("recover", "pipeline", "compare_selectors")}
CALIBRATION_BATCHES = {"pruning.calibration_batches": ("prune", "pipeline", "compare_selectors"),
                       "recover.calibration_batches": ("recover", "pipeline", "compare_selectors")}
DISTILL_METHODS = ("none", "kd", "masked_kd")


def check_config(cfg: DictConfig) -> None:
    """Raise a UsageError naming the fix for the first setting of `cfg` that cannot work for `cfg.stage`."""
    stage = cfg.stage
    check_added_settings(cfg, job_overrides())  # first: a misspelt +key would otherwise be ignored, or fail obscurely
    try:
        check_objective(cfg)  # first: another family's objective config may read model settings this model lacks
    except (InterpolationResolutionError, InstantiationException):
        pass  # the model itself cannot be built: check_interpolations and check_model say why
    check_interpolations(cfg)
    missing = [key for key in OmegaConf.missing_keys(cfg) if not key.startswith("hydra")]
    if missing:
        raise UsageError(f"{', '.join(sorted(missing))} must be given (the config marks it ???), e.g. "
                         f"python train.py {sorted(missing)[0]}=...")
    writable_folder(cfg.paths.run_dir, "paths.run_dir")
    if stage in CACHING_STAGES:
        writable_folder(cfg.paths.cache_dir, "paths.cache_dir")
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise UsageError(f"seed={cfg.seed!r} must be an integer, e.g. seed=0.")
    for key, stages in {**TRAINED_STEPS, **CALIBRATION_BATCHES}.items():
        value = OmegaConf.select(cfg, key)
        if (stage in stages or (key == "pretrain.max_steps" and stage != "recover")) and value is not None:
            positive_int(value, key)  # pruning.max_steps is null for the selectors that do not train
    if stage in ("recover", "pipeline", "compare_selectors") and cfg.distill.method not in DISTILL_METHODS:
        raise UsageError(f"distill.method='{cfg.distill.method}' is not one of {DISTILL_METHODS}. Pass e.g. distill=kd.")
    check_sampling(cfg)
    check_model(cfg)
    if stage in ("prune", "pipeline") and cfg.pruning.selector == "learnable":
        # a keep ratio, pattern or temperature that cannot work stops a pipeline before its teacher is trained
        learnable_callbacks(cfg, model_family(cfg).block_argument(prefix="net."))
    if cfg.teacher.checkpoint and not Path(cfg.teacher.checkpoint).exists():
        raise MissingInputError(f"teacher.checkpoint={cfg.teacher.checkpoint} does not exist. Pass the path of a "
                                "model checkpoint (a file, or a save_pretrained folder for a diffusers model).")
    if stage in ("prune", "pipeline", "compare_selectors") or (stage == "evaluate" and "teacher" in cfg.evaluate.models):
        resolve_teacher_checkpoint(cfg, pretrain=False)  # a real model without teacher.checkpoint stops here
    check_loggers(cfg)
    check_trainer(cfg)


def check_interpolations(cfg: DictConfig) -> None:
    """Every ${...} of the config resolves (a group may read a setting another group option lacks)."""
    for key in cfg:
        if key == "hydra":
            continue
        try:
            node = cfg[key]
            if OmegaConf.is_config(node):
                OmegaConf.to_container(node, resolve=True, throw_on_missing=False)
        except InterpolationResolutionError as error:
            raise UsageError(
                f"{error.full_key} cannot be resolved: {error.msg}. Set it yourself ({error.full_key}=...), or pick "
                "group options made for each other (e.g. data=latents goes with model=dit_xl_2, not the digits model)."
            ) from error


def positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{key}={value!r} must be a whole number >= 1.")
    return value


def writable_folder(path: str | os.PathLike, setting: str) -> None:
    """Refuse a folder that cannot be created or written (`setting` names it: e.g. hydra.run.dir), creating nothing."""
    path = Path(path).absolute()
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    fix = "Pick a folder you can write to, e.g. " + ("TINYFUSION_CACHE=~/tinyfusion_cache or paths.cache_dir=..."
                                                   if "cache" in setting else "hydra.run.dir=outputs/my_run")
    if not existing.is_dir():
        raise UsageError(f"{setting}={path} cannot be created: {existing} is a file, not a folder. {fix}.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{setting}={path} cannot be written: {existing} is not writable by this user. {fix}.")


def check_sampling(cfg: DictConfig) -> None:
    """The `sampling` group: the objective's sampler options and the settings around them."""
    sampling = cfg.sampling
    if isinstance(sampling.cfg_scale, bool) or not isinstance(sampling.cfg_scale, (int, float)) \
            or sampling.cfg_scale < 1:
        raise UsageError(f"sampling.cfg_scale={sampling.cfg_scale!r} must be a number >= 1 "
                         "(1.0 = no guidance; DiT samples with 1.5 for FID and 4.0 for pictures).")
    count = sampling.samples_per_class
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise UsageError(f"sampling.samples_per_class={count!r} must be a whole number >= 0 (0: no sample grids).")
    objective = instantiate_group(cfg, "objective")
    try:
        sampler_options(cfg, objective)
    except UsageError as error:
        sampler_keys = [key for key in sampling if key not in SAMPLING_SETTINGS]
        raise UsageError(f"sampling: {error} (sampling.{'/'.join(sampler_keys)} go to the sampler)") from error


def check_model(cfg: DictConfig) -> None:
    """The model of the config (and teacher.name's registry entry) can be built, and a family describes it."""
    for registry_name in (None, *([cfg.teacher.name] if cfg.teacher.get("name") else [])):
        try:
            blueprint = model_blueprint(cfg, registry_name)
        except InstantiationException as error:
            raise group_error(error, "model") from error
        family_of(blueprint)


def check_loggers(cfg: DictConfig) -> None:
    for name, node in (cfg.logger or {}).items():
        if str(node.get("_target_", "")).endswith("wandb_logger"):
            if importlib.util.find_spec("wandb") is None:
                raise UsageError(f"logger={name} needs the wandb package: pip install wandb, or use logger=csv.")
            wandb_mode(node.get("mode"))


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Hide the device summary a Trainer prints when it is built: the check builds one that never runs."""
    quieted = [logging.getLogger(name) for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch")]
    levels = [logger.level for logger in quieted]
    for logger in quieted:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(quieted, levels, strict=True):
            logger.setLevel(level)


def check_trainer(cfg: DictConfig) -> None:
    """Build the `trainer` and `callbacks` groups' objects as a stage would (they are cheap; nothing runs)."""
    for name in (cfg.callbacks or {}):
        try:
            instantiate(cfg.callbacks[name])
        except InstantiationException as error:
            raise UsageError(f"callbacks.{name} cannot be built: {error.__cause__ or error}") from error
    if names_fsdp(cfg.trainer) and not torch.cuda.is_available():
        return  # start_processes refuses it next, naming trainer=fsdp2 and ddp for CPUs
    with quiet_lightning():
        try:
            instantiate(cfg.trainer, max_steps=1, logger=False, callbacks=[], enable_checkpointing=False)
        except InstantiationException as error:
            reason = error.__cause__ or error
            raise UsageError(
                f"trainer (accelerator={cfg.trainer.get('accelerator')}, devices={cfg.trainer.get('devices')}, "
                f"strategy={strategy_target(cfg.trainer).rsplit('.', 1)[-1] or '?'}, "
                f"precision={cfg.trainer.get('precision')}) "
                f"cannot run on this machine: {reason} Pick settings this machine has: trainer=cpu, or "
                "trainer=ddp trainer.accelerator=cpu trainer.devices=2 (trainer=gpu and trainer=fsdp need CUDA GPUs)."
            ) from error


class RunFolderCheck(Callback):
    """Hydra callback: refuse an output folder that cannot be written before Hydra creates it (and fails there)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")

    @staticmethod
    def _check(folder: str, setting: str) -> None:
        try:
            writable_folder(folder, setting)
        except UsageError as error:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise  # Hydra warns with it, then fails creating the folder with the full traceback
            print(f"Error: {error}", file=sys.stderr)
            raise SystemExit(1) from error  # not an Exception: Hydra turns those raised by callbacks into warnings
