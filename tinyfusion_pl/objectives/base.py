"""The interface every training objective of a denoiser shares, and model-agnostic classifier-free guidance."""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import torch

Denoiser = Callable[..., torch.Tensor]



def split_batch(batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The batch convention of every trainer here: (x, y) -> (x, {'y': y}); a bare tensor x -> (x, {})."""
    if isinstance(batch, torch.Tensor):
        return batch, {}
    return batch[0], {"y": batch[1]}

class DiffusionObjective(abc.ABC):
    """How a denoiser `model(x_t, t, **model_kwargs)` is trained and sampled (Gaussian diffusion, flow matching)."""

    @property
    @abc.abstractmethod
    def num_timesteps(self) -> int:
        """Number of discrete timesteps that `sample_timesteps` draws from."""

    def sample_timesteps(
        self, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draw one training timestep per sample, uniformly over range(num_timesteps), as a long tensor (N,)."""
        return torch.randint(0, self.num_timesteps, (batch_size,), device=device, generator=generator)

    @abc.abstractmethod
    def training_losses(
        self,
        model: Denoiser,
        x_start: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Return per-sample loss terms (shape (N,)); terms["loss"] is the one to optimise."""

    @abc.abstractmethod
    def sample(
        self,
        model: Denoiser,
        noise: torch.Tensor,
        model_kwargs: dict[str, Any] | None = None,
        **sampler_options: Any,
    ) -> torch.Tensor:
        """Turn the starting noise into samples of the data distribution."""


def classifier_free_guidance(
    model: Denoiser, cfg_scale: float, null_label: int, guidance_channels: int | None = None
) -> Denoiser:
    """Wrap `model` into `guided(x, t, y, **kwargs)` that applies classifier-free guidance on one doubled batch.

    The model runs on [x; x] with labels [y; null_label]; the first `guidance_channels` output channels become
    uncond + cfg_scale * (cond - uncond), the remaining channels (e.g. a learned variance) come from the
    conditional half. guidance_channels=None guides x.shape[1] channels: all of a plain prediction, only
    the eps half of a learned-sigma output. DiT's published numbers use guidance_channels=3.
    Keyword arguments other than y are passed through unchanged.
    """
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)):
        raise ValueError(f"cfg_scale={cfg_scale!r} is invalid: expected a number (1.0 means no guidance).")
    if isinstance(null_label, bool) or not isinstance(null_label, int) or null_label < 0:
        raise ValueError(
            f"null_label={null_label!r} is invalid: expected a non-negative int, the model's unconditional "
            "class index (num_classes for DiT)."
        )
    if guidance_channels is not None and (
        isinstance(guidance_channels, bool) or not isinstance(guidance_channels, int) or guidance_channels < 1
    ):
        raise ValueError(
            f"guidance_channels={guidance_channels!r} is invalid: expected a positive int or None "
            "(None guides all noise channels, 3 reproduces DiT's published numbers)."
        )

    def guided(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **model_kwargs: Any) -> torch.Tensor:
        batch_size = x.shape[0]
        null_labels = torch.full_like(y, null_label)
        output = model(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, null_labels]), **model_kwargs)
        conditional, unconditional = output[:batch_size], output[batch_size:]  # (N, C_out, ...) each
        channels = x.shape[1] if guidance_channels is None else guidance_channels
        if channels > output.shape[1]:
            raise ValueError(
                f"guidance_channels={channels} is invalid for a model output with {output.shape[1]} channels: "
                f"use at most {output.shape[1]}, or None to guide the {x.shape[1]} noise channels."
            )
        mixed = unconditional[:, :channels] + cfg_scale * (conditional[:, :channels] - unconditional[:, :channels])
        return torch.cat([mixed, conditional[:, channels:]], dim=1)  # (N, C_out, ...)

    return guided
