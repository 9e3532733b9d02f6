"""stage=evaluate: sample from the teacher and the pruned model, score them (FID, accuracy, speed), save samples."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torchmetrics.aggregation import MeanMetric

from tinyfusion_pl import distributed
from tinyfusion_pl.data.digits import load_digits_tensors
from tinyfusion_pl.errors import MissingInputError, UsageError
from tinyfusion_pl.evaluation.digits_classifier import DigitsClassifier, load_or_train_digits_classifier
from tinyfusion_pl.evaluation.fid import FIDScorer, digits_fid, inception_fid
from tinyfusion_pl.evaluation.sampling import (
    IMAGE_CHANNELS,
    Decoder,
    class_balanced_labels,
    images_to_uint8,
    load_npz,
    sample_images,
    save_npz,
    sd_vae_decoder,
    uint8_to_images,
)
from tinyfusion_pl.evaluation.speed import count_blocks, sampling_speed
from tinyfusion_pl.families import family_of
from tinyfusion_pl.io import check_output_set, save_json
from tinyfusion_pl.stages.common import (
    check_objective,
    clear_strays,
    judge,
    load_model,
    model_blueprint,
    pruned_checkpoint_name,
    resolve_teacher_checkpoint,
    sampler_options,
    save_image_grid,
    stage_dir,
)

MODELS = ("teacher", "pruned")
FID_MODES = ("auto", "digits", "inception", "none")
DEVICES = ("auto", "cpu", "cuda")
# Where the run folder's stages leave the pruned model, best first: recovered, then freshly pruned.
GRID_COLUMNS = 10


# --------------------------------------------------------------------------- which models


def selected_models(cfg: DictConfig) -> list[str]:
    """evaluate.models, checked: a non-empty list drawn from MODELS without repeats."""
    models = list(cfg.evaluate.models) if OmegaConf.is_list(cfg.evaluate.models) else cfg.evaluate.models
    if not isinstance(models, list) or not models or any(name not in MODELS for name in models) \
            or len(set(models)) != len(models):
        raise UsageError(f"evaluate.models={models} is invalid: expected a non-empty list from {list(MODELS)} "
                         "without repeats, e.g. evaluate.models=[teacher,pruned].")
    return models


def pruned_checkpoint(cfg: DictConfig) -> Path:
    """evaluate.pruned_checkpoint when given, else this run's recover/model.pt, else its prune/pruned.pt."""
    if cfg.evaluate.pruned_checkpoint:
        path = Path(cfg.evaluate.pruned_checkpoint)
        if not path.exists():
            raise MissingInputError(f"evaluate.pruned_checkpoint={path} does not exist. Pass the path of a pruned "
                                    "or recovered checkpoint (prune/pruned.pt or recover/model.pt of a run).")
        return path
    run_dir = Path(cfg.paths.run_dir)
    # Best first: recovered, then freshly pruned (under the name decision.json records, pruned.pt by default).
    outputs = ["recover/model.pt", f"prune/{pruned_checkpoint_name(run_dir / 'prune')}"]
    for relative in outputs:
        if (run_dir / relative).exists():
            stage, name = relative.split("/")  # a stage killed while rewriting its folder must not pass for done
            option = "pruning.resume_from" if stage == "prune" else "recover.resume_from"
            check_output_set(run_dir / stage, stage, [name], f"Run stage={stage} again with hydra.run.dir={run_dir} "
                             f"({option}=auto continues a killed run), or pass evaluate.pruned_checkpoint=...")
            return run_dir / relative
    raise MissingInputError(
        f"evaluate.models includes 'pruned' but the run folder {run_dir} holds neither {' nor '.join(outputs)}. "
        "Run stage=prune (and stage=recover) with this paths.run_dir first, pass "
        "evaluate.pruned_checkpoint=/path/to/model.pt, or evaluate only the teacher: evaluate.models=[teacher]."
    )


def checkpoints_to_evaluate(cfg: DictConfig) -> dict[str, Path]:
    """Name -> checkpoint of every model in evaluate.models (the teacher may be pretrained on first use)."""
    finders = {"teacher": resolve_teacher_checkpoint, "pruned": pruned_checkpoint}
    return {name: finders[name](cfg) for name in selected_models(cfg)}


# --------------------------------------------------------------------------- how to score


def evaluation_device(cfg: DictConfig) -> torch.device:
    choice = cfg.evaluate.device
    if choice not in DEVICES:
        raise UsageError(f"evaluate.device={choice!r} is not one of {DEVICES} (auto: cuda when available).")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("evaluate.device=cuda but no CUDA device is available; use evaluate.device=cpu or auto.")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def latent_decoder(cfg: DictConfig, device: torch.device) -> Decoder | None:
    """The VAE decoder of evaluate.vae for latent models, None when the model's samples are images."""
    return sd_vae_decoder(cfg.evaluate.vae, device=device) if cfg.evaluate.vae else None


def check_settings(cfg: DictConfig) -> None:
    """Fail on a bad evaluate setting before anything slow (loading models, pretraining a teacher) starts."""
    selected_models(cfg)
    settings = cfg.evaluate
    for key, value, least in (("num_samples", settings.num_samples, 1), ("batch_size", settings.batch_size, 1),
                              ("speed.batch_size", settings.speed.batch_size, 1), ("speed.steps", settings.speed.steps, 1),
                              ("speed.repeats", settings.speed.repeats, 1), ("speed.warmup", settings.speed.warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise UsageError(f"evaluate.{key}={value!r} must be a whole number >= {least}.")
    evaluation_device(cfg)
    fid_mode(cfg)
    check_objective(cfg)
    sampler_options(cfg, instantiate(cfg.objective))
    blueprint = model_blueprint(cfg)
    channels = family_of(blueprint).sample_shape(blueprint)[0]
    if not cfg.evaluate.vae and channels not in IMAGE_CHANNELS:
        raise UsageError(
            f"model={cfg.model.get('name', cfg.model._target_)} samples {channels}-channel latents: evaluation needs "
            "images, so set evaluate.vae to a diffusers AutoencoderKL name or local folder "
            "(e.g. evaluate.vae=stabilityai/sd-vae-ft-ema; `pip install diffusers`)."
        )


def fid_mode(cfg: DictConfig) -> str:
    """evaluate.fid resolved: auto is digits on the embedded default, inception with a reference .npz, else none."""
    mode, reference = cfg.evaluate.fid, cfg.evaluate.reference_npz
    if mode not in FID_MODES:
        raise UsageError(f"evaluate.fid={mode!r} is not one of {FID_MODES}.")
    for key in ("reference_npz", "inception_weights"):
        path = cfg.evaluate.get(key)
        if path and not Path(path).is_file():
            raise MissingInputError(f"evaluate.{key}={path} is not a file. Pass the path of an existing file, or "
                                    f"leave evaluate.{key} unset (null).")
    if mode == "auto":
        return "digits" if judge(cfg) == "digits" else "inception" if reference else "none"
    if mode == "digits" and judge(cfg) != "digits":
        raise UsageError(f"evaluate.fid=digits needs the digits data, not {cfg.data._target_}; "
                         "use evaluate.fid=inception with evaluate.reference_npz, or none.")
    if mode == "inception" and not reference:
        raise UsageError("evaluate.fid=inception needs real images to compare with: set evaluate.reference_npz to an "
                         ".npz of uint8 (N, H, W, 3) images under arr_0 (e.g. ADM's VIRTUAL_imagenet256_labeled.npz).")
    return mode


def digits_judge(cfg: DictConfig) -> DigitsClassifier | None:
    """The cached digits classifier (trained on first use) when evaluate.judge is digits, else None."""
    if judge(cfg) != "digits":
        return None
    return load_or_train_digits_classifier(cfg.paths.cache_dir, cfg.data.image_size)


def fid_scorer(
    cfg: DictConfig, device: torch.device, classifier: DigitsClassifier | None
) -> tuple[FIDScorer | None, str | None]:
    """The FID scorer with its reference statistics, and a line saying what it compares; (None, None) for none.

    The digits reference set is every digit (1797 images), whatever split the models were trained on.
    """
    mode = fid_mode(cfg)
    if mode == "none":
        return None, None
    if mode == "digits":
        reference = images_to_uint8(load_digits_tensors(cfg.data.image_size)[0])
        scorer = digits_fid(classifier, cfg.data.image_size).to(device)
        description = f"digits classifier features ({classifier.feature_dim}-d) against all {len(reference)} digits"
    else:
        scorer = inception_fid(cfg.evaluate.inception_weights).to(device)
        reference, _ = load_npz(cfg.evaluate.reference_npz)
        description = f"Inception-v3 pool features (2048-d) against {len(reference)} images of {cfg.evaluate.reference_npz}"
    scorer.set_reference(reference)
    return scorer, description


# --------------------------------------------------------------------------- evaluation


def save_sample_grid(images: torch.Tensor, path: Path, num_classes: int, rows: int, title: str) -> None:
    """The first uint8 samples (labels 0, 1, 2, ... in turn) as `rows` rows of up to 10: with 10 classes, a column each."""
    columns = min(num_classes, GRID_COLUMNS)
    save_image_grid(uint8_to_images(images[: rows * columns]), path, nrow=columns, title=title)


def evaluate_nets(
    cfg: DictConfig,
    nets: Mapping[str, nn.Module],
    folder: Path,
    reference: str | None = None,
) -> dict[str, Any]:
    """Sample every net with the configured sampler, save its samples (.npz, grid), and score it.

    Per net: blocks, params, gflops, samples_per_s, steps_per_s, speedup and ideal_speedup (against
    `reference`, default the first net), fid, conditional_accuracy (digits only), and the files written.
    """
    check_settings(cfg)
    settings, sampling = cfg.evaluate, cfg.sampling
    device = evaluation_device(cfg)
    decode = latent_decoder(cfg, device)
    classifier = distributed.rank_zero_first(digits_judge, cfg)  # rank zero trains and caches it on first use
    scorer, fid_description = distributed.rank_zero_first(fid_scorer, cfg, device, classifier)
    nets = {name: net.to(device).eval() for name, net in nets.items()}
    objective = instantiate(cfg.objective)
    options = sampler_options(cfg, objective)
    results: dict[str, dict[str, Any]] = {}
    for name, net in nets.items():
        num_classes = family_of(net).num_classes(net)
        labels = class_balanced_labels(settings.num_samples, num_classes)
        # FID and accuracy gather the ranks' statistics of their shares through torchmetrics' sync.
        images, (start, stop) = sample_on_ranks(cfg, net, objective, labels, decode, f"sampling {name}", options)
        result: dict[str, Any] = {"fid": None if scorer is None else scorer.score(images[start:stop])}
        if classifier is not None:
            result["conditional_accuracy"] = shared_accuracy(classifier, images[start:stop], labels[start:stop])
        result.update(distributed.on_rank_zero(save_samples, cfg, name, net, images, labels, folder, result))
        results[name] = result
    timed_options = {key: value for key, value in options.items() if key != "steps"}
    # timed on one device (rank zero's) while the other ranks wait: the figures are per device
    speed = distributed.on_rank_zero(
        sampling_speed, nets, objective, batch_size=settings.speed.batch_size, steps=settings.speed.steps,
        sampler_steps=sampling.steps, cfg_scale=sampling.cfg_scale, repeats=settings.speed.repeats,
        warmup=settings.speed.warmup, reference=reference, **timed_options,
    )
    for name in nets:
        results[name] = {**speed[name], **results[name]}
    return {
        **results,
        "settings": {
            "device": str(device), "num_samples": settings.num_samples, **options, "cfg_scale": sampling.cfg_scale,
            "seed": cfg.seed, "fid": fid_description,
            "speed_batch_size": settings.speed.batch_size, "speed_steps": settings.speed.steps,
            "speed_repeats": settings.speed.repeats,
        },
    }


def sample_on_ranks(
    cfg: DictConfig, net: nn.Module, objective: Any, labels: torch.Tensor, decode: Any, description: str,
    options: dict[str, Any],
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Every image for `labels` (N, H, W, C uint8) on every rank, and this rank's share [start, stop) of them.

    Each rank samples its share in whole sampling batches (evaluate.batch_size): the union is what one process
    samples, in order.
    """
    start, stop = distributed.share(len(labels), cfg.evaluate.batch_size)
    images = images_to_uint8(sample_images(
        net, objective, labels[start:stop], cfg_scale=cfg.sampling.cfg_scale, batch_size=cfg.evaluate.batch_size,
        seed=cfg.seed, decode=decode, progress=cfg.sampling.progress, description=description, first_index=start,
        **options,
    )) if stop > start else None  # (n, H, W, C), the form every score and file uses
    return distributed.gather_shares(images), (start, stop)


@torch.no_grad()
def shared_accuracy(classifier: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Conditional accuracy of this rank's share of the samples, averaged over every rank's (torchmetrics' sync)."""
    device = next(classifier.parameters()).device
    metric = MeanMetric().to(device)
    if len(images):
        metric.update((classifier(uint8_to_images(images).to(device)).argmax(1) == labels.to(device)).float())
    return float(metric.compute())


def save_samples(
    cfg: DictConfig, name: str, net: nn.Module, images: torch.Tensor, labels: torch.Tensor, folder: Path,
    result: dict[str, Any],
) -> dict[str, str]:
    """samples_<name>.npz and its grid, written once: the files stage=evaluate lists in metrics.json."""
    written = {}
    if cfg.evaluate.save_npz:
        written["samples"] = str(save_npz(folder / f"samples_{name}.npz", images, labels))
    if cfg.sampling.samples_per_class > 0:
        grid = folder / f"samples_{name}.png"
        save_sample_grid(images, grid, family_of(net).num_classes(net), rows=cfg.sampling.samples_per_class,
                         title=_grid_title(name, net, result))
        written["grid"] = str(grid)
    return written


def _grid_title(name: str, net: nn.Module, result: dict[str, Any]) -> str:
    parts = [name, f"{count_blocks(net)} blocks"]
    if result.get("fid") is not None:
        parts.append(f"FID {result['fid']:.2f}")
    if "conditional_accuracy" in result:
        parts.append(f"accuracy {result['conditional_accuracy']:.1%}")
    return ", ".join(parts)


def run_evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate the teacher and/or the pruned model; writes evaluate/metrics.json, samples_*.npz and samples_*.png.

    metrics.json holds one entry per model (see evaluate_nets) and, when both are evaluated, the pruned
    model's speedup and ideal_speedup over the teacher at the top level.
    """
    clear_strays(cfg, "evaluate")
    check_settings(cfg)
    checkpoints = checkpoints_to_evaluate(cfg)
    # a teacher from another registry entry (teacher.name, e.g. a D14 teacher) is built as that entry
    nets = {name: load_model(cfg, path, cfg.teacher.get("name") if name == "teacher" else None)
            for name, path in checkpoints.items()}
    folder = stage_dir(cfg, "evaluate")
    metrics = evaluate_nets(cfg, nets, folder, reference="teacher" if "teacher" in nets else None)
    for name, path in checkpoints.items():
        metrics[name]["checkpoint"] = str(path)
    if {"teacher", "pruned"} <= set(nets):
        metrics["speedup"] = metrics["pruned"]["speedup"]
        metrics["ideal_speedup"] = metrics["pruned"]["ideal_speedup"]
    distributed.on_rank_zero(save_json, metrics, folder / "metrics.json")
    return metrics
