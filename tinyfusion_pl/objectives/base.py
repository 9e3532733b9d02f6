"""The interface every training objective of a denoiser shares, and model-agnostic classifier-free guidance.

An objective owns everything about time: how training times are drawn (discrete steps for Gaussian
diffusion, floats in [0, 1] for flow matching), how calibration spreads them, what the net receives, how a
noisy input is formed, the training loss, the output distillation loss, and the sampler with its options.
Stages, selectors, calibration and distillation talk to objectives only through this class.
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from tinyfusion_pl.errors import UsageError

Denoiser = Callable[..., torch.Tensor]

# Keywords of `sample` that every objective takes and that are not the sampler's own options.
_SAMPLE_ARGUMENTS = ("self", "model", "noise", "model_kwargs", "generator", "progress")


def split_batch(batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The batch convention of every trainer here: (x, y) -> (x, {'y': y}); a bare tensor x -> (x, {})."""
    if isinstance(batch, torch.Tensor):
        return batch, {}
    return batch[0], {"y": batch[1]}


class DiffusionObjective(abc.ABC):
    """How a denoiser `model(x_t, model_timesteps(t), **model_kwargs)` is trained, distilled and sampled.

    The extension point for a new objective: implement the abstract methods; `training_losses` and
    `check_sampler_options` come for free.
    """

    # The name of its config (conf/objective/<name>.yaml), which a family with its own objective names.
    config_name: ClassVar[str | None] = None

    # ---------------------------------------------------------------- time
    @abc.abstractmethod
    def sample_timesteps(
        self, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draw one training time per sample (N,), in the objective's own units."""

    @abc.abstractmethod
    def stratified_timesteps(self, batch_size: int, batch_index: int, device: torch.device | str) -> torch.Tensor:
        """Deterministic times (N,) spread evenly over the training range, shifted from batch to batch.

        Calibration losses use them: low variance, every noise level, the same for every model scored.
        """

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The time values the net receives for times t (identity unless the objective maps them)."""
        return t

    # ---------------------------------------------------------------- losses
    @abc.abstractmethod
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The noisy input x_t at times t for data x_start and the given noise."""

    @abc.abstractmethod
    def loss_terms(
        self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
        noise: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Per-sample (N,) loss terms of an output computed on x_t = q_sample(x_start, t, noise); "loss" to optimise."""

    @abc.abstractmethod
    def distillation_terms(
        self, student_output: torch.Tensor, teacher_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-sample (N,) output-distillation terms between two outputs on the same x_t and t; "kd" to optimise."""

    def training_losses(
        self,
        model: Denoiser,
        x_start: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        model_kwargs: dict[str, Any] | None = None,
        generator: torch.Generator | None = None,
        share: tuple[int, int] = (1, 0),
    ) -> dict[str, torch.Tensor]:
        """Noise x_start to times t, run the model, and return loss_terms' per-sample dict.

        `generator` draws whatever randomness an objective needs beyond t and noise (none here; MAR's orders).
        `share` = (replicas, rank) in data-parallel training: x_start is rows rank, rank + replicas, ... of the
        global batch, and such randomness is drawn for the global batch and those rows taken (MAR).
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        model_output = model(x_t, self.model_timesteps(t), **(model_kwargs or {}))
        return self.loss_terms(model_output, x_start, x_t, t, noise)

    def distillation_losses(
        self,
        student: Denoiser,
        teacher: Denoiser,
        x_start: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        model_kwargs: dict[str, Any] | None = None,
        generator: torch.Generator | None = None,
        share: tuple[int, int] = (1, 0),
    ) -> dict[str, torch.Tensor]:
        """Per-sample (N,) terms of a student and a teacher run on the same noisy input and conditioning.

        "gt": the student's loss_terms "loss" (its other parts beside it), plus distillation_terms ("kd", ...).
        The teacher runs without gradients. Distillation calls the nets only through here.
        """
        x_t = self.q_sample(x_start, t, noise)
        model_t = self.model_timesteps(t)
        student_output = student(x_t, model_t, **(model_kwargs or {}))
        with torch.no_grad():
            teacher_output = teacher(x_t, model_t, **(model_kwargs or {}))
        ground_truth = self.loss_terms(student_output, x_start, x_t, t, noise)
        return {"gt": ground_truth["loss"], **{name: value for name, value in ground_truth.items() if name != "loss"},
                **self.distillation_terms(student_output, teacher_output, x_t, t)}

    # ---------------------------------------------------------------- sampling
    def guided_model(
        self, net: Denoiser, cfg_scale: float, null_label: int, guidance_channels: int | None = None
    ) -> Denoiser:
        """What `sample` receives to sample `net` with classifier-free guidance at `cfg_scale`.

        Here the doubled-batch wrapper of classifier_free_guidance; an objective that guides inside its own
        sampler (MAR's rising schedule) returns what its sampler recognises.
        """
        return classifier_free_guidance(net, cfg_scale, null_label, guidance_channels)

    @abc.abstractmethod
    def sample(
        self,
        model: Denoiser,
        noise: torch.Tensor,
        model_kwargs: dict[str, Any] | None = None,
        **sampler_options: Any,
    ) -> torch.Tensor:
        """Turn the starting noise into samples of the data distribution.

        Every objective also accepts `progress` (a progress bar) and `generator` (the sampler's randomness).
        """

    def sampler_option_names(self) -> tuple[str, ...]:
        """The options `sample` takes beyond the model, noise, conditioning, generator and progress bar."""
        parameters = inspect.signature(self.sample).parameters
        return tuple(name for name in parameters if name not in _SAMPLE_ARGUMENTS
                     and parameters[name].kind is not inspect.Parameter.VAR_KEYWORD)

    def check_sampler_options(self, options: dict[str, Any]) -> None:
        """Refuse options this objective's sampler does not have (naming the ones it has) or values it cannot take.

        Callers run this before anything slow, so a sampler setting that cannot work stops a run at its start.
        """
        unknown = sorted(set(options) - set(self.sampler_option_names()))
        if unknown:
            raise UsageError(
                f"{type(self).__name__} has no sampler option {', '.join(map(repr, unknown))}; its options are "
                f"{list(self.sampler_option_names())}. Remove the option or set it to null (sampling.<name>=null)."
            )
        parameters = inspect.signature(self.sample).parameters
        defaults = {name: parameters[name].default for name in self.sampler_option_names()}
        self.check_sampler_values({**defaults, **options})

    def check_sampler_values(self, options: dict[str, Any]) -> None:
        """Raise on a sampler option value that cannot work; `options` holds every option (defaults filled in).

        The default checks nothing beforehand: `sample` then refuses a bad value when it is called.
        """
        return None


def classifier_free_guidance(
    model: Denoiser, cfg_scale: float, null_label: int, guidance_channels: int | None = None
) -> Denoiser:
    """Wrap `model` into `guided(x, t, y, **kwargs)` that applies classifier-free guidance on one doubled batch.

    The model runs on [x; x] with labels [y; null_label]; the first `guidance_channels` output channels become
    uncond + cfg_scale * (cond - uncond), the remaining channels (e.g. a learned variance) come from the
    conditional half. guidance_channels=None guides x.shape[1] channels: all of a plain prediction, only
    the eps half of a learned-sigma output. DiT's and SiT's published numbers use guidance_channels=3.
    Keyword arguments other than y are passed through unchanged.
    """
    check_guidance_arguments(cfg_scale, null_label, guidance_channels)

    def guided(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **model_kwargs: Any) -> torch.Tensor:
        batch_size = x.shape[0]
        null_labels = torch.full_like(y, null_label)
        output = model(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, null_labels]), **model_kwargs)
        return mix_guided_halves(output[:batch_size], output[batch_size:], cfg_scale, x.shape[1], guidance_channels)

    return guided


def mix_guided_halves(
    conditional: torch.Tensor, unconditional: torch.Tensor, cfg_scale: float, noise_channels: int,
    guidance_channels: int | None,
) -> torch.Tensor:
    """uncond + cfg_scale * (cond - uncond) on the guided channels, the conditional output on the rest."""
    channels = noise_channels if guidance_channels is None else guidance_channels
    if channels > conditional.shape[1]:
        raise ValueError(
            f"guidance_channels={channels} is invalid for a model output with {conditional.shape[1]} channels: "
            f"use at most {conditional.shape[1]}, or None to guide the {noise_channels} noise channels."
        )
    mixed = unconditional[:, :channels] + cfg_scale * (conditional[:, :channels] - unconditional[:, :channels])
    return torch.cat([mixed, conditional[:, channels:]], dim=1)  # (N, C_out, ...)


def check_guidance_arguments(cfg_scale: float, null_label: int, guidance_channels: int | None) -> None:
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)):
        raise UsageError(f"cfg_scale={cfg_scale!r} is invalid: expected a number (1.0 means no guidance).")
    if isinstance(null_label, bool) or not isinstance(null_label, int) or null_label < 0:
        raise UsageError(
            f"null_label={null_label!r} is invalid: expected a non-negative int, the model's unconditional "
            "class index (num_classes for DiT)."
        )
    if guidance_channels is not None and (
        isinstance(guidance_channels, bool) or not isinstance(guidance_channels, int) or guidance_channels < 1
    ):
        raise UsageError(
            f"guidance_channels={guidance_channels!r} is invalid: expected a positive int or None "
            "(None guides all noise channels, 3 reproduces DiT's published numbers)."
        )
