"""Flow matching as SiT trains and samples it: x_t = alpha_t x1 + sigma_t x0, velocity prediction, ODE and SDE samplers."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from tinyfusion_pl.errors import UsageError
from tinyfusion_pl.objectives.base import Denoiser, DiffusionObjective
from tinyfusion_pl.objectives.gaussian_diffusion import _check_same_shape, _compute_dtype, mean_over_non_batch

PATHS = ("linear", "gvp")
PREDICTIONS = ("velocity",)
SAMPLING_METHODS = ("euler", "heun", "dopri5", "sde")
DIFFUSION_FORMS = ("sigma", "constant")
# Calibration batches shift their evenly spread times by this fraction of the spacing, batch after batch:
# the golden ratio's fractional part never repeats an offset and fills the gaps evenly.
STRATIFIED_SHIFT_PER_BATCH = (math.sqrt(5.0) - 1.0) / 2.0

VelocityField = Callable[[torch.Tensor, Any], torch.Tensor]


# --------------------------------------------------------------------------
# Flow matching
# --------------------------------------------------------------------------


class FlowMatching(DiffusionObjective):
    """SiT's interpolant objective: noise x0 at t = 0, data x1 at t = 1, the net predicts the velocity.

    path="linear": alpha_t = t, sigma_t = 1 - t (SiT's default); path="gvp": alpha_t = sin(pi t / 2),
    sigma_t = cos(pi t / 2). Training regresses v(x_t, t) on u = d(alpha_t)/dt x1 + d(sigma_t)/dt x0
    (x1 - x0 on the linear path). The net receives t itself, a float in [0, 1].
    """

    config_name = "flow_matching"

    def __init__(self, path: str = "linear", prediction: str = "velocity") -> None:
        _validate_arguments(path, prediction)
        self.path = path
        self.prediction = prediction

    def __repr__(self) -> str:
        return f"FlowMatching(path={self.path!r}, prediction={self.prediction!r})"

    # ---------------------------------------------------------------- time

    def sample_timesteps(
        self, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draw one training time per sample, uniform in [0, 1), as a float32 tensor (N,)."""
        return torch.rand(batch_size, device=device, generator=generator)

    def stratified_timesteps(self, batch_size: int, batch_index: int, device: torch.device | str) -> torch.Tensor:
        """Times (i + offset) / N in [0, 1), float32 (N,): offset = 0.5 at batch 0, + 0.618 (mod 1) per batch index."""
        offset = (0.5 + STRATIFIED_SHIFT_PER_BATCH * batch_index) % 1.0
        return (torch.arange(batch_size, device=device, dtype=torch.float64) + offset).div(batch_size).float()

    # ---------------------------------------------------------------- path

    def path_coefficients(
        self, t: torch.Tensor, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t, d alpha_t / dt, d sigma_t / dt) at times t (N,), in like's dtype, shaped (N, 1, ...)."""
        t = t.to(_compute_dtype(like, t)).reshape(-1, *([1] * (like.ndim - 1)))
        if self.path == "linear":
            coefficients = (t, 1.0 - t, torch.ones_like(t), -torch.ones_like(t))
        else:
            angle = 0.5 * math.pi * t
            coefficients = (
                torch.sin(angle), torch.cos(angle), 0.5 * math.pi * torch.cos(angle), -0.5 * math.pi * torch.sin(angle)
            )
        return tuple(coefficient.to(like.dtype) for coefficient in coefficients)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The point x_t = alpha_t x_start + sigma_t noise on the path from noise (t = 0) to data (t = 1)."""
        _check_times(t, x_start)
        if noise is None:
            noise = torch.randn_like(x_start)
        _check_same_shape("noise", noise, "x_start", x_start)
        alpha, sigma, _, _ = self.path_coefficients(t, x_start)
        return alpha * x_start + sigma * noise

    def target_velocity(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The regression target u = d(alpha_t)/dt x_start + d(sigma_t)/dt noise (x_start - noise when linear)."""
        _check_times(t, x_start)
        _check_same_shape("noise", noise, "x_start", x_start)
        _, _, d_alpha, d_sigma = self.path_coefficients(t, x_start)
        return d_alpha * x_start + d_sigma * noise

    def velocity(self, model_output: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """The velocity in a model output: all of it, or the first C channels of a learned-sigma output (2C)."""
        channels = x_t.shape[1]
        if (
            model_output.ndim != x_t.ndim
            or model_output.shape[0] != x_t.shape[0]
            or model_output.shape[1] < channels
            or model_output.shape[2:] != x_t.shape[2:]
        ):
            raise ValueError(
                f"model output of shape {tuple(model_output.shape)} does not fit x_t of shape {tuple(x_t.shape)}: "
                f"the model must return at least {channels} channels (the velocity, then optionally a learned "
                "sigma that flow matching ignores) at the same resolution."
            )
        return model_output[:, :channels]  # (N, C, ...)

    def score_from_velocity(self, velocity: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """grad log p_t(x_t) = (r v - x_t) / (sigma_t^2 - r sigma_t d sigma_t / dt), r = alpha_t / (d alpha_t / dt).

        From v = E[u | x_t] and x_t = alpha_t x1 + sigma_t x0: the score is -E[x0 | x_t] / sigma_t. Finite for
        t < 1; at t = 1 (sigma_t = 0) the score of the data distribution is unbounded.
        """
        alpha, sigma, d_alpha, d_sigma = self.path_coefficients(t, x_t)
        ratio = alpha / d_alpha
        return (ratio * velocity - x_t) / (sigma**2 - ratio * d_sigma * sigma)

    # ---------------------------------------------------------------- losses

    def loss_terms(
        self,
        model_output: torch.Tensor,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Per-sample (N,) "loss" = "mse": mean over non-batch dims of (v - u)^2, u the target velocity.

        A learned-sigma output (2C channels, e.g. a DiT with learn_sigma) contributes its first C channels only.
        """
        _check_times(t, x_t)
        _check_same_shape("x_start", x_start, "x_t", x_t)
        _check_same_shape("noise", noise, "x_t", x_t)
        dtype = _compute_dtype(model_output, x_start, x_t, noise)
        velocity = self.velocity(model_output, x_t).to(dtype)
        target = self.target_velocity(x_start.to(dtype), t, noise.to(dtype))
        mse = mean_over_non_batch((velocity - target) ** 2)
        return {"loss": mse, "mse": mse}

    def distillation_terms(
        self, student_output: torch.Tensor, teacher_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-sample (N,) "kd": mean squared difference of the two velocities, the teacher's detached."""
        _check_times(t, x_t)
        _check_same_shape("student_output", student_output, "teacher_output", teacher_output)
        dtype = _compute_dtype(student_output, teacher_output, x_t)
        student = self.velocity(student_output, x_t).to(dtype)
        teacher = self.velocity(teacher_output.detach(), x_t).to(dtype)
        return {"kd": mean_over_non_batch((student - teacher) ** 2)}

    # ---------------------------------------------------------------- sampling

    def sde_coefficients(
        self, velocity: torch.Tensor, x: torch.Tensor, t: torch.Tensor, diffusion_form: str, diffusion_norm: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(drift v + w_t score, w_t) of dx = (v + w_t score) dt + sqrt(2 w_t) dW, whose marginals are the path's.

        w_t = diffusion_norm * sigma_t ("sigma") or diffusion_norm ("constant").
        """
        _, sigma, _, _ = self.path_coefficients(t, x)
        diffusion = diffusion_norm * (sigma if diffusion_form == "sigma" else torch.ones_like(sigma))
        return velocity + diffusion * self.score_from_velocity(velocity, x, t), diffusion

    def check_sampler_values(self, options: dict[str, Any]) -> None:
        """Refuse sampler option values that `sample` cannot take (the same checks, run before anything slow)."""
        _validate_sampler_arguments(options["steps"], options["method"], options["last_step_size"],
                                    options["diffusion_form"], options["diffusion_norm"], options["atol"],
                                    options["rtol"])

    def sample(
        self,
        model: Denoiser,
        noise: torch.Tensor,
        model_kwargs: dict[str, Any] | None = None,
        steps: int = 50,
        method: str = "euler",
        last_step_size: float = 0.04,
        diffusion_form: str = "sigma",
        diffusion_norm: float = 1.0,
        atol: float = 1e-6,
        rtol: float = 1e-3,
        progress: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Carry `noise` (x at t = 0) to samples at t = 1, without gradients, in noise's dtype.

        "euler" / "heun": the probability-flow ODE dx/dt = v(x, t) on `steps` uniform intervals (Heun: two
        model calls per interval; SiT's num_steps counts grid points, one more). "dopri5": adaptive
        Dormand-Prince from torchdiffeq (optional, the `ode` extra) with atol, rtol; `steps` is unused.
        "sde", SiT's Euler-Maruyama sampler with `steps` model calls (steps=250 is SiT's default grid):
        steps - 1 steps of size h = (1 - last_step_size) / (steps - 1) from t = 0,
            x <- x + (v + w_t s) h + sqrt(2 w_t h) z,   s = score_from_velocity(v, x, t),  z ~ N(0, I),
        then one noise-free "mean" step x <- x + (v + w_t s) last_step_size at t = 1 - last_step_size
        (last_step_size=0: `steps` stochastic steps of size 1 / steps, no mean step). w_t = diffusion_norm *
        sigma_t by default (SiT's sample.py), or diffusion_norm with diffusion_form="constant".
        The progress bar counts model calls.
        """
        self.check_sampler_values({"steps": steps, "method": method, "last_step_size": last_step_size,
                                   "diffusion_form": diffusion_form, "diffusion_norm": diffusion_norm,
                                   "atol": atol, "rtol": rtol})
        odeint = _import_odeint() if method == "dopri5" else None
        model_kwargs = model_kwargs or {}
        x = noise.to(_compute_dtype(noise))
        model_calls = {"euler": steps, "heun": 2 * steps, "sde": steps, "dopri5": None}[method]
        with torch.no_grad(), tqdm(total=model_calls, desc=f"{method} sampling", disable=not progress) as bar:

            def velocity_at(x: torch.Tensor, time: float | torch.Tensor) -> torch.Tensor:
                t = torch.as_tensor(time, dtype=x.dtype, device=x.device).repeat(x.shape[0])  # (N,)
                bar.update(1)
                return self.velocity(model(x, t, **model_kwargs), x).to(x.dtype)

            if method == "dopri5":
                times = torch.tensor([0.0, 1.0], dtype=x.dtype, device=x.device)
                x = odeint(lambda time, x: velocity_at(x, time), x, times, method="dopri5", atol=atol, rtol=rtol)[-1]
            elif method == "sde":
                x = self._sample_sde(velocity_at, x, steps, last_step_size, diffusion_form, diffusion_norm, generator)
            else:
                x = _integrate_ode(velocity_at, x, steps, heun=method == "heun")
        return x.to(noise.dtype)

    def _sample_sde(
        self, velocity_at: VelocityField, x: torch.Tensor, steps: int, last_step_size: float, diffusion_form: str,
        diffusion_norm: float, generator: torch.Generator | None,
    ) -> torch.Tensor:
        """Euler-Maruyama from t = 0 to 1 - last_step_size, then the mean step (see `sample`)."""
        stochastic_steps = steps - 1 if last_step_size > 0 else steps
        end = 1.0 - last_step_size
        step_size = end / stochastic_steps

        def drift_and_diffusion(x: torch.Tensor, time: float) -> tuple[torch.Tensor, torch.Tensor]:
            t = torch.full((x.shape[0],), time, dtype=x.dtype, device=x.device)
            return self.sde_coefficients(velocity_at(x, time), x, t, diffusion_form, diffusion_norm)

        for index in range(stochastic_steps):
            drift, diffusion = drift_and_diffusion(x, index * step_size)
            brownian = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + drift * step_size + torch.sqrt(2.0 * diffusion * step_size) * brownian
        if last_step_size > 0:
            drift, _ = drift_and_diffusion(x, end)
            x = x + drift * last_step_size
        return x


def _integrate_ode(velocity_at: VelocityField, x: torch.Tensor, steps: int, heun: bool) -> torch.Tensor:
    """Euler's or Heun's method for dx/dt = v(x, t) on `steps` uniform intervals of [0, 1]."""
    step_size = 1.0 / steps
    for index in range(steps):
        start, end = index * step_size, (index + 1) * step_size
        slope = velocity_at(x, start)
        if heun:
            predicted = x + step_size * slope
            slope = 0.5 * (slope + velocity_at(predicted, end))
        x = x + step_size * slope
    return x


def _import_odeint() -> Callable[..., torch.Tensor]:
    """torchdiffeq's odeint, or an ImportError that says how to install it."""
    try:
        from torchdiffeq import odeint
    except ImportError as error:
        raise ImportError(
            "method='dopri5' needs torchdiffeq, an optional dependency: `pip install torchdiffeq`, or install "
            "this package with the `ode` extra (`pip install tinyfusion_pl[ode]`). The fixed-step methods "
            "'euler' and 'heun' need nothing extra."
        ) from error
    return odeint


# --------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def _validate_arguments(path: str, prediction: str) -> None:
    """Reject bad constructor arguments with one message each."""
    if path not in PATHS:
        raise UsageError(f"path={path!r} is invalid: expected one of {PATHS} (SiT's default is 'linear').")
    if prediction not in PREDICTIONS:
        raise UsageError(
            f"prediction={prediction!r} is invalid: expected one of {PREDICTIONS}; SiT's noise and score "
            "predictions are not implemented."
        )


def _validate_sampler_arguments(
    steps: int, method: str, last_step_size: float, diffusion_form: str, diffusion_norm: float, atol: float,
    rtol: float,
) -> None:
    """Reject bad sampler options with one message each."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UsageError(f"steps={steps!r} is invalid: expected a positive int (uniform time intervals or model calls).")
    if method not in SAMPLING_METHODS:
        raise UsageError(f"method={method!r} is invalid: expected one of {SAMPLING_METHODS}.")
    if not _is_number(last_step_size) or not 0.0 <= last_step_size < 1.0:
        raise UsageError(
            f"last_step_size={last_step_size!r} is invalid: expected a number in [0, 1) (SiT uses 0.04; 0 ends "
            "the SDE without the final mean step)."
        )
    if method == "sde" and last_step_size > 0 and steps < 2:
        raise UsageError(
            f"steps={steps} is too few for method='sde' with last_step_size={last_step_size}: the sampler takes "
            "steps - 1 Euler-Maruyama steps and then the mean step. Use steps >= 2, or last_step_size=0."
        )
    if diffusion_form not in DIFFUSION_FORMS:
        raise UsageError(f"diffusion_form={diffusion_form!r} is invalid: expected one of {DIFFUSION_FORMS}.")
    if not _is_number(diffusion_norm) or diffusion_norm < 0:
        raise UsageError(
            f"diffusion_norm={diffusion_norm!r} is invalid: expected a number >= 0 (0 turns the SDE into the ODE)."
        )
    for name, tolerance in (("atol", atol), ("rtol", rtol)):
        if not _is_number(tolerance) or tolerance <= 0:
            raise UsageError(f"{name}={tolerance!r} is invalid: expected a positive number (SiT: atol=1e-6, rtol=1e-3).")


def _check_times(t: torch.Tensor, x: torch.Tensor) -> None:
    """t must be a floating tensor with one time per sample."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.shape != x.shape[:1]:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(
            f"t of shape {shape} is invalid for a batch of {x.shape[0]}: expected a floating tensor of shape "
            f"({x.shape[0]},) with one time in [0, 1] per sample, e.g. objective.sample_timesteps(N, device)."
        )
