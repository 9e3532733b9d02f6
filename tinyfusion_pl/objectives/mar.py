"""Masked autoregressive generation (MAR, LTH14/mar): random orders, truncated-Gaussian mask ratios, a diffusion
head per token, and the iterative sampler whose cosine schedule unmasks a few tokens at a time.

The net is a MAR (tinyfusion_pl.models.mar): `patchify` / `unpatchify` between latents and tokens,
`class_embedding(labels, force_drop_ids)` (the learned fake latent where a label is dropped or null),
`forward_mae(tokens, mask, class_embedding)` -> z per token (encoder on the buffer and the visible tokens,
decoder with mask tokens), and the head `diffloss.net(x, t, c)` that predicts each token's eps and
learned-range variance from the token's z. The head's noise process is the project's GaussianDiffusion
(cosine schedule, 1000 steps, learned sigma), respaced for sampling.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from tinyfusion_pl.objectives.base import Denoiser, DiffusionObjective, mix_guided_halves
from tinyfusion_pl.objectives.gaussian_diffusion import BETA_SCHEDULES, GaussianDiffusion

# The mask ratio is a normal centred on 1.0 (everything masked) with std 0.25, cut to [mask_ratio_min, 1.0].
MASK_RATIO_CENTRE = 1.0
MASK_RATIO_STD = 0.25
CFG_SCHEDULES = ("linear", "constant")
# Calibration batches shift their evenly spread quantiles by this fraction of the spacing, batch after batch.
STRATIFIED_SHIFT_PER_BATCH = (math.sqrt(5.0) - 1.0) / 2.0


# --------------------------------------------------------------------------
# Orders, masks and schedules (pure functions)
# --------------------------------------------------------------------------


def _draw_uniform(shape: tuple[int, ...], device: torch.device | str, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform [0, 1) draws on `device`, from `generator` wherever it lives (a CPU generator for a GPU batch)."""
    source = device if generator is None else generator.device
    return torch.rand(shape, generator=generator, device=source).to(device)


def _draw_normal(shape: tuple[int, ...], device: torch.device | str, generator: torch.Generator | None) -> torch.Tensor:
    source = device if generator is None else generator.device
    return torch.randn(shape, generator=generator, device=source).to(device)


def _draw_steps(count: int, num_timesteps: int, device: torch.device | str,
                generator: torch.Generator | None) -> torch.Tensor:
    source = device if generator is None else generator.device
    return torch.randint(0, num_timesteps, (count,), generator=generator, device=source).to(device)


def truncated_mask_ratios(quantiles: torch.Tensor, mask_ratio_min: float = 0.7) -> torch.Tensor:
    """Mask ratios at `quantiles` in [0, 1] of N(1.0, 0.25^2) truncated to [mask_ratio_min, 1.0] (inverse CDF).

    Uniform quantiles give MAR's training distribution (scipy's truncnorm((min - 1) / 0.25, 0, 1.0, 0.25)).
    """
    quantiles = quantiles.double()
    lower = torch.special.ndtr(torch.tensor((mask_ratio_min - MASK_RATIO_CENTRE) / MASK_RATIO_STD, dtype=torch.float64))
    upper = 0.5  # the CDF at the centre, 1.0
    standard = torch.special.ndtri(lower + quantiles * (upper - lower))
    return (MASK_RATIO_CENTRE + MASK_RATIO_STD * standard).clamp(mask_ratio_min, MASK_RATIO_CENTRE).float()


def masked_token_counts(seq_len: int, mask_ratios: torch.Tensor) -> torch.Tensor:
    """The number of masked tokens (N,) long for each ratio: ceil(seq_len * ratio), as MAR rounds it."""
    return torch.ceil(seq_len * mask_ratios.double()).long().clamp(0, seq_len)


def random_orders(
    batch_size: int, seq_len: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
) -> torch.Tensor:
    """One uniformly random generation order (a permutation of the token positions) per sample, (N, L) long."""
    return _draw_uniform((batch_size, seq_len), device, generator).argsort(dim=1)


def mask_by_order(num_masked: int | torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """Bool mask (N, L), True where masked: the first num_masked[n] positions of each order (an int for all).

    The reference's argument order (mask_by_order(mask_len, order, ...)).
    """
    ranks = orders.argsort(dim=1)  # (N, L) position -> its place in the order
    counts = torch.as_tensor(num_masked, device=orders.device).reshape(-1, 1)  # (N or 1, 1)
    return ranks < counts


def mask_schedule(seq_len: int, num_iter: int) -> list[int]:
    """MAR's mask_len at each of `num_iter` generation steps: the tokens still masked after the step.

    floor(seq_len * cos(pi/2 * (step + 1) / num_iter)), at least one token fewer than before the step and
    at least 1, as the reference computes it; its sampler predicts every remaining token at the last step
    whatever the value (1 there), which only the linear guidance schedule reads.
    """
    _check_positive_int("seq_len", seq_len)
    _check_positive_int("num_iter", num_iter)
    masked, lengths = seq_len, []
    for step in range(num_iter):
        cosine = math.floor(seq_len * math.cos(math.pi / 2.0 * (step + 1) / num_iter))
        mask_len = max(1, min(masked - 1, cosine))
        lengths.append(mask_len)
        masked = mask_len
    return lengths


def tokens_per_step(seq_len: int, num_iter: int) -> list[int]:
    """How many tokens each generation step predicts; they add up to seq_len, the last step takes the rest."""
    lengths = mask_schedule(seq_len, num_iter)
    before = [seq_len, *lengths[:-1]]
    return [previous - after for previous, after in zip(before[:-1], lengths[:-1], strict=True)] + [before[-1]]


def guidance_scale(cfg_scale: float, schedule: str, seq_len: int, mask_len: int) -> float:
    """The guidance of a step: "linear" rises 1 + (cfg - 1) * (L - mask_len) / L with the tokens generated
    (Muse's schedule, MAR's default); "constant" is cfg_scale at every step."""
    if schedule == "constant":
        return float(cfg_scale)
    if schedule == "linear":
        return 1.0 + (cfg_scale - 1.0) * (seq_len - mask_len) / seq_len
    raise ValueError(f"cfg_schedule={schedule!r} is invalid: expected one of {CFG_SCHEDULES}.")


# --------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class GuidedMAR:
    """A MAR to be sampled with classifier-free guidance at cfg_scale (MaskedAutoregressive.guided_model)."""

    net: nn.Module
    cfg_scale: float


@dataclass
class MaskedTokens:
    """One draw of everything random in a MAR training step, shared by every net that sees it.

    tokens (N, L, Dt), mask (N, L) bool (True = masked, predicted), drop (N,) bool (class -> fake latent);
    for the head, repeated diffusion_batch_mul times over the masked tokens: their targets (M, Dt), owners
    (M,) (the sample of each), steps (M,) and noise (M, Dt).
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor | None
    drop: torch.Tensor
    targets: torch.Tensor
    owners: torch.Tensor
    steps: torch.Tensor
    noise: torch.Tensor


class MaskedAutoregressive(DiffusionObjective):
    """MAR's training objective and sampler for a MAR net, with its diffusion head on GaussianDiffusion.

    Training: a random order per sample; the first ceil(L * r) tokens of the order are masked, with r, the
    objective's "time", drawn once per batch from N(1, 0.25^2) truncated to [mask_ratio_min, 1]; the class
    embedding is replaced by the fake latent with the net's label_drop_prob (training mode only); the
    head's loss (eps MSE + learned-variance VB, steps uniform over the head process) on the masked tokens
    only, each repeated net.diffusion_batch_mul times, averaged per sample. q_sample, loss_terms and
    distillation_terms act at the head's level: token latents (M, Dt) and head steps (M,).
    Sampling: MAR's generation (see `sample`).
    """

    config_name = "mar"

    def __init__(
        self,
        mask_ratio_min: float = 0.7,
        num_timesteps: int = 1000,
        beta_schedule: str = "cosine",
        learn_sigma: bool = True,
    ) -> None:
        if isinstance(mask_ratio_min, bool) or not isinstance(mask_ratio_min, (int, float)) \
                or not 0.0 <= mask_ratio_min < MASK_RATIO_CENTRE:
            raise ValueError(f"mask_ratio_min={mask_ratio_min!r} is invalid: expected a number in [0, 1) "
                             "(MAR uses 0.7).")
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule={beta_schedule!r} is invalid: expected one of {BETA_SCHEDULES} "
                             "(MAR's head uses 'cosine').")
        self.mask_ratio_min = float(mask_ratio_min)
        self.diffusion = GaussianDiffusion(num_timesteps, beta_schedule, learn_sigma)

    def __repr__(self) -> str:
        return (f"MaskedAutoregressive(mask_ratio_min={self.mask_ratio_min}, "
                f"head={self.diffusion!r})")

    # ---------------------------------------------------------------- time: the mask ratio

    def sample_timesteps(
        self, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """One mask ratio for the whole batch, as MAR draws it, repeated per sample: float32 (N,)."""
        ratio = truncated_mask_ratios(_draw_uniform((1,), device, generator), self.mask_ratio_min)
        return ratio.to(device).expand(batch_size).clone()

    def stratified_timesteps(self, batch_size: int, batch_index: int, device: torch.device | str) -> torch.Tensor:
        """Mask ratios at evenly spread quantiles of the training distribution, shifted per batch: float32 (N,)."""
        offset = (0.5 + STRATIFIED_SHIFT_PER_BATCH * batch_index) % 1.0
        quantiles = (torch.arange(batch_size, dtype=torch.float64) + offset) / batch_size
        return truncated_mask_ratios(quantiles, self.mask_ratio_min).to(device)

    # ---------------------------------------------------------------- the head's diffusion

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The head's noisy token latents (M, Dt) at head steps t (M,)."""
        return self.diffusion.q_sample(x_start, t, noise)

    def loss_terms(
        self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
        noise: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """The head's per-token (M,) loss ("loss" = "mse" + "vb") for its output (M, 2 Dt)."""
        return self.diffusion.loss_terms(model_output, x_start, x_t, t, noise)

    def distillation_terms(
        self, student_output: torch.Tensor, teacher_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-token (M,) KD between two heads' outputs on the same noisy tokens and steps (eps MSE + variance KL)."""
        return self.diffusion.distillation_terms(student_output, teacher_output, x_t, t)

    # ---------------------------------------------------------------- one training draw

    def draw(
        self,
        net: nn.Module,
        x_start: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        model_kwargs: dict[str, Any] | None = None,
        generator: torch.Generator | None = None,
        share: tuple[int, int] = (1, 0),
    ) -> MaskedTokens:
        """Orders, masks, label drops, head steps and head noise for latents x_start (N, C, H, W) at ratios t (N,).

        `noise` (N, C, H, W), when given, is the head noise of the first of the diffusion_batch_mul repeats
        (token by token after patchify); everything else comes from `generator`. With share = (replicas, rank)
        the orders, steps and head noise are drawn for the global batch of replicas * N samples (one mask ratio,
        so every sample has as many masked tokens) and this rank's rows taken: rank, rank + replicas, ...
        """
        _check_mar(net)
        tokens = net.patchify(x_start)  # (N, L, Dt)
        batch_size, seq_len, _ = tokens.shape
        device = tokens.device
        if not isinstance(t, torch.Tensor) or t.shape != (batch_size,) or not t.is_floating_point():
            raise ValueError(f"t must be the mask ratios, a float tensor of shape ({batch_size},), e.g. "
                             f"objective.sample_timesteps({batch_size}, device); got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}.")
        replicas, rank = share
        orders = random_orders(batch_size * replicas, seq_len, device, generator)[rank::replicas]
        counts = masked_token_counts(seq_len, t.to(device))
        mask = mask_by_order(counts, orders)  # (N, L)
        labels, drop = self._labels_and_drops(net, model_kwargs or {}, batch_size, device, generator)
        repeats = int(net.diffusion_batch_mul)
        owners = mask.nonzero(as_tuple=True)[0].repeat(repeats)  # (M,)
        targets = tokens[mask].repeat(repeats, 1)  # (M, Dt): repeat-major, then sample, then token
        steps = _draw_steps(len(targets) * replicas, self.diffusion.num_timesteps, device, generator)  # (M,)
        head_noise = _draw_normal((len(targets) * replicas, targets.shape[1]), device, generator).to(targets.dtype)
        if replicas > 1:  # the global batch's draws: take this rank's samples' tokens
            if not bool((counts == counts.flatten()[0]).all()):
                raise ValueError("data-parallel MAR draws need one mask ratio per batch (objective.sample_timesteps).")
            steps = steps.view(repeats, batch_size * replicas, -1)[:, rank::replicas].reshape(-1)
            head_noise = head_noise.view(repeats, batch_size * replicas, -1, targets.shape[1])[:, rank::replicas]
            head_noise = head_noise.reshape(targets.shape)
        if noise is not None:
            if noise.shape != x_start.shape:
                raise ValueError(f"noise of shape {tuple(noise.shape)} does not match x_start of shape "
                                 f"{tuple(x_start.shape)}.")
            first = int(mask.sum())
            head_noise[:first] = net.patchify(noise)[mask].to(targets.dtype)
        return MaskedTokens(tokens, mask, labels, drop, targets, owners, steps, head_noise)

    def _labels_and_drops(
        self, net: nn.Module, model_kwargs: dict[str, Any], batch_size: int, device: torch.device,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The labels, and which samples use the fake latent: forced (force_drop_ids) or drawn in training mode."""
        labels = model_kwargs.get("y")
        forced = model_kwargs.get("force_drop_ids")
        if forced is not None:
            drop = forced.to(device).bool()
        elif net.training and float(net.label_drop_prob) > 0:
            drop = _draw_uniform((batch_size,), device, generator) < float(net.label_drop_prob)
        else:
            drop = torch.zeros(batch_size, dtype=torch.bool, device=device)
        return labels, drop

    # ---------------------------------------------------------------- running a MAR

    @staticmethod
    def class_embedding(net: nn.Module, labels: torch.Tensor | None, drop: torch.Tensor) -> torch.Tensor:
        """(N, D): the net's class embedding of `labels`, its fake latent where `drop` (N,) is True or without labels."""
        if labels is None:
            labels = torch.full(drop.shape, int(net.num_classes), dtype=torch.long, device=drop.device)
        return net.class_embedding(labels, force_drop_ids=drop.long())

    @staticmethod
    def encode(net: nn.Module, tokens: torch.Tensor, mask: torch.Tensor, class_embedding: torch.Tensor) -> torch.Tensor:
        """z (N, L, Dz) of net.forward_mae; samples with different masked counts run in groups of one count.

        The encoder sees only the visible tokens, so one call needs one count; training draws one ratio per
        batch (one call), calibration spreads ratios over a batch (one call per count).
        """
        counts = mask.sum(dim=1)
        if bool((counts == counts[0]).all()):
            return net.forward_mae(tokens, mask.to(tokens.dtype), class_embedding)
        parts, order = [], []
        for count in counts.unique():
            members = (counts == count).nonzero(as_tuple=True)[0]
            parts.append(net.forward_mae(tokens[members], mask[members].to(tokens.dtype), class_embedding[members]))
            order.append(members)
        return torch.cat(parts)[torch.cat(order).argsort()]

    def head_outputs(self, net: nn.Module, draw: MaskedTokens, x_t: torch.Tensor) -> torch.Tensor:
        """The net's head output (M, 2 Dt) on the drawn noisy tokens x_t, conditioned on its own z."""
        embedding = self.class_embedding(net, draw.labels, draw.drop)
        z = self.encode(net, draw.tokens, draw.mask, embedding)  # (N, L, Dz)
        conditions = z[draw.mask].repeat(int(net.diffusion_batch_mul), 1)  # (M, Dz)
        return net.diffloss.net(x_t, self.diffusion.model_timesteps(draw.steps), conditions)

    @staticmethod
    def per_sample(values: torch.Tensor, owners: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Average per-token values (M,) over each sample's tokens: (N,) (0 for a sample with none)."""
        totals = values.new_zeros(batch_size).index_add(0, owners, values)
        counts = values.new_zeros(batch_size).index_add(0, owners, torch.ones_like(values))
        return totals / counts.clamp(min=1)

    # ---------------------------------------------------------------- losses

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
        """Per-sample (N,) "loss" = "mse" + "vb" of the head on the masked tokens of latents x_start at mask ratios t.

        The reference averages over all masked tokens of the batch; with one ratio per batch every sample has
        as many, and the batch mean of these per-sample values is that same number.
        """
        draw = self.draw(model, x_start, t, noise, model_kwargs, generator, share)
        x_t = self.diffusion.q_sample(draw.targets, draw.steps, draw.noise)  # (M, Dt)
        output = self.head_outputs(model, draw, x_t)  # (M, 2 Dt)
        terms = self.diffusion.loss_terms(output, draw.targets, x_t, draw.steps, draw.noise)
        return {name: self.per_sample(value, draw.owners, len(x_start)) for name, value in terms.items()}

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
        """Per-sample (N,) "gt" (the student's head loss, with "mse" and "vb") and "kd" (with "kd_mse", "kd_vb").

        Both nets see the same orders, masks and label drops; both heads denoise the same noisy tokens at the
        same steps, each conditioned on its own net's z; the teacher runs without gradients. Hidden states of
        paired encoder/decoder blocks (the DistillationModule's hooks) match in shape because the masks match.
        """
        if int(student.diffusion_batch_mul) != int(teacher.diffusion_batch_mul):
            raise ValueError(f"the student repeats each token {student.diffusion_batch_mul} times in its head and the "
                             f"teacher {teacher.diffusion_batch_mul}; give both the same diffusion_batch_mul.")
        draw = self.draw(student, x_start, t, noise, model_kwargs, generator, share)
        x_t = self.diffusion.q_sample(draw.targets, draw.steps, draw.noise)  # (M, Dt)
        student_output = self.head_outputs(student, draw, x_t)  # (M, 2 Dt)
        with torch.no_grad():
            teacher_output = self.head_outputs(teacher, draw, x_t)  # (M, 2 Dt)
        ground_truth = self.diffusion.loss_terms(student_output, draw.targets, x_t, draw.steps, draw.noise)
        distilled = self.diffusion.distillation_terms(student_output, teacher_output, x_t, draw.steps)
        terms = {"gt": ground_truth["loss"], "mse": ground_truth["mse"], "vb": ground_truth["vb"], **distilled}
        return {name: self.per_sample(value, draw.owners, len(x_start)) for name, value in terms.items()}

    # ---------------------------------------------------------------- sampling

    def guided_model(
        self, net: Denoiser, cfg_scale: float, null_label: int, guidance_channels: int | None = None
    ) -> GuidedMAR:
        """The net marked for guidance at cfg_scale: `sample` guides the head's eps with the fake latent as the
        unconditional branch, along the cfg_schedule."""
        if guidance_channels is not None:
            raise ValueError(f"guidance_channels={guidance_channels!r} is not used by MAR, whose head guides its eps "
                             "(all token channels); leave it None.")
        return GuidedMAR(net, float(cfg_scale))

    def check_sampler_values(self, options: dict[str, Any]) -> None:
        """Refuse steps, head_steps, temperature, cfg_schedule or clip_denoised values `sample` cannot take."""
        steps, head_steps, temperature = options["steps"], options["head_steps"], options["temperature"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps={steps!r} is invalid: expected a positive int, the generation iterations "
                             "(MAR's num_iter, 64 for its published samples).")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature={temperature!r} is invalid: expected a number > 0 scaling the head's "
                             "sampling noise (MAR uses about 1.0).")
        if options["cfg_schedule"] not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule={options['cfg_schedule']!r} is invalid: expected one of {CFG_SCHEDULES}.")
        if not isinstance(options["clip_denoised"], bool):
            raise ValueError(f"clip_denoised={options['clip_denoised']!r} is invalid: expected true or false.")
        try:
            self.diffusion.respaced(head_steps)  # cached: sampling reuses it
        except ValueError as error:
            raise ValueError(f"head_steps: {error}") from error

    def sample(
        self,
        model: Denoiser,
        noise: torch.Tensor,
        model_kwargs: dict[str, Any] | None = None,
        steps: int = 64,
        head_steps: int | str = 100,
        temperature: float = 1.0,
        cfg_schedule: str = "linear",
        clip_denoised: bool = False,
        progress: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """MAR's generation of latents (N, C, H, W) from `noise`, without gradients, in noise's dtype.

        A random order per sample; at step s of `steps` (MAR's num_iter) the tokens still masked after it
        number mask_schedule's cosine count, and the tokens between the two counts (at least one; all the rest
        at the last step) are sampled by the head from their z with its own `head_steps` respaced DDPM steps,
        the noise of each step scaled by `temperature`. `noise` gives each token's starting noise for its head
        (patchified); orders and step noise come from `generator`. A GuidedMAR model (guided_model) guides the
        head's eps with the fake latent as the unconditional branch, at the cfg_schedule's scale for the step
        (guidance_scale). clip_denoised clamps the head's predicted x0 to [-1, 1] (off in MAR: VAE latents).
        """
        self.check_sampler_values({"steps": steps, "head_steps": head_steps, "temperature": temperature,
                                   "cfg_schedule": cfg_schedule, "clip_denoised": clip_denoised})
        net, cfg_scale = (model.net, model.cfg_scale) if isinstance(model, GuidedMAR) else (model, 1.0)
        _check_mar(net)
        seq_len = int(net.seq_len)
        if steps > seq_len:
            raise ValueError(f"steps={steps} is more generation steps than the {seq_len} tokens of this MAR, so some "
                             f"steps would predict nothing: use steps <= {seq_len}.")
        process = self.diffusion.respaced(head_steps)
        start_noise = net.patchify(noise.float())  # (N, L, Dt): each token's starting noise for its head
        batch_size = len(start_noise)
        device = start_noise.device
        labels = (model_kwargs or {}).get("y")
        keep = torch.zeros(batch_size, dtype=torch.bool, device=device)
        with torch.no_grad():
            conditional = self.class_embedding(net, None if labels is None else labels.to(device), keep)  # (N, D)
            unconditional = self.class_embedding(net, None, keep)
            orders = random_orders(batch_size, seq_len, device, generator)
            mask = torch.ones(batch_size, seq_len, dtype=torch.bool, device=device)
            tokens = torch.zeros_like(start_noise)  # (N, L, Dt)
            lengths = mask_schedule(seq_len, steps)
            for step in tqdm(range(steps), desc="MAR generation", disable=not progress):
                if cfg_scale != 1.0:
                    z = self.encode(net, torch.cat([tokens, tokens]), torch.cat([mask, mask]),
                                    torch.cat([conditional, unconditional]))  # (2N, L, Dz)
                    z_conditional, z_unconditional = z.chunk(2)
                else:
                    z_conditional = self.encode(net, tokens, mask, conditional)  # (N, L, Dz)
                    z_unconditional = None
                mask_next = mask_by_order(0 if step == steps - 1 else lengths[step], orders)
                to_predict = mask & ~mask_next  # (N, L)
                scale = guidance_scale(cfg_scale, cfg_schedule, seq_len, lengths[step])
                tokens[to_predict] = self.sample_head(
                    net.diffloss.net, process, start_noise[to_predict], z_conditional[to_predict],
                    None if z_unconditional is None else z_unconditional[to_predict], scale, temperature,
                    clip_denoised, generator,
                ).to(tokens.dtype)
                mask = mask_next
        return net.unpatchify(tokens).to(noise.dtype)

    @staticmethod
    def sample_head(
        head: Callable[..., torch.Tensor],
        process: GaussianDiffusion,
        start: torch.Tensor,
        condition: torch.Tensor,
        unconditional: torch.Tensor | None = None,
        cfg_scale: float = 1.0,
        temperature: float = 1.0,
        clip_denoised: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Token latents (K, Dt) sampled by the head from `start` noise through every step of `process` (DDPM).

        With an unconditional z the eps is guided, uncond + cfg_scale * (cond - uncond); the variance is the
        conditional branch's. The DDPM noise of each step is scaled by temperature.
        """
        x = start.float()
        count, channels = x.shape
        for index in range(process.num_timesteps - 1, -1, -1):
            t = torch.full((count,), index, device=x.device, dtype=torch.long)
            model_t = process.model_timesteps(t)
            if unconditional is None:
                output = head(x, model_t, condition)  # (K, 2 Dt)
            else:
                both = head(torch.cat([x, x]), torch.cat([model_t, model_t]), torch.cat([condition, unconditional]))
                output = mix_guided_halves(both[:count], both[count:], cfg_scale, channels, None)
            x = process.ddpm_step(output, x, t, clip_denoised, generator, temperature=temperature).float()
        return x


# --------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------

_MAR_ATTRIBUTES = ("patchify", "unpatchify", "forward_mae", "class_embedding", "diffloss", "seq_len", "num_classes",
                   "label_drop_prob", "diffusion_batch_mul")


def _check_mar(net: Any) -> None:
    missing = [name for name in _MAR_ATTRIBUTES if not hasattr(net, name)]
    if missing:
        raise TypeError(
            f"objective=mar trains and samples a MAR (tinyfusion_pl.models.mar), but got a {type(net).__name__} "
            f"without {', '.join(missing)}. Use model=mar_* with objective=mar, or another objective for this model."
        )


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid: expected a positive int.")


__all__ = [
    "GuidedMAR",
    "MaskedAutoregressive",
    "MaskedTokens",
    "guidance_scale",
    "mask_by_order",
    "mask_schedule",
    "masked_token_counts",
    "random_orders",
    "tokens_per_step",
    "truncated_mask_ratios",
]
