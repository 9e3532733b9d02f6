"""Gaussian diffusion as DiT trains and samples it: eps prediction, learned-range variance, MSE + VB loss."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from tinyfusion_pl.errors import UsageError
from tinyfusion_pl.objectives.base import Denoiser, DiffusionObjective
from tinyfusion_pl.objectives.respacing import ddim_stride, respace_betas, space_timesteps

BETA_SCHEDULES = ("linear", "cosine")
SAMPLING_METHODS = ("ddpm", "ddim")
# Data in [-1, 1] quantised to 256 levels: each level owns a bin of width 2/255.
DECODER_BIN_HALF_WIDTH = 1.0 / 255.0
# Edge bins of the decoder reach to -inf / +inf; values beyond this threshold belong to them.
DECODER_EDGE = 0.999
LOG_TWO = math.log(2.0)
# Floor for probabilities before a log, so an impossible bin costs a large finite loss, not inf.
MIN_PROBABILITY = 1e-12
# Calibration batches start their evenly spread steps this far apart, so batches see different steps.
STRATIFIED_SHIFT_PER_BATCH = 7


# --------------------------------------------------------------------------
# Schedules and Gaussian helpers
# --------------------------------------------------------------------------


def make_betas(name: str, num_timesteps: int) -> torch.Tensor:
    """Return the float64 betas (T,) of improved DDPM's "linear" (DDPM's, scaled by 1000/T) or "cosine" schedule."""
    if name == "linear":
        scale = 1000.0 / num_timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
    if name == "cosine":
        def alpha_bar(fraction: torch.Tensor) -> torch.Tensor:
            return torch.cos((fraction + 0.008) / 1.008 * math.pi / 2) ** 2

        steps = torch.arange(num_timesteps, dtype=torch.float64)
        betas = 1.0 - alpha_bar((steps + 1) / num_timesteps) / alpha_bar(steps / num_timesteps)
        # Capped below 1 so the last steps do not destroy the signal in one jump (improved DDPM's 0.999).
        return betas.clamp(max=0.999)
    raise UsageError(f"beta_schedule={name!r} is invalid: expected one of {BETA_SCHEDULES}.")


def mean_over_non_batch(values: torch.Tensor) -> torch.Tensor:
    """Average every dimension but the first: (N, ...) -> (N,)."""
    return values.mean(dim=tuple(range(1, values.ndim)))


def normal_kl(
    mean_p: torch.Tensor, log_var_p: torch.Tensor, mean_q: torch.Tensor, log_var_q: torch.Tensor
) -> torch.Tensor:
    """Elementwise KL(N(mean_p, exp(log_var_p)) || N(mean_q, exp(log_var_q))) in nats."""
    return 0.5 * (
        log_var_q - log_var_p + torch.exp(log_var_p - log_var_q) + (mean_p - mean_q) ** 2 * torch.exp(-log_var_q) - 1.0
    )


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor, bin_half_width: float = DECODER_BIN_HALF_WIDTH
) -> torch.Tensor:
    """Elementwise log-probability (nats) of the quantisation bin of x under N(mean, exp(log_scale)^2).

    Data lie in [-1, 1] with bins [x - w, x + w]; the edge bins extend to -inf (x < -0.999) and +inf (x > 0.999).
    Uses the exact normal CDF (improved DDPM used a tanh approximation, within about 1e-3 of it).
    """
    inverse_scale = torch.exp(-log_scale)
    upper = inverse_scale * (x - mean + bin_half_width)
    lower = inverse_scale * (x - mean - bin_half_width)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_survival_lower = torch.special.log_ndtr(-lower)
    bin_probability = (torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=MIN_PROBABILITY)
    interior = torch.log(bin_probability)
    return torch.where(x < -DECODER_EDGE, log_cdf_upper, torch.where(x > DECODER_EDGE, log_survival_lower, interior))


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: losses never run in half precision."""
    return torch.float64 if any(tensor.dtype == torch.float64 for tensor in tensors) else torch.float32


# --------------------------------------------------------------------------
# Gaussian diffusion
# --------------------------------------------------------------------------


class GaussianDiffusion(DiffusionObjective):
    """DDPM with improved DDPM's learned-range variance and hybrid MSE + VB loss, DiT's defaults throughout.

    The model predicts eps; with learn_sigma=True it also returns C more channels v in [-1, 1] that set
    log var = frac * log beta_t + (1 - frac) * log posterior_var_t, frac = (v + 1) / 2.
    With learn_sigma=False the variance is fixed to betas ("fixed large") and loss = mse (vb is zeros).
    `timestep_respacing` (improved DDPM's spacing, e.g. "250" or "ddim25") builds a shorter process whose
    model calls still receive the original timestep values.
    """

    config_name = "gaussian"

    def __init__(
        self,
        num_timesteps: int = 1000,
        beta_schedule: str = "linear",
        learn_sigma: bool = True,
        timestep_respacing: str | int | Sequence[int] | None = None,
    ) -> None:
        _validate_arguments(num_timesteps, beta_schedule, learn_sigma)
        self.original_num_timesteps = num_timesteps
        self.beta_schedule = beta_schedule
        self.learn_sigma = learn_sigma
        self.timestep_respacing = timestep_respacing

        betas = make_betas(beta_schedule, num_timesteps)
        timestep_map = torch.arange(num_timesteps)
        if timestep_respacing is not None:
            kept = _kept_timesteps(num_timesteps, timestep_respacing, "timestep_respacing")
            if len(kept) < num_timesteps:
                betas, timestep_map = respace_betas(torch.cumprod(1.0 - betas, dim=0), kept)
        self.timestep_map = timestep_map  # (T',) original timestep of each step of this process
        self._set_schedule(betas)
        self._device_tables: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._respaced: dict[tuple[int, ...], GaussianDiffusion] = {}

    def _set_schedule(self, betas: torch.Tensor) -> None:
        """Precompute every float64 per-timestep quantity the formulas below need."""
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod
        self.alphas_cumprod_prev = alphas_cumprod_prev
        self.sqrt_alphas_cumprod = alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / alphas_cumprod - 1.0).sqrt()
        # q(x_{t-1} | x_t, x_0) = N(coef1 * x_0 + coef2 * x_t, posterior_variance).
        self.posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.posterior_mean_coef1 = betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod)
        # The posterior variance is 0 at t = 0; its log is clipped by reusing the value at t = 1
        # (a one-step process has no t = 1, and beta_0 stands in).
        first_variance = self.posterior_variance[1:2] if len(betas) > 1 else betas[:1]
        self.posterior_log_variance_clipped = torch.log(torch.cat([first_variance, self.posterior_variance[1:]]))
        self.log_betas = torch.log(betas)
        # "Fixed large" variance: betas, with the first entry set to the clipped posterior variance.
        self.fixed_large_log_variance = torch.log(torch.cat([first_variance, betas[1:]]))

    def __repr__(self) -> str:
        return (
            f"GaussianDiffusion(num_timesteps={self.original_num_timesteps}, beta_schedule={self.beta_schedule!r}, "
            f"learn_sigma={self.learn_sigma}, timestep_respacing={self.timestep_respacing!r})"
        )

    @property
    def num_timesteps(self) -> int:
        """Number of steps of this (possibly respaced) process."""
        return len(self.betas)

    # ---------------------------------------------------------------- gathering

    def _extract(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Schedule `name` at timesteps t (N,), in like's dtype, shaped (N, 1, ...) to broadcast against like."""
        key = (name, t.device)
        table = self._device_tables.get(key)
        if table is None:
            # MPS has no float64; everywhere else the gather happens in double precision.
            table_dtype = torch.float32 if t.device.type == "mps" else torch.float64
            table = getattr(self, name).to(device=t.device, dtype=table_dtype)
            self._device_tables[key] = table
        return table[t].to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    def sample_timesteps(
        self, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draw one training step per sample, uniformly over range(num_timesteps), as a long tensor (N,)."""
        return torch.randint(0, self.num_timesteps, (batch_size,), device=device, generator=generator)

    def stratified_timesteps(self, batch_size: int, batch_index: int, device: torch.device | str) -> torch.Tensor:
        """Steps spread evenly over [0, T) across the batch, shifted by 7 steps per batch index (N,) long."""
        spread = torch.arange(batch_size, device=device) * self.num_timesteps // batch_size
        return (spread + STRATIFIED_SHIFT_PER_BATCH * batch_index) % self.num_timesteps

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Map step indices of this process to the original timestep values the model was trained on."""
        key = ("timestep_map", t.device)
        table = self._device_tables.get(key)
        if table is None:
            table = self.timestep_map.to(t.device)
            self._device_tables[key] = table
        return table[t]

    # ---------------------------------------------------------------- forward process

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) using the given noise."""
        _check_timesteps(t, x_start)
        if noise is None:
            noise = torch.randn_like(x_start)
        _check_same_shape("noise", noise, "x_start", x_start)
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (mean, variance, clipped log variance) of the true posterior q(x_{t-1} | x_t, x_0)."""
        mean = (
            self._extract("posterior_mean_coef1", t, x_t) * x_start
            + self._extract("posterior_mean_coef2", t, x_t) * x_t
        )
        variance = self._extract("posterior_variance", t, x_t).expand_as(x_t)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Invert q_sample: x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, x_start: torch.Tensor) -> torch.Tensor:
        """The eps that maps x_start to x_t at step t."""
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x_start) / self._extract(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        )

    # ---------------------------------------------------------------- reverse process

    def split_model_output(
        self, model_output: torch.Tensor, x_t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Split an output into (eps, variance values v) — v is None without learned sigma."""
        channels = x_t.shape[1]
        expected_channels = 2 * channels if self.learn_sigma else channels
        if (
            model_output.ndim != x_t.ndim
            or model_output.shape[0] != x_t.shape[0]
            or model_output.shape[1] != expected_channels
            or model_output.shape[2:] != x_t.shape[2:]
        ):
            raise ValueError(
                f"model output of shape {tuple(model_output.shape)} does not fit x_t of shape {tuple(x_t.shape)}: "
                f"with learn_sigma={self.learn_sigma} the model must return {expected_channels} channels "
                f"({'eps then variance values' if self.learn_sigma else 'eps'}) at the same resolution; "
                "set learn_sigma to match the model."
            )
        if not self.learn_sigma:
            return model_output, None
        eps, variance_values = model_output.split(channels, dim=1)  # (N, C, ...) each
        return eps, variance_values

    def model_log_variance(
        self, variance_values: torch.Tensor | None, t: torch.Tensor, like: torch.Tensor
    ) -> torch.Tensor:
        """log var of p(x_{t-1} | x_t): interpolated from v in [-1, 1] (learned range) or fixed large if v is None."""
        if variance_values is None:
            return self._extract("fixed_large_log_variance", t, like).expand_as(like)
        fraction = (variance_values + 1) / 2
        return fraction * self._extract("log_betas", t, like) + (1 - fraction) * self._extract(
            "posterior_log_variance_clipped", t, like
        )

    def _p_from_parts(
        self,
        eps: torch.Tensor,
        variance_values: torch.Tensor | None,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
    ) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t) from an eps prediction and variance values already split apart."""
        log_variance = self.model_log_variance(variance_values, t, x_t)
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {
            "mean": mean,
            "variance": torch.exp(log_variance),
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "eps": eps,
        }

    def p_mean_variance(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False
    ) -> dict[str, torch.Tensor]:
        """Return mean, variance, log_variance, pred_xstart and eps of p(x_{t-1} | x_t) for a model output."""
        _check_timesteps(t, x_t)
        dtype = _compute_dtype(x_t, model_output)
        eps, variance_values = self.split_model_output(model_output.to(dtype), x_t)
        return self._p_from_parts(eps, variance_values, x_t.to(dtype), t, clip_denoised)

    # ---------------------------------------------------------------- losses

    def loss_terms(
        self,
        model_output: torch.Tensor,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Per-sample (N,) "loss" = "mse" + "vb" for a model output computed on x_t = q_sample(x_start, t, noise).

        mse: mean over non-batch dims of (noise - eps_pred)^2. vb (learned sigma only, else zeros):
        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) in bits/dim, the discretized decoder NLL at t = 0,
        with the predicted mean detached so vb trains only the variance.
        """
        _check_timesteps(t, x_t)
        _check_same_shape("x_start", x_start, "x_t", x_t)
        _check_same_shape("noise", noise, "x_t", x_t)
        dtype = _compute_dtype(model_output, x_start, x_t, noise)
        x_start, x_t, noise = x_start.to(dtype), x_t.to(dtype), noise.to(dtype)
        eps, variance_values = self.split_model_output(model_output.to(dtype), x_t)
        mse = mean_over_non_batch((noise - eps) ** 2)
        if variance_values is None:
            vb = torch.zeros_like(mse)
        else:
            vb = self._variational_bound(eps.detach(), variance_values, x_start, x_t, t)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def _variational_bound(
        self, eps: torch.Tensor, variance_values: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample VB term in bits/dim: posterior KL for t > 0, decoder NLL at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        model = self._p_from_parts(eps, variance_values, x_t, t)
        kl = mean_over_non_batch(normal_kl(true_mean, true_log_variance, model["mean"], model["log_variance"]))
        decoder_nll = -mean_over_non_batch(
            discretized_gaussian_log_likelihood(x_start, model["mean"], 0.5 * model["log_variance"])
        )
        return torch.where(t == 0, decoder_nll, kl) / LOG_TWO

    def distillation_terms(
        self, student_output: torch.Tensor, teacher_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-sample (N,) knowledge-distillation terms between two outputs on the same x_t and t.

        kd = kd_mse + kd_vb. kd_mse: mean squared difference of the eps predictions. kd_vb (learned sigma
        only, else zeros): KL(p_teacher(x_{t-1} | x_t) || p_student(x_{t-1} | x_t)) in bits/dim with the
        student's mean detached, so it trains the student's variance. The teacher output is detached.
        """
        _check_timesteps(t, x_t)
        _check_same_shape("student_output", student_output, "teacher_output", teacher_output)
        dtype = _compute_dtype(student_output, teacher_output, x_t)
        x_t = x_t.to(dtype)
        student_eps, student_variance = self.split_model_output(student_output.to(dtype), x_t)
        teacher_eps, teacher_variance = self.split_model_output(teacher_output.detach().to(dtype), x_t)
        kd_mse = mean_over_non_batch((teacher_eps - student_eps) ** 2)
        if student_variance is None:
            kd_vb = torch.zeros_like(kd_mse)
        else:
            teacher = self._p_from_parts(teacher_eps, teacher_variance, x_t, t)
            student = self._p_from_parts(student_eps.detach(), student_variance, x_t, t)
            kl = normal_kl(teacher["mean"], teacher["log_variance"], student["mean"], student["log_variance"])
            kd_vb = mean_over_non_batch(kl) / LOG_TWO
        return {"kd": kd_mse + kd_vb, "kd_mse": kd_mse, "kd_vb": kd_vb}

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
        """Noise x_start to step t (indices of this process), run the model, and return loss_terms' dict."""
        _check_timesteps(t, x_start)
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        model_output = model(x_t, self.model_timesteps(t), **(model_kwargs or {}))
        return self.loss_terms(model_output, x_start, x_t, t, noise)

    # ---------------------------------------------------------------- sampling

    def respaced(self, steps: int | str | Sequence[int], method: str = "ddpm") -> GaussianDiffusion:
        """The process keeping `steps` of the original ones (cached): an int spaces evenly, a string or list
        follows space_timesteps. For DDIM an int N uses the "ddimN" stride when one exists."""
        if isinstance(steps, bool) or not isinstance(steps, (int, str, Sequence)):
            raise UsageError(
                f"steps={steps!r} is invalid: expected a positive int, a respacing string such as '250' or "
                "'ddim25', or a list of section counts."
            )
        spacing: str | Sequence[int] = steps
        if isinstance(steps, int):
            if not 1 <= steps <= self.original_num_timesteps:
                raise UsageError(
                    f"steps={steps} is invalid: expected an int in [1, {self.original_num_timesteps}] "
                    f"(the process has {self.original_num_timesteps} timesteps)."
                )
            spacing = str(steps)
            if method == "ddim" and ddim_stride(self.original_num_timesteps, steps) is not None:
                spacing = f"ddim{steps}"
        kept = tuple(sorted(_kept_timesteps(self.original_num_timesteps, spacing, "steps")))
        if kept not in self._respaced:
            self._respaced[kept] = GaussianDiffusion(
                self.original_num_timesteps, self.beta_schedule, self.learn_sigma, timestep_respacing=spacing
            )
        return self._respaced[kept]

    def ddpm_step(
        self,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Draw x_{t-1} ~ p(x_{t-1} | x_t) with the model's (learned or fixed) variance; no noise where t == 0.

        temperature scales the added noise (MAR's diffusion head samples with it; 1.0 is plain DDPM).
        """
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised)
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=out["mean"].dtype)
        noise_scale = (t != 0).to(noise.dtype).reshape(-1, *([1] * (x_t.ndim - 1))) * torch.exp(
            0.5 * out["log_variance"]
        ) * temperature
        return out["mean"] + noise_scale * noise

    def ddim_step(
        self,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        eta: float = 0.0,
        clip_denoised: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One DDIM update from x_t to x_{t-1}; eta=0 is deterministic, eta=1 matches DDPM's posterior variance."""
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised)
        pred_xstart = out["pred_xstart"]  # (N, C, ...)
        # Recomputed from x_0 so that clipping x_0 is reflected in the direction term.
        eps = self.predict_eps_from_xstart(x_t.to(pred_xstart.dtype), t, pred_xstart)
        alpha_bar = self._extract("alphas_cumprod", t, pred_xstart)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, pred_xstart)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev))
        mean = pred_xstart * alpha_bar_prev.sqrt() + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        if eta == 0:
            return mean
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=mean.dtype)
        nonzero = (t != 0).to(noise.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        return mean + nonzero * sigma * noise

    def check_sampler_values(self, options: dict[str, Any]) -> None:
        """Refuse a method, eta or steps that `sample` cannot take (steps through the respacing it would build)."""
        method, eta, steps = options["method"], options["eta"], options["steps"]
        if method not in SAMPLING_METHODS:
            raise UsageError(f"method={method!r} is invalid: expected one of {SAMPLING_METHODS}.")
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
            raise UsageError(f"eta={eta!r} is invalid: expected a number in [0, 1] (0 = deterministic DDIM).")
        if method == "ddpm" and eta != 0:
            raise UsageError(
                f"eta={eta!r} is only used by method='ddim'; DDPM samples with the model's variance. "
                "Use eta=0.0 with method='ddpm', or method='ddim'."
            )
        if steps is not None:
            self.respaced(steps, method)  # cached: sampling reuses it

    def sample(
        self,
        model: Denoiser,
        noise: torch.Tensor,
        model_kwargs: dict[str, Any] | None = None,
        steps: int | str | Sequence[int] | None = 250,
        method: str = "ddpm",
        eta: float = 0.0,
        clip_denoised: bool = False,
        progress: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Denoise `noise` (x_T) into samples, without gradients, in noise's dtype.

        steps: an int (evenly spaced; for DDIM the "ddimN" stride when it exists), a respacing string such
        as "250" or "ddim25", or None for every step of this process. method: "ddpm" (learned or fixed
        variance) or "ddim" (eta sets the noise: 0 deterministic, 1 DDPM-like). clip_denoised clamps the
        predicted x_0 to [-1, 1] (off for latents, as in DiT).
        """
        self.check_sampler_values({"steps": steps, "method": method, "eta": eta, "clip_denoised": clip_denoised})
        process = self if steps is None else self.respaced(steps, method)
        model_kwargs = model_kwargs or {}
        x = noise.to(_compute_dtype(noise))
        step_indices = range(process.num_timesteps - 1, -1, -1)
        with torch.no_grad():
            for index in tqdm(step_indices, desc=f"{method} sampling", disable=not progress):
                t = torch.full((x.shape[0],), index, device=x.device, dtype=torch.long)
                model_output = model(x, process.model_timesteps(t), **model_kwargs)
                if method == "ddpm":
                    x = process.ddpm_step(model_output, x, t, clip_denoised, generator)
                else:
                    x = process.ddim_step(model_output, x, t, eta, clip_denoised, generator)
        return x.to(noise.dtype)


# --------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------


def _validate_arguments(num_timesteps: int, beta_schedule: str, learn_sigma: bool) -> None:
    """Reject bad constructor arguments with one message each."""
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 2:
        raise UsageError(f"num_timesteps={num_timesteps!r} is invalid: expected an int >= 2 (DiT uses 1000).")
    if beta_schedule not in BETA_SCHEDULES:
        raise UsageError(f"beta_schedule={beta_schedule!r} is invalid: expected one of {BETA_SCHEDULES}.")
    # The linear schedule is scaled by 1000 / T, so its last beta is 20 / T and must stay below 1.
    if beta_schedule == "linear" and num_timesteps <= 20:
        raise UsageError(
            f"num_timesteps={num_timesteps} is too small for beta_schedule='linear': its betas scale with "
            f"1000 / num_timesteps and would reach {20 / num_timesteps:g} >= 1. Use num_timesteps > 20, or "
            "train with 1000 steps and sample with fewer via steps=."
        )
    if not isinstance(learn_sigma, bool):
        raise UsageError(f"learn_sigma={learn_sigma!r} is invalid: expected True or False.")


def _kept_timesteps(num_timesteps: int, spacing: str | int | Sequence[int], argument: str) -> set[int]:
    """space_timesteps, with errors that name the caller's argument."""
    try:
        return space_timesteps(num_timesteps, spacing)
    except ValueError as error:
        raise UsageError(f"{argument}={spacing!r} cannot be used: {error}") from error


def _check_timesteps(t: torch.Tensor, x: torch.Tensor) -> None:
    """t must be an integer tensor with one step index per sample."""
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32) or t.shape != x.shape[:1]:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(
            f"t of shape {shape} is invalid for a batch of {x.shape[0]}: expected an integer tensor of shape "
            f"({x.shape[0]},) with one step index per sample, e.g. diffusion.sample_timesteps(N, device)."
        )


def _check_same_shape(name: str, tensor: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    """Two tensors that are combined elementwise must have the same shape."""
    if tensor.shape != other.shape:
        raise ValueError(
            f"{name} of shape {tuple(tensor.shape)} does not match {other_name} of shape {tuple(other.shape)}; "
            "they must have the same shape."
        )
