"""GaussianDiffusion against closed forms re-derived here in float64 (plain Python maths, not the module's code)."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from tinyfusion_pl.objectives import (
    DiffusionObjective,
    GaussianDiffusion,
    classifier_free_guidance,
    space_timesteps,
)
from tinyfusion_pl.objectives.gaussian_diffusion import discretized_gaussian_log_likelihood, normal_kl

# ----------------------------------------------------------------------------
# Independent reference: the DDPM schedule written out with Python floats
# ----------------------------------------------------------------------------


def reference_linear_betas(num_timesteps: int) -> list[float]:
    """DDPM's 1e-4..0.02 linear betas for 1000 steps, scaled by 1000/T (improved DDPM / DiT)."""
    start, end = 1e-4 * 1000 / num_timesteps, 0.02 * 1000 / num_timesteps
    return [start + (end - start) * i / (num_timesteps - 1) for i in range(num_timesteps)]


def reference_alphas_cumprod(betas: list[float]) -> list[float]:
    product, values = 1.0, []
    for beta in betas:
        product *= 1.0 - beta
        values.append(product)
    return values


def reference_posterior(betas: list[float], t: int) -> tuple[float, float, float]:
    """(coefficient of x_0, coefficient of x_t, variance) of q(x_{t-1} | x_t, x_0) from Bayes' rule."""
    if t == 0:
        return 1.0, 0.0, 0.0  # x_{-1} is x_0 itself
    abar = reference_alphas_cumprod(betas)
    abar_prev = abar[t - 1]
    # Product of the Gaussians q(x_t | x_{t-1}) and q(x_{t-1} | x_0), solved for x_{t-1}.
    precision = (1 - betas[t]) / betas[t] + 1 / (1 - abar_prev)
    variance = 1 / precision
    coef_x0 = variance * math.sqrt(abar_prev) / (1 - abar_prev)
    coef_xt = variance * math.sqrt(1 - betas[t]) / betas[t]
    return coef_x0, coef_xt, variance


def gaussian_kl(mean_p: float, var_p: float, mean_q: float, var_q: float) -> float:
    """KL(N(mean_p, var_p) || N(mean_q, var_q)) in nats, the textbook form."""
    return math.log(math.sqrt(var_q) / math.sqrt(var_p)) + (var_p + (mean_p - mean_q) ** 2) / (2 * var_q) - 0.5


def normal_cdf(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def decoder_log_likelihood(x: float, mean: float, std: float) -> float:
    """log P(bin of x) for data on 256 levels in [-1, 1], edge bins open, by direct CDF differences."""
    upper = normal_cdf((x + 1 / 255 - mean) / std) if x < 0.999 else 1.0
    lower = normal_cdf((x - 1 / 255 - mean) / std) if x > -0.999 else 0.0
    return math.log(upper - lower)


def learned_log_variance(betas: list[float], t: int, v: float) -> float:
    """Improved DDPM's learned range: interpolate log beta_t and the clipped log posterior variance."""
    posterior_variance = reference_posterior(betas, max(t, 1))[2]
    fraction = (v + 1) / 2
    return fraction * math.log(betas[t]) + (1 - fraction) * math.log(posterior_variance)


@pytest.fixture(scope="module")
def diffusion() -> GaussianDiffusion:
    return GaussianDiffusion()


# ----------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("num_timesteps", [1000, 250])
def test_linear_schedule_matches_closed_forms(num_timesteps: int) -> None:
    diffusion = GaussianDiffusion(num_timesteps=num_timesteps)
    betas = reference_linear_betas(num_timesteps)
    abar = reference_alphas_cumprod(betas)
    assert diffusion.num_timesteps == num_timesteps
    np.testing.assert_allclose(diffusion.betas.numpy(), betas, rtol=1e-12)
    np.testing.assert_allclose(diffusion.alphas_cumprod.numpy(), abar, rtol=1e-10)
    for t in [1, 2, num_timesteps // 2, num_timesteps - 1]:
        coef_x0, coef_xt, variance = reference_posterior(betas, t)
        assert diffusion.posterior_mean_coef1[t].item() == pytest.approx(coef_x0, rel=1e-9)
        assert diffusion.posterior_mean_coef2[t].item() == pytest.approx(coef_xt, rel=1e-9)
        assert diffusion.posterior_variance[t].item() == pytest.approx(variance, rel=1e-9)
        assert diffusion.posterior_log_variance_clipped[t].item() == pytest.approx(math.log(variance), rel=1e-9)
    # At t = 0 the posterior is a point mass: its log variance is clipped to the value at t = 1.
    assert diffusion.posterior_variance[0].item() == 0.0
    clipped = math.log(reference_posterior(betas, 1)[2])
    assert diffusion.posterior_log_variance_clipped[0].item() == pytest.approx(clipped, rel=1e-9)
    assert diffusion.fixed_large_log_variance[0].item() == pytest.approx(clipped, rel=1e-9)
    assert diffusion.fixed_large_log_variance[5].item() == pytest.approx(math.log(betas[5]), rel=1e-12)


def test_cosine_schedule_matches_closed_form() -> None:
    diffusion = GaussianDiffusion(num_timesteps=100, beta_schedule="cosine")

    def alpha_bar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    expected = [min(1 - alpha_bar((i + 1) / 100) / alpha_bar(i / 100), 0.999) for i in range(100)]
    np.testing.assert_allclose(diffusion.betas.numpy(), expected, rtol=1e-10)
    assert diffusion.betas[-1].item() == 0.999


# ----------------------------------------------------------------------------
# Forward process and Gaussian helpers
# ----------------------------------------------------------------------------


def test_q_sample_is_the_closed_form_and_has_the_right_statistics(diffusion: GaussianDiffusion) -> None:
    abar = reference_alphas_cumprod(reference_linear_betas(1000))
    x_start = torch.full((4000, 1, 2, 2), 0.7, dtype=torch.float64)
    t = torch.full((4000,), 600)
    noise = torch.randn(x_start.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_t = diffusion.q_sample(x_start, t, noise)
    expected = math.sqrt(abar[600]) * 0.7 + math.sqrt(1 - abar[600]) * noise
    torch.testing.assert_close(x_t, expected, rtol=1e-12, atol=1e-12)
    assert x_t.mean().item() == pytest.approx(math.sqrt(abar[600]) * 0.7, abs=0.03)
    assert x_t.var().item() == pytest.approx(1 - abar[600], rel=0.03)


def test_normal_kl_matches_torch_distributions() -> None:
    generator = torch.Generator().manual_seed(1)
    mean_p, mean_q = torch.randn(2, 50, generator=generator, dtype=torch.float64)
    log_var_p, log_var_q = torch.randn(2, 50, generator=generator, dtype=torch.float64)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean_p, (0.5 * log_var_p).exp()),
        torch.distributions.Normal(mean_q, (0.5 * log_var_q).exp()),
    )
    torch.testing.assert_close(normal_kl(mean_p, log_var_p, mean_q, log_var_q), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "x, mean, std",
    [(-1.0, -0.98, 0.02), (1.0, 0.97, 0.05), (0.2, 0.21, 0.01), (0.2, 0.5, 0.3), (-1.0, 0.3, 0.4), (1.0, 1.0, 0.003)],
)
def test_discretized_gaussian_log_likelihood_matches_cdf_differences(x: float, mean: float, std: float) -> None:
    value = discretized_gaussian_log_likelihood(
        torch.tensor([x], dtype=torch.float64),
        torch.tensor([mean], dtype=torch.float64),
        torch.tensor([math.log(std)], dtype=torch.float64),
    )
    assert value.item() == pytest.approx(decoder_log_likelihood(x, mean, std), rel=1e-9)


def test_discretized_gaussian_log_likelihood_stays_finite_far_in_the_tail() -> None:
    # The lowest bin seen from a mean at +1 with a tiny scale: log Phi(-z) for z ~ 500, far below 1e-12.
    value = discretized_gaussian_log_likelihood(
        torch.tensor([-1.0], dtype=torch.float64),
        torch.tensor([1.0], dtype=torch.float64),
        torch.tensor([math.log(0.004)], dtype=torch.float64),
    )
    assert value.item() == pytest.approx(norm.logcdf((-1 + 1 / 255 - 1) / 0.004), rel=1e-6)


# ----------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------


def hand_built_batch(diffusion: GaussianDiffusion, t_values: list[int]):
    generator = torch.Generator().manual_seed(2)
    n = len(t_values)
    # x_0 on the 256-level grid of [-1, 1], including both edge values, as the decoder assumes.
    x_start = torch.randint(0, 256, (n, 2, 2, 2), generator=generator).double() * 2 / 255 - 1
    x_start[0, 0, 0, 0], x_start[-1, 1, 1, 1] = -1.0, 1.0
    noise = torch.randn(x_start.shape, generator=generator, dtype=torch.float64)
    t = torch.tensor(t_values)
    x_t = diffusion.q_sample(x_start, t, noise)
    eps_pred = noise + 0.3 * torch.randn(x_start.shape, generator=generator, dtype=torch.float64)
    variance_values = torch.rand(x_start.shape, generator=generator, dtype=torch.float64) * 2 - 1
    return x_start, x_t, t, noise, eps_pred, variance_values


def test_loss_terms_match_an_elementwise_derivation(diffusion: GaussianDiffusion) -> None:
    betas = reference_linear_betas(1000)
    abar = reference_alphas_cumprod(betas)
    x_start, x_t, t, noise, eps_pred, variance_values = hand_built_batch(diffusion, [0, 1, 500, 999])
    terms = diffusion.loss_terms(torch.cat([eps_pred, variance_values], 1), x_start, x_t, t, noise)

    assert set(terms) == {"loss", "mse", "vb"}
    assert all(value.shape == (4,) for value in terms.values())
    for i, step in enumerate(t.tolist()):
        coef_x0, coef_xt, posterior_variance = reference_posterior(betas, step)
        squared_errors, vb_nats = [], []
        for index in np.ndindex(*x_start.shape[1:]):
            x0, xt = x_start[i][index].item(), x_t[i][index].item()
            eps = eps_pred[i][index].item()
            squared_errors.append((noise[i][index].item() - eps) ** 2)
            pred_x0 = (xt - math.sqrt(1 - abar[step]) * eps) / math.sqrt(abar[step])
            model_mean = coef_x0 * pred_x0 + coef_xt * xt
            model_variance = math.exp(learned_log_variance(betas, step, variance_values[i][index].item()))
            if step == 0:
                vb_nats.append(-decoder_log_likelihood(x0, model_mean, math.sqrt(model_variance)))
            else:
                true_mean = coef_x0 * x0 + coef_xt * xt
                vb_nats.append(gaussian_kl(true_mean, posterior_variance, model_mean, model_variance))
        assert terms["mse"][i].item() == pytest.approx(np.mean(squared_errors), rel=1e-10)
        assert terms["vb"][i].item() == pytest.approx(np.mean(vb_nats) / math.log(2), rel=1e-8)
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])


def test_vb_trains_only_the_variance(diffusion: GaussianDiffusion) -> None:
    x_start, x_t, t, noise, eps_pred, variance_values = hand_built_batch(diffusion, [0, 3, 400, 900])
    model_output = torch.cat([eps_pred, variance_values], 1).requires_grad_(True)
    terms = diffusion.loss_terms(model_output, x_start, x_t, t, noise)
    (vb_grad,) = torch.autograd.grad(terms["vb"].sum(), model_output, retain_graph=True)
    (mse_grad,) = torch.autograd.grad(terms["mse"].sum(), model_output)
    assert torch.all(vb_grad[:, :2] == 0)
    assert torch.all(vb_grad[:, 2:].abs().sum(dim=(1, 2, 3)) > 0)
    assert torch.all(mse_grad[:, 2:] == 0)
    assert torch.all(mse_grad[:, :2].abs().sum(dim=(1, 2, 3)) > 0)


def test_fixed_variance_has_zero_vb_and_rejects_a_learned_sigma_output() -> None:
    diffusion = GaussianDiffusion(learn_sigma=False)
    x_start, x_t, t, noise, eps_pred, variance_values = hand_built_batch(diffusion, [0, 10, 999])
    terms = diffusion.loss_terms(eps_pred, x_start, x_t, t, noise)
    assert torch.all(terms["vb"] == 0)
    torch.testing.assert_close(terms["loss"], terms["mse"])
    with pytest.raises(ValueError, match=r"learn_sigma=False the model must return 2 channels"):
        diffusion.loss_terms(torch.cat([eps_pred, variance_values], 1), x_start, x_t, t, noise)


def test_training_losses_runs_the_model_on_q_sample(diffusion: GaussianDiffusion) -> None:
    x_start = torch.randn(3, 2, 4, 4)
    noise = torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 7, 999])
    seen = {}

    def model(x, timesteps, y):
        seen.update(x=x, timesteps=timesteps, y=y)
        return torch.cat([0.5 * x, torch.zeros_like(x)], 1)

    labels = torch.tensor([1, 2, 3])
    terms = diffusion.training_losses(model, x_start, t, noise=noise, model_kwargs=dict(y=labels))
    torch.testing.assert_close(seen["x"], diffusion.q_sample(x_start, t, noise))
    assert torch.equal(seen["timesteps"], t) and torch.equal(seen["y"], labels)
    expected = diffusion.loss_terms(model(seen["x"], t, labels), x_start, seen["x"], t, noise)
    for name in ("loss", "mse", "vb"):
        torch.testing.assert_close(terms[name], expected[name])


def test_losses_under_bf16_autocast_are_float32_and_close_to_float32() -> None:
    diffusion = GaussianDiffusion()
    torch.manual_seed(0)
    net = torch.nn.Conv2d(2, 4, 1)

    def model(x, t):
        return torch.tanh(net(x))

    x_start, noise = torch.randn(2, 2, 2, 4, 4)
    t = torch.tensor([0, 500])
    reference = diffusion.training_losses(model, x_start, t, noise=noise)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x_start, t).dtype == torch.bfloat16
        mixed = diffusion.training_losses(model, x_start, t, noise=noise)
    assert mixed["loss"].dtype == torch.float32
    torch.testing.assert_close(mixed["loss"], reference["loss"], rtol=0.05, atol=0.05)


def test_distillation_terms_match_a_direct_derivation(diffusion: GaussianDiffusion) -> None:
    betas = reference_linear_betas(1000)
    abar = reference_alphas_cumprod(betas)
    _, x_t, t, _, student_eps, student_v = hand_built_batch(diffusion, [0, 250, 999])
    generator = torch.Generator().manual_seed(3)
    teacher_eps = student_eps + 0.2 * torch.randn(student_eps.shape, generator=generator, dtype=torch.float64)
    teacher_v = torch.rand(student_v.shape, generator=generator, dtype=torch.float64) * 2 - 1
    student_output = torch.cat([student_eps, student_v], 1).requires_grad_(True)
    teacher_output = torch.cat([teacher_eps, teacher_v], 1).requires_grad_(True)
    terms = diffusion.distillation_terms(student_output, teacher_output, x_t, t)

    for i, step in enumerate(t.tolist()):
        coef_x0, coef_xt, _ = reference_posterior(betas, step)

        def mean_of(eps: float, xt: float, step=step, coef_x0=coef_x0, coef_xt=coef_xt) -> float:
            return coef_x0 * (xt - math.sqrt(1 - abar[step]) * eps) / math.sqrt(abar[step]) + coef_xt * xt

        kls, squared = [], []
        for index in np.ndindex(*x_t.shape[1:]):
            xt = x_t[i][index].item()
            s_eps, t_eps = student_eps[i][index].item(), teacher_eps[i][index].item()
            squared.append((s_eps - t_eps) ** 2)
            kls.append(
                gaussian_kl(
                    mean_of(t_eps, xt),
                    math.exp(learned_log_variance(betas, step, teacher_v[i][index].item())),
                    mean_of(s_eps, xt),
                    math.exp(learned_log_variance(betas, step, student_v[i][index].item())),
                )
            )
        assert terms["kd_mse"][i].item() == pytest.approx(np.mean(squared), rel=1e-10)
        assert terms["kd_vb"][i].item() == pytest.approx(np.mean(kls) / math.log(2), rel=1e-8)

    (grad,) = torch.autograd.grad(terms["kd_vb"].sum(), student_output)
    assert torch.all(grad[:, :2] == 0) and grad[:, 2:].abs().sum() > 0
    same = diffusion.distillation_terms(teacher_output, teacher_output, x_t, t)
    torch.testing.assert_close(same["kd_vb"], torch.zeros(3, dtype=torch.float64))
    fixed = GaussianDiffusion(learn_sigma=False).distillation_terms(student_eps, teacher_eps, x_t, t)
    assert torch.all(fixed["kd_vb"] == 0)
    torch.testing.assert_close(fixed["kd_mse"], terms["kd_mse"].detach())


def test_teacher_output_gets_no_gradient(diffusion: GaussianDiffusion) -> None:
    _, x_t, t, _, eps, v = hand_built_batch(diffusion, [5, 50])
    student_output = torch.cat([eps, v], 1).requires_grad_(True)
    teacher_output = torch.cat([eps.flip(0), v.flip(0)], 1).requires_grad_(True)
    terms = diffusion.distillation_terms(student_output, teacher_output, x_t, t)
    (terms["kd_mse"] + terms["kd_vb"]).sum().backward()
    assert teacher_output.grad is None and student_output.grad is not None


# ----------------------------------------------------------------------------
# Respacing
# ----------------------------------------------------------------------------


def test_space_timesteps_ddim_uses_a_fixed_stride() -> None:
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    assert space_timesteps(1000, "ddim1000") == set(range(1000))
    with pytest.raises(ValueError, match=r"'ddim600' is impossible for num_timesteps=1000"):
        space_timesteps(1000, "ddim600")


def test_space_timesteps_follows_improved_ddpm_sections() -> None:
    # Improved DDPM's documented example: 300 steps, sections of 100 strided to 10, 15 and 20 steps.
    kept = sorted(space_timesteps(300, [10, 15, 20]))
    assert space_timesteps(300, "10,15,20") == set(kept)
    for start, count in [(0, 10), (100, 15), (200, 20)]:
        section = [step for step in kept if start <= step < start + 100]
        gaps = np.diff(section)
        assert len(section) == count and section[0] == start and section[-1] == start + 99
        assert gaps.max() - gaps.min() <= 1
    # DiT's "250": one section, 999 / 249 fractional stride.
    assert sorted(space_timesteps(1000, "250")) == [round(k * 999 / 249) for k in range(250)]
    assert space_timesteps(1000, 250) == space_timesteps(1000, "250")
    # Uneven split: the first sections take the remainder.
    assert space_timesteps(10, [3, 2, 1]) == {0, 2, 3, 4, 6, 7}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("ddimx", r"expected 'ddimN' with N a positive integer"),
        ("ten", r"section_counts='ten' is invalid"),
        ([0, 5], r"section_counts=\[0, 5\] is invalid"),
        ("2000", r"asks for 2000 steps in section 0, which only has 1000"),
    ],
)
def test_space_timesteps_rejects_bad_specs(spec, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        space_timesteps(1000, spec)


def test_respaced_betas_reproduce_the_kept_alphas_cumprod(diffusion: GaussianDiffusion) -> None:
    abar = reference_alphas_cumprod(reference_linear_betas(1000))
    for spacing in ["ddim25", "250", "10,15,20"]:
        respaced = GaussianDiffusion(timestep_respacing=spacing)
        kept = sorted(space_timesteps(1000, spacing))
        assert respaced.num_timesteps == len(kept)
        assert respaced.timestep_map.tolist() == kept
        np.testing.assert_allclose(respaced.alphas_cumprod.numpy(), [abar[k] for k in kept], rtol=1e-12)
    assert torch.equal(GaussianDiffusion(timestep_respacing="1000").betas, diffusion.betas)


def test_respaced_training_sees_original_timesteps() -> None:
    respaced = GaussianDiffusion(timestep_respacing="ddim10")
    seen = []

    def model(x, timesteps):
        seen.append(timesteps)
        return torch.cat([x, torch.zeros_like(x)], 1)

    terms = respaced.training_losses(model, torch.randn(3, 1, 2, 2), torch.tensor([0, 4, 9]))
    assert seen[0].tolist() == [0, 400, 900] and terms["loss"].shape == (3,)


# ----------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------


def point_mass_oracle(target: torch.Tensor, learn_sigma: bool):
    """The exact eps predictor when all data equal `target`, on ORIGINAL timesteps of the 1000-step process."""
    abar = torch.tensor(reference_alphas_cumprod(reference_linear_betas(1000)), dtype=torch.float64)

    def model(x, t):
        a = abar[t].reshape(-1, 1, 1, 1)
        eps = (x - a.sqrt() * target) / (1 - a).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1) if learn_sigma else eps

    return model


def gaussian_oracle(mean: float, std: float):
    """The exact eps predictor E[eps | x_t] when the data are N(mean, std^2) per dimension."""
    abar = torch.tensor(reference_alphas_cumprod(reference_linear_betas(1000)), dtype=torch.float64)

    def model(x, t):
        a = abar[t].reshape(-1, 1, 1, 1)
        # x_t ~ N(sqrt(a) mean, a std^2 + 1 - a); eps and x_t are jointly Gaussian with cov sqrt(1 - a).
        return (1 - a).sqrt() * (x - a.sqrt() * mean) / (a * std**2 + 1 - a)

    return model


@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize(
    "method, steps", [("ddim", 25), ("ddim", "ddim10"), ("ddim", 7), ("ddim", 1), ("ddpm", 25), ("ddpm", 1)]
)
def test_sampling_a_point_mass_returns_the_point(learn_sigma: bool, method: str, steps) -> None:
    target = torch.tensor([0.5, -1.2, 2.0], dtype=torch.float64).reshape(1, 3, 1, 1)
    diffusion = GaussianDiffusion(learn_sigma=learn_sigma)
    noise = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    samples = diffusion.sample(point_mass_oracle(target, learn_sigma), noise, steps=steps, method=method)
    torch.testing.assert_close(samples, target.expand_as(samples), rtol=0, atol=1e-9)


def test_ddpm_samples_a_gaussian_with_the_right_mean_and_std() -> None:
    diffusion = GaussianDiffusion(learn_sigma=False)
    noise = torch.randn(1000, 1, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    samples = diffusion.sample(
        gaussian_oracle(0.3, 0.5), noise, steps=100, method="ddpm", generator=torch.Generator().manual_seed(6)
    )
    assert samples.mean().item() == pytest.approx(0.3, abs=0.02)
    assert samples.std().item() == pytest.approx(0.5, rel=0.03)


def test_ddim_follows_the_exact_flow_map_of_gaussian_data() -> None:
    # For N(mean, std^2) data the probability-flow ODE maps x_T to mean + std * (standardised x_T):
    # deterministic DDIM must approach this map as the step count grows.
    mean, std = -0.4, 0.8
    abar_last = reference_alphas_cumprod(reference_linear_betas(1000))[-1]
    diffusion = GaussianDiffusion()
    noise = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    exact = mean + std * (noise - math.sqrt(abar_last) * mean) / math.sqrt(abar_last * std**2 + 1 - abar_last)

    def model(x, t):
        eps = gaussian_oracle(mean, std)(x, t)
        return torch.cat([eps, torch.zeros_like(eps)], 1)

    errors = [
        (diffusion.sample(model, noise, steps=steps, method="ddim") - exact).abs().max().item()
        for steps in (50, 250, None)
    ]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.01


def test_sampler_calls_the_model_with_original_timesteps_and_returns_noise_dtype() -> None:
    diffusion = GaussianDiffusion()
    seen = []

    def model(x, t, y):
        seen.append(t[0].item())
        assert torch.equal(y, torch.tensor([3, 4]))
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:], dtype=torch.bfloat16)

    noise = torch.randn(2, 1, 2, 2, dtype=torch.bfloat16)
    samples = diffusion.sample(model, noise, model_kwargs=dict(y=torch.tensor([3, 4])), steps=25, method="ddim")
    assert seen == list(range(960, -1, -40)) and samples.dtype == torch.bfloat16
    assert diffusion.respaced(25, "ddim") is diffusion.respaced("ddim25")
    assert diffusion.respaced(25, "ddpm").timestep_map.tolist() == [round(k * 999 / 24) for k in range(25)]


def test_ddpm_step_uses_the_learned_variance(diffusion: GaussianDiffusion) -> None:
    betas = reference_linear_betas(1000)
    abar = reference_alphas_cumprod(betas)
    x_t = torch.tensor([0.3, -0.7], dtype=torch.float64).reshape(2, 1, 1, 1)
    eps, v = torch.tensor([0.1, 0.4], dtype=torch.float64), torch.tensor([0.5, -0.25], dtype=torch.float64)
    t = torch.tensor([100, 0])
    output = torch.cat([eps.reshape(2, 1, 1, 1), v.reshape(2, 1, 1, 1)], 1)
    stepped = diffusion.ddpm_step(output, x_t, t, generator=torch.Generator().manual_seed(8))
    drawn = torch.randn(2, 1, 1, 1, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    for i, step in enumerate(t.tolist()):
        coef_x0, coef_xt, _ = reference_posterior(betas, step)
        xt = x_t[i].item()
        mean = coef_x0 * (xt - math.sqrt(1 - abar[step]) * eps[i].item()) / math.sqrt(abar[step]) + coef_xt * xt
        std = math.exp(0.5 * learned_log_variance(betas, step, v[i].item())) if step > 0 else 0.0
        assert stepped[i].item() == pytest.approx(mean + std * drawn[i].item(), rel=1e-10)


def test_ddim_step_with_eta_matches_the_ddim_update(diffusion: GaussianDiffusion) -> None:
    abar = reference_alphas_cumprod(reference_linear_betas(1000))
    x_t = torch.tensor([[[[0.9]]]], dtype=torch.float64)
    output = torch.tensor([[[[0.2]], [[0.0]]]], dtype=torch.float64)
    stepped = diffusion.ddim_step(output, x_t, torch.tensor([300]), eta=0.5, generator=torch.Generator().manual_seed(9))
    drawn = torch.randn(1, 1, 1, 1, generator=torch.Generator().manual_seed(9), dtype=torch.float64).item()
    a, a_prev = abar[300], abar[299]
    x0 = (0.9 - math.sqrt(1 - a) * 0.2) / math.sqrt(a)
    sigma = 0.5 * math.sqrt((1 - a_prev) / (1 - a)) * math.sqrt(1 - a / a_prev)
    expected = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * 0.2 + sigma * drawn
    assert stepped.item() == pytest.approx(expected, rel=1e-10)


def test_clip_denoised_clamps_the_predicted_x0(diffusion: GaussianDiffusion) -> None:
    x_t = torch.full((1, 1, 1, 1), 3.0, dtype=torch.float64)
    output = torch.zeros(1, 2, 1, 1, dtype=torch.float64)
    t = torch.tensor([10])
    assert diffusion.p_mean_variance(output, x_t, t)["pred_xstart"].item() > 1
    assert diffusion.p_mean_variance(output, x_t, t, clip_denoised=True)["pred_xstart"].item() == 1.0


def test_sampling_progress_bar_and_generator_reproducibility(capsys) -> None:
    diffusion = GaussianDiffusion()
    model = gaussian_oracle(0.0, 1.0)

    def learned(x, t):
        return torch.cat([model(x, t), torch.zeros_like(x)], 1)

    noise = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    first = diffusion.sample(learned, noise, steps=5, generator=torch.Generator().manual_seed(1), progress=True)
    second = diffusion.sample(learned, noise, steps=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, second)
    assert "5/5" in capsys.readouterr().err


def test_sample_timesteps_cover_the_process() -> None:
    diffusion = GaussianDiffusion(timestep_respacing="ddim10")
    assert isinstance(diffusion, DiffusionObjective)
    t = diffusion.sample_timesteps(2000, "cpu", generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.shape == (2000,) and set(t.tolist()) == set(range(10))


# ----------------------------------------------------------------------------
# Classifier-free guidance
# ----------------------------------------------------------------------------


def label_dependent_model(x, t, y):
    """Output 2C channels whose every channel depends on the label, so any mixing error shows."""
    scale = (y.double() + 1).reshape(-1, 1, 1, 1)
    return torch.cat([x * scale + t.reshape(-1, 1, 1, 1), x - scale], 1)


@pytest.mark.parametrize("guidance_channels", [None, 3])
def test_classifier_free_guidance_matches_a_manual_mix(guidance_channels) -> None:
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    t, y = torch.tensor([10, 20]), torch.tensor([1, 5])
    calls = []

    def model(x_in, t_in, y):
        calls.append(x_in.shape[0])
        return label_dependent_model(x_in, t_in, y)

    guided = classifier_free_guidance(model, cfg_scale=4.0, null_label=1000, guidance_channels=guidance_channels)(
        x, t, y=y
    )
    conditional = label_dependent_model(x, t, y)
    unconditional = label_dependent_model(x, t, torch.tensor([1000, 1000]))
    channels = 4 if guidance_channels is None else guidance_channels
    expected = conditional.clone()
    expected[:, :channels] = unconditional[:, :channels] + 4.0 * (conditional[:, :channels] - unconditional[:, :channels])
    assert calls == [4]
    torch.testing.assert_close(guided, expected, rtol=1e-12, atol=1e-12)


def test_classifier_free_guidance_with_scale_one_is_the_conditional_model() -> None:
    x, t, y = torch.randn(3, 2, 2, 2, dtype=torch.float64), torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2])
    guided = classifier_free_guidance(label_dependent_model, cfg_scale=1.0, null_label=10)(x, t, y=y)
    torch.testing.assert_close(guided, label_dependent_model(x, t, y))


# ----------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_timesteps=0), r"num_timesteps=0 is invalid: expected an int >= 2"),
        (dict(num_timesteps=10), r"num_timesteps=10 is too small for beta_schedule='linear'"),
        (dict(beta_schedule="quadratic"), r"beta_schedule='quadratic' is invalid: expected one of"),
        (dict(learn_sigma="yes"), r"learn_sigma='yes' is invalid: expected True or False"),
        (dict(timestep_respacing="ddim600"), r"timestep_respacing='ddim600' cannot be used: .* is impossible"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GaussianDiffusion(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="euler"), r"method='euler' is invalid: expected one of \('ddpm', 'ddim'\)"),
        (dict(method="ddim", eta=1.5), r"eta=1.5 is invalid: expected a number in \[0, 1\]"),
        (dict(method="ddpm", eta=0.5), r"eta=0.5 is only used by method='ddim'"),
        (dict(steps=0), r"steps=0 is invalid: expected an int in \[1, 1000\]"),
        (dict(steps=2.5), r"steps=2.5 is invalid: expected a positive int, a respacing string"),
        (dict(steps="ddim600", method="ddim"), r"steps='ddim600' cannot be used: .* is impossible for num_timesteps"),
        (dict(steps="fast"), r"steps='fast' cannot be used: section_counts='fast' is invalid: expected a positive int"),
    ],
)
def test_sample_rejects_bad_arguments(diffusion: GaussianDiffusion, kwargs, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        diffusion.sample(point_mass_oracle(torch.zeros(1), True), torch.randn(1, 1, 2, 2), **kwargs)


def test_bad_timesteps_and_shapes_are_rejected(diffusion: GaussianDiffusion) -> None:
    x = torch.randn(2, 4, 2, 2)
    with pytest.raises(ValueError, match=r"t of shape \(3,\) is invalid for a batch of 2"):
        diffusion.q_sample(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"t of shape \(2,\) is invalid .* integer tensor"):
        diffusion.q_sample(x, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"noise of shape \(2, 3, 2, 2\) does not match x_start"):
        diffusion.q_sample(x, torch.tensor([1, 2]), torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match=r"model output of shape \(2, 4, 2, 2\) does not fit x_t .* 8 channels"):
        diffusion.loss_terms(torch.randn(2, 4, 2, 2), x, x, torch.tensor([1, 2]), x)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(cfg_scale="4"), r"cfg_scale='4' is invalid: expected a number"),
        (dict(null_label=-1), r"null_label=-1 is invalid: expected a non-negative int"),
        (dict(guidance_channels=0), r"guidance_channels=0 is invalid: expected a positive int or None"),
    ],
)
def test_classifier_free_guidance_rejects_bad_arguments(kwargs, message: str) -> None:
    arguments = dict(cfg_scale=1.5, null_label=1000) | kwargs
    with pytest.raises(ValueError, match=message):
        classifier_free_guidance(label_dependent_model, **arguments)


def test_classifier_free_guidance_rejects_more_channels_than_the_output_has() -> None:
    guided = classifier_free_guidance(label_dependent_model, cfg_scale=1.5, null_label=9, guidance_channels=9)
    with pytest.raises(ValueError, match=r"guidance_channels=9 is invalid for a model output with 4 channels"):
        guided(torch.randn(1, 2, 2, 2), torch.tensor([1]), y=torch.tensor([0]))
