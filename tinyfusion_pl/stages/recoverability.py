"""stage=recoverability: the ground truth of which blocks to keep, measured, and every selector placed in it.

For every admissible kept-set of the model (or a uniform sample of `recoverability.max_choices` of them): prune to
it, recover it with one fixed budget, and measure the recovered model: held-out diffusion loss on fixed batches,
FID and conditional accuracy with bootstrap intervals over the samples. Then every selector of compare.selectors
chooses on the same teacher, and its choice is placed in that distribution. All of it once per seed of
compare.seeds (teacher, pruning and recovery seed). Every finished piece is one small JSON file in the study
folder, so a study that stops continues where it stopped; `recoverability.shard` / `num_shards` split the work
between the jobs of a Hydra multirun (e.g. hydra/launcher=joblib), the job that completes it writes the report.
Under data parallelism (trainer=ddp, fsdp2) every fit runs on all ranks, each rank samples its share of a model's
images, and files are written once, by global rank zero.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tinyfusion_pl import distributed
from tinyfusion_pl.errors import UsageError
from tinyfusion_pl.evaluation.recoverability import CSV_COLUMNS, choice_key, write_study_outputs
from tinyfusion_pl.evaluation.sampling import (
    class_balanced_labels,
    images_to_uint8,
    uint8_to_images,
)
from tinyfusion_pl.evaluation.statistics import fid_from_features, fid_replicates, gaussian_statistics
from tinyfusion_pl.families import family_of
from tinyfusion_pl.io import save_json
from tinyfusion_pl.loggers import log_images, log_table
from tinyfusion_pl.objectives import split_batch
from tinyfusion_pl.pruning.calibration import calibration_losses
from tinyfusion_pl.pruning.choices import ground_truth_choices
from tinyfusion_pl.pruning.selectors import selection_groups
from tinyfusion_pl.stages.common import (
    build_loggers,
    cached_teacher_path,
    config_fingerprint,
    finish_loggers,
    load_model,
    model_blueprint,
    model_title,
    pruned_checkpoint_name,
    read_decision,
    resolve_teacher_checkpoint,
    sampler_options,
)
from tinyfusion_pl.stages.compare_selectors import variant_config
from tinyfusion_pl.stages.evaluate import (
    check_settings,
    digits_judge,
    evaluation_device,
    fid_scorer,
    latent_decoder,
    sample_on_ranks,
)
from tinyfusion_pl.stages.prune import BASELINE_SELECTORS, run_prune
from tinyfusion_pl.stages.recover import run_recover

# --------------------------------------------------------------------------- settings


def study_settings(cfg: DictConfig) -> dict[str, Any]:
    """The recoverability and compare settings, checked: one error that names the setting and the fix."""
    settings = OmegaConf.to_container(cfg.get("recoverability") or {}, resolve=True)
    if not settings or not cfg.get("compare") or not cfg.compare.get("selectors"):
        raise UsageError("stage=recoverability needs the recoverability and compare.selectors settings: use "
                         "experiment=recoverability.")
    for name in ("max_choices", "bootstrap", "num_shards"):
        value = settings.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"recoverability.{name}={value!r} must be a positive integer.")
    shard = settings.get("shard")
    if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < settings["num_shards"]:
        raise UsageError(f"recoverability.shard={shard!r} must be an integer in [0, recoverability.num_shards="
                         f"{settings['num_shards']}).")
    batches = settings.get("heldout_batches")
    if batches is not None and (isinstance(batches, bool) or not isinstance(batches, int) or batches < 1):
        raise UsageError(f"recoverability.heldout_batches={batches!r} must be a positive integer, or null for the "
                         "whole validation split.")
    if not 0.0 < settings.get("level", 0.0) < 1.0:
        raise UsageError(f"recoverability.level={settings.get('level')!r} must be in (0, 1), e.g. 0.95.")
    if settings["num_shards"] > 1 and not settings.get("study_dir"):
        raise UsageError(f"recoverability.num_shards={settings['num_shards']} splits one study between jobs: set "
                         "recoverability.study_dir to the folder they share, e.g. recoverability.study_dir=outputs/study.")
    seeds = cfg.compare.get("seeds")
    seeds = [cfg.seed] if seeds is None else list(seeds)
    if not seeds or any(isinstance(seed, bool) or not isinstance(seed, int) for seed in seeds) \
            or len(set(seeds)) != len(seeds):
        raise UsageError(f"compare.seeds={seeds} must be a non-empty list of distinct integers, e.g. compare.seeds=[0,1,2].")
    settings["seeds"] = seeds
    settings["study_dir"] = Path(settings.get("study_dir") or cfg.paths.run_dir)
    return settings


def seed_config(cfg: DictConfig, study_dir: Path, seed: int) -> DictConfig:
    """The run's config for one seed: its own folder, its teacher resolved (pretrained on first use for the
    embedded default); the per-choice runs log nowhere and keep no Lightning checkpoints (the report logs)."""
    seeded = OmegaConf.merge(cfg, {"seed": seed, "paths": {"run_dir": str(study_dir / f"seed_{seed}")}})
    teacher = resolve_teacher_checkpoint(seeded)
    return OmegaConf.merge(seeded, {"teacher": {"checkpoint": str(teacher)}, "logger": None, "callbacks": None})


def teacher_identity(cfg: DictConfig) -> str:
    """The teacher of a seed's config: its path, or for a teacher pretrained here (in the seed's folder or the
    cache, whichever resolve_teacher_checkpoint found) the pretraining settings that made it."""
    cached_path = cached_teacher_path(cfg)
    pretrained = {cached_path, Path(cfg.paths.run_dir) / "pretrain" / "model.pt"}
    path = Path(cfg.teacher.checkpoint)
    return f"pretrained {cached_path.parent.name}" if path in pretrained else str(path.resolve())


def settings_fingerprint(cfg: DictConfig, *extra: Any) -> str:
    """What a cached result depends on: a result made under other settings is never reused.

    Unset (null) settings and where to resume from are left out, so that a new optional setting does not make
    a finished study unreadable.
    """
    nodes = (cfg.data, cfg.objective, cfg.recover, cfg.distill, cfg.sampling, *extra)
    return config_fingerprint(teacher_identity(cfg), cfg.seed, cfg.evaluate.num_samples, cfg.recoverability.bootstrap,
                              *[_settled(node) for node in nodes])


def _settled(node: Any) -> Any:
    """A config node as plain data without null values and resume_from entries."""
    value = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    if isinstance(value, dict):
        return {key: _settled(item) for key, item in value.items() if item is not None and key != "resume_from"}
    return [_settled(item) for item in value] if isinstance(value, list) else value


def weights_digest(net: nn.Module) -> str:
    """SHA-256 of a model's weights (names, dtypes, shapes, values): the same weights give the same digest however
    they were saved (torch.save does not write the same bytes twice)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cached(path: Path, fingerprint: str, teacher_weights: str) -> dict[str, Any] | None:
    """The record at `path` when it was made under the same settings and on the same teacher weights; None when
    there is none yet. (Records written before they held the teacher's digest are taken on their settings alone.)"""
    if not path.is_file():
        return None
    record = read_piece(path)
    if record.get("settings") != fingerprint:
        raise UsageError(
            f"{path} was made with other settings than this study's (seed, teacher, data, recovery, sampling or "
            "selector settings differ). Use a new recoverability.study_dir for these settings, or delete "
            f"{seed_folder_of(path)} to redo that seed."
        )
    refuse_other_teacher(path, record, teacher_weights)
    return record


def refuse_other_teacher(path: Path, record: dict[str, Any], teacher_weights: str) -> None:
    """A piece measured on other weights than the seed's teacher has now is an error. The same pretraining settings
    do not make the same teacher everywhere: float sums differ with the thread count and the torch build, and 1500
    steps carry the difference into every weight."""
    made_on = record.get("teacher_weights")
    if made_on is not None and made_on != teacher_weights:
        raise UsageError(
            f"{path} was measured on other teacher weights (sha256 {made_on[:12]}) than the seed's teacher has now "
            f"({teacher_weights[:12]}): the teacher was replaced or pretrained again. Put back the teacher the study "
            "measured, or use a new recoverability.study_dir for this one (or delete "
            f"{seed_folder_of(path)} to redo that seed)."
        )


def check_seed_folder(folder: Path, teacher_weights: str) -> None:
    """Before a seed's first piece is measured: every piece the folder already has was measured on this teacher,
    so that a study with another teacher stops before it writes anything (a shard need not meet an old piece first)."""
    pieces = [piece_path(folder, "teacher"), *sorted(folder.glob("choices/*.json")),
              *sorted(folder.glob("selectors/*.json"))]
    for path in pieces:
        if path.is_file():
            refuse_other_teacher(path, read_piece(path), teacher_weights)


def seed_folder_of(piece: Path) -> Path:
    """seed_<s>/ of seed_<s>/teacher.json, seed_<s>/choices/<blocks>.json or seed_<s>/selectors/<name>.json."""
    return piece.parent if piece.name == "teacher.json" else piece.parent.parent


def read_piece(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UsageError(f"{path} cannot be read ({error}): delete it and run again to redo that piece.") from error


# --------------------------------------------------------------------------- measuring one model


class Judge:
    """Measures models of one seed alike: held-out loss on fixed batches, times and noise; FID and conditional
    accuracy of the same labels and initial noise for every model, with bootstrap replicates over the samples.
    `teacher_weights` is the digest of the seed's teacher, which every piece of the seed records."""

    def __init__(self, cfg: DictConfig) -> None:
        check_settings(cfg)
        self.cfg = cfg
        self.teacher_weights = weights_digest(load_model(cfg, cfg.teacher.checkpoint))
        self.device = evaluation_device(cfg)
        self.objective = instantiate(cfg.objective)
        self.options = sampler_options(cfg, self.objective)
        self.decode = latent_decoder(cfg, self.device)
        self.classifier = distributed.rank_zero_first(digits_judge, cfg)  # rank zero trains and caches it
        self.scorer, self.fid_description = distributed.rank_zero_first(fid_scorer, cfg, self.device, self.classifier)
        self.reference = None
        if self.scorer is not None:
            reference = self._reference_images()
            self.reference = gaussian_statistics(self.scorer.features(reference).numpy())
        datamodule = instantiate(cfg.data)
        datamodule.setup("fit")
        limit = cfg.recoverability.heldout_batches
        self.heldout = []
        for batch in datamodule.val_dataloader():  # the validation split: no model of the study trained on it
            self.heldout.append(split_batch(batch))
            if limit is not None and len(self.heldout) == limit:
                break

    def _reference_images(self) -> torch.Tensor:
        from tinyfusion_pl.data.digits import load_digits_tensors
        from tinyfusion_pl.evaluation.sampling import load_npz

        if self.cfg.evaluate.reference_npz:
            return load_npz(self.cfg.evaluate.reference_npz)[0]
        return images_to_uint8(load_digits_tensors(self.cfg.data.image_size)[0])

    def heldout_losses(self, net: nn.Module) -> list[float]:
        """Per-sample diffusion losses on the held-out batches (the same times and noise for every model)."""
        losses = calibration_losses(net.to(self.device), self.objective, self.heldout, seed=self.cfg.seed)
        return torch.cat(losses).double().cpu().tolist()

    def measure(self, net: nn.Module) -> dict[str, Any]:
        """heldout_loss (+ per sample), fid (+ bootstrap replicates), conditional_accuracy (+ per sample)."""
        cfg = self.cfg
        net = net.to(self.device).eval()
        losses = self.heldout_losses(net)
        result: dict[str, Any] = {"heldout_loss": float(np.mean(losses)), "heldout_losses": losses}
        labels = class_balanced_labels(cfg.evaluate.num_samples, family_of(net).num_classes(net))
        # every rank scores all the samples the ranks shared out, so every rank's record is the same
        images, _ = sample_on_ranks(cfg, net, self.objective, labels, self.decode, "sampling", self.options)
        if self.scorer is not None:
            features = self.scorer.features(images).numpy()
            result["fid"] = fid_from_features(features, *self.reference)
            result["fid_replicates"] = fid_replicates(  # the same resamples for every model of the seed: paired
                features, *self.reference, replicates=cfg.recoverability.bootstrap, seed=cfg.seed).tolist()
        if self.classifier is not None:
            with torch.no_grad():
                predictions = self.classifier(uint8_to_images(images).to(self.device)).argmax(1).cpu()
            correct = (predictions == labels).int().tolist()
            result["conditional_accuracy"] = float(np.mean(correct))
            result["correct"] = correct
        return result


# --------------------------------------------------------------------------- the pieces of a study


def piece_path(folder: Path, kind: str, item: Any = None) -> Path:
    """Where a seed's folder keeps one finished piece: teacher.json, choices/<blocks>.json, selectors/<name>.json."""
    if kind == "teacher":
        return folder / "teacher.json"
    if kind == "choice":
        return folder / "choices" / f"{choice_key(item)}.json"
    return folder / "selectors" / f"{item}.json"


def measure_teacher(cfg: DictConfig, judge: Judge, folder: Path) -> dict[str, Any]:
    path, fingerprint = piece_path(folder, "teacher"), settings_fingerprint(cfg)
    record = cached(path, fingerprint, judge.teacher_weights)
    if record is None:
        start = time.perf_counter()
        record = {"settings": fingerprint, "teacher_weights": judge.teacher_weights, "teacher": cfg.teacher.checkpoint,
                  **judge.measure(load_model(cfg, cfg.teacher.checkpoint)), "seconds": time.perf_counter() - start}
        distributed.on_rank_zero(save_json, record, path)
    return record


def measure_choice(cfg: DictConfig, judge: Judge, folder: Path, kept_blocks: list[int]) -> dict[str, Any]:
    """Prune the teacher to `kept_blocks`, recover, measure; cached as choices/<blocks>.json."""
    key = choice_key(kept_blocks)
    path = piece_path(folder, "choice", kept_blocks)
    fingerprint = settings_fingerprint(cfg, cfg.pruning.calibration_batches)
    record = cached(path, fingerprint, judge.teacher_weights)
    if record is not None:
        return record
    start = time.perf_counter()
    variant = variant_config(cfg, f"runs/choice_{key}", OmegaConf.create(
        {"selector": "by_index", "kept_blocks": list(kept_blocks), "num_keep": None}))
    pruned = run_prune(variant)
    run_dir = Path(variant.paths.run_dir)
    heldout_pruned = judge.heldout_losses(load_model(variant, pruned["pruned"]))
    prune_seconds = time.perf_counter() - start
    recovered = run_recover(variant)
    recover_seconds = time.perf_counter() - start - prune_seconds
    measures = judge.measure(load_model(variant, recovered["checkpoint"]))
    record = {"settings": fingerprint, "teacher_weights": judge.teacher_weights, "kept_blocks": list(kept_blocks),
              "calibration_loss": pruned["calibration_loss"], "heldout_loss_pruned": float(np.mean(heldout_pruned)),
              **measures, "recover_steps": recovered["steps"], "nonfinite_steps": recovered["nonfinite_steps"],
              "seconds": {"prune": prune_seconds, "recover": recover_seconds,
                          "measure": time.perf_counter() - start - prune_seconds - recover_seconds}}
    distributed.on_rank_zero(finish_choice, cfg, record, path, run_dir)
    return record


def finish_choice(cfg: DictConfig, record: dict[str, Any], path: Path, run_dir: Path) -> None:
    """Write a choice's record; drop its checkpoints unless asked to keep them (the record holds what the study needs,
    and 70 models add up)."""
    if not cfg.recoverability.keep_checkpoints:
        pruned_path = run_dir / "prune" / pruned_checkpoint_name(run_dir / "prune")
        for checkpoint in (pruned_path, run_dir / "recover" / "model.pt"):
            shutil.rmtree(checkpoint) if checkpoint.is_dir() else checkpoint.unlink(missing_ok=True)
    save_json(record, path)


def run_selector(cfg: DictConfig, judge: Judge, folder: Path, name: str, changes: DictConfig) -> dict[str, Any]:
    """Let one selector choose on the seed's teacher; cached as selectors/<name>.json."""
    path = piece_path(folder, "selector", name)
    fingerprint = settings_fingerprint(cfg, cfg.pruning, changes)
    record = cached(path, fingerprint, judge.teacher_weights)
    if record is not None:
        return record
    start = time.perf_counter()
    variant = variant_config(cfg, f"runs/selector_{name}", changes)
    pruned = run_prune(variant)
    decision = read_decision(Path(variant.paths.run_dir) / "prune")
    record = {"settings": fingerprint, "teacher_weights": judge.teacher_weights, "selector": name,
              "kept_blocks": pruned["kept_blocks"], "calibration_loss": pruned["calibration_loss"],
              "groups": decision["groups"], "seconds": time.perf_counter() - start}
    distributed.on_rank_zero(save_json, record, path)
    return record


# --------------------------------------------------------------------------- the study


def ground_truth(cfg: DictConfig, settings: dict[str, Any]) -> tuple[list[list[int]], int, list[list[int]]]:
    """The kept-sets of the study (all, or a uniform sample), how many are admissible, and their groups."""
    net = model_blueprint(cfg)
    family = family_of(net)
    depth = sum(family.block_counts(net))
    groups = selection_groups(depth, settings.get("pattern"),
                              None if settings.get("pattern") else settings.get("keep_ratio"), None)
    choices, total = ground_truth_choices(groups, settings["max_choices"], seed=settings.get("sample_seed", 0),
                                          required_blocks=family.required_blocks(net))
    return [list(choice) for choice in choices], total, [list(group) for group in groups]


def run_recoverability(cfg: DictConfig) -> dict[str, Any]:
    """Measure the ground truth and place every selector in it; write report.md, recoverability.csv/.json and the
    plots into the study folder (the run folder unless recoverability.study_dir is set)."""
    settings = study_settings(cfg)
    check_settings(cfg)  # before any teacher is trained
    for name, changes in cfg.compare.selectors.items():
        if changes.get("selector") not in ("learnable", *BASELINE_SELECTORS):
            raise UsageError(f"compare.selectors.{name}.selector={changes.get('selector')!r} is not a selector; "
                             "see conf/experiment/recoverability.yaml for the form.")
    choices, total, groups = ground_truth(cfg, settings)
    study_dir, shard, num_shards = settings["study_dir"], settings["shard"], settings["num_shards"]
    distributed.on_rank_zero(print, f"Recoverability study in {study_dir}: {len(choices)} of {total} admissible "
                             f"kept-sets, {len(cfg.compare.selectors)} selectors, seeds {settings['seeds']}"
                             + (f", shard {shard} of {num_shards}" if num_shards > 1 else ""))
    work: list[tuple[int, str, Any]] = [(seed, kind, item) for seed in settings["seeds"]
                                        for kind, items in (("teacher", [None]), ("choice", choices),
                                                            ("selector", list(cfg.compare.selectors)))
                                        for item in items]
    seed_configs: dict[int, DictConfig] = {}
    judges: dict[int, Judge] = {}

    def prepared(seed: int) -> tuple[DictConfig, Judge]:
        if seed not in seed_configs:
            seed_configs[seed] = seed_config(cfg, study_dir, seed)
            judges[seed] = Judge(seed_configs[seed])
            check_seed_folder(Path(seed_configs[seed].paths.run_dir), judges[seed].teacher_weights)
        return seed_configs[seed], judges[seed]

    started = time.perf_counter()
    for index, (seed, kind, item) in enumerate(work):
        if index % num_shards != shard:
            continue
        seed_cfg, judge = prepared(seed)
        folder = Path(seed_cfg.paths.run_dir)
        if kind == "teacher":
            measure_teacher(seed_cfg, judge, folder)
        elif kind == "choice":
            measure_choice(seed_cfg, judge, folder, item)
        else:
            run_selector(seed_cfg, judge, folder, item, cfg.compare.selectors[item])
    missing = distributed.on_rank_zero(  # rank zero wrote the pieces: it sees what is there
        lambda: [piece for piece in work if not piece_path(study_dir / f"seed_{piece[0]}", *piece[1:]).is_file()])
    if missing:
        distributed.on_rank_zero(print, f"Shard {shard} of {num_shards} is done; {len(missing)} pieces of the study "
                                 "remain in other shards. The shard that finishes last writes the report (or run again "
                                 "without recoverability.shard).")
        return {"remaining": len(missing)}
    seeds: dict[int, dict[str, Any]] = {}
    for seed in settings["seeds"]:
        seed_cfg, judge = prepared(seed)
        folder = Path(seed_cfg.paths.run_dir)
        selectors = {name: run_selector(seed_cfg, judge, folder, name, cfg.compare.selectors[name])
                     for name in cfg.compare.selectors}
        measured = {choice_key(choice): measure_choice(seed_cfg, judge, folder, choice) for choice in choices}
        for record in selectors.values():  # a choice outside the (sampled) ground truth is measured the same way
            key = choice_key(record["kept_blocks"])
            if key not in measured:
                measured[key] = measure_choice(seed_cfg, judge, folder, record["kept_blocks"])
        seeds[seed] = {"teacher": measure_teacher(seed_cfg, judge, folder), "choices": measured,
                       "ground_truth": [choice_key(choice) for choice in choices], "selectors": selectors,
                       "fid": judges[seed].fid_description}
    study = {
        "model": model_title(cfg), "ground_truth_groups": groups, "admissible": total, "measured": len(choices),
        "enumerated": len(choices) == total, "seeds": seeds, "selectors": OmegaConf.to_container(cfg.compare.selectors),
        "recover_steps": cfg.recover.max_steps, "distill": cfg.distill.method, "num_samples": cfg.evaluate.num_samples,
        "bootstrap": settings["bootstrap"], "level": settings["level"], "seconds_this_run": time.perf_counter() - started,
    }
    return distributed.on_rank_zero(report_study, cfg, study, study_dir)


def report_study(cfg: DictConfig, study: dict[str, Any], study_dir: Path) -> dict[str, Any]:
    result, rows, plots = write_study_outputs(study, study_dir)
    log_study(cfg, rows, plots, study_dir)
    print(f"Recoverability report: {study_dir / 'report.md'}")
    return result


def log_study(cfg: DictConfig, rows: list[dict[str, Any]], plots: dict[str, Path], study_dir: Path) -> None:
    """The choices as a W&B table, and the plots, in a `report` run of the study folder when the logger has W&B."""
    if not cfg.logger:
        return
    loggers = build_loggers(OmegaConf.merge(cfg, {"paths": {"run_dir": str(study_dir)}}), "report")
    if not loggers:
        return
    log_table(loggers, "recoverability/choices", CSV_COLUMNS, [[row[column] for column in CSV_COLUMNS] for row in rows])
    log_images(loggers, plots)
    finish_loggers(loggers, study_dir / "report")


