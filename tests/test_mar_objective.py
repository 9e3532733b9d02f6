"""MAR's objective: mask ratios, orders and masks, the cosine generation schedule, the head's loss on masked tokens,
guidance, seeded sampling, distillation terms and the sampler's option checks."""

import copy
import math

import pytest
import torch
import torch.nn as nn

from tinyfusion_pl.distill import decision_pairing
from tinyfusion_pl.evaluation.sampling import sample_images
from tinyfusion_pl.models.mar import build_mar
from tinyfusion_pl.objectives.mar import (
    GuidedMAR,
    MaskedAutoregressive,
    guidance_scale,
    mask_by_order,
    mask_schedule,
    masked_token_counts,
    random_orders,
    tokens_per_step,
    truncated_mask_ratios,
)


def tiny_mar(**overrides):
    """MAR-Tiny cut to one encoder and one decoder block, no dropout: 16 tokens of 4 values, 10 classes.

    The head's zero-initialised output layers get small random weights, as training gives them: a zero head
    ignores z and passes no gradient back to the transformer.
    """
    torch.manual_seed(0)
    options = dict(encoder_depth=1, decoder_depth=1, diffloss_d=1, diffloss_w=32, attn_dropout=0.0, proj_dropout=0.0)
    net = build_mar("MAR-Tiny", **{**options, **overrides})
    with torch.no_grad():
        for parameter in net.diffloss.net.parameters():
            if not parameter.any():
                parameter.normal_(std=0.02)
    return net


def truncated_normal_mean(low, high, centre=1.0, std=0.25):
    """Mean of N(centre, std^2) cut to [low, high]: centre + std (phi(a) - phi(b)) / (Phi(b) - Phi(a))."""
    a, b = (low - centre) / std, (high - centre) / std
    phi = lambda value: math.exp(-value * value / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    cdf = lambda value: 0.5 * (1 + math.erf(value / math.sqrt(2)))  # noqa: E731
    return centre + std * (phi(a) - phi(b)) / (cdf(b) - cdf(a))


# ---------------------------------------------------------------- mask ratios, orders, masks


def test_mask_ratios_follow_the_truncated_gaussian():
    objective = MaskedAutoregressive(mask_ratio_min=0.7)
    generator = torch.Generator().manual_seed(0)
    batch = objective.sample_timesteps(8, "cpu", generator)
    assert batch.shape == (8,) and batch.dtype == torch.float32
    assert torch.all(batch == batch[0])  # one ratio per batch, as MAR draws it
    ratios = torch.cat([objective.sample_timesteps(1, "cpu", generator) for _ in range(4000)])
    assert ratios.min() >= 0.7 and ratios.max() <= 1.0
    expected = truncated_normal_mean(0.7, 1.0)  # 0.8726...
    assert abs(ratios.mean().item() - expected) < 4 * 0.08 / math.sqrt(4000)
    # the inverse CDF at the ends and the middle of the quantiles
    ends = truncated_mask_ratios(torch.tensor([0.0, 1.0]), 0.7)
    assert torch.allclose(ends, torch.tensor([0.7, 1.0]))
    stratified = objective.stratified_timesteps(64, 3, "cpu")
    assert torch.all(stratified[1:] > stratified[:-1]) and stratified.min() >= 0.7 and stratified.max() <= 1.0
    assert abs(stratified.mean().item() - expected) < 0.01


def test_masked_token_counts_round_up_like_mar():
    ratios = torch.tensor([0.7, 0.75, 0.999, 1.0])
    # 16 * 0.7 = 11.2 -> 12, 16 * 0.75 = 12 -> 12, 15.98 -> 16, 16 -> 16
    assert masked_token_counts(16, ratios).tolist() == [12, 12, 16, 16]


def test_orders_are_seeded_permutations_and_masks_take_their_first_tokens():
    orders = random_orders(5, 16, generator=torch.Generator().manual_seed(3))
    assert all(sorted(row.tolist()) == list(range(16)) for row in orders)
    assert torch.equal(orders, random_orders(5, 16, generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(orders, random_orders(5, 16, generator=torch.Generator().manual_seed(4)))
    mask = mask_by_order(torch.tensor([2, 3]), torch.tensor([[2, 0, 1, 3], [3, 1, 0, 2]]))
    assert mask.tolist() == [[True, False, True, False], [True, True, False, True]]
    assert mask_by_order(12, orders).sum(dim=1).tolist() == [12] * 5


# ---------------------------------------------------------------- generation schedule and guidance


def test_cosine_mask_schedule_matches_hand_computed_cases():
    # L = 16, 8 steps: floor(16 cos(pi/2 (s+1)/8)) = 15, 14, 13, 11, 8, 6, 3, then 0 -> at least 1
    assert mask_schedule(16, 8) == [15, 14, 13, 11, 8, 6, 3, 1]
    assert tokens_per_step(16, 8) == [1, 1, 1, 2, 3, 2, 3, 3]
    # L = 4, 4 steps: floor(3.70) = 3, floor(2.83) = 2, floor(1.53) = 1, the last step takes the last token
    assert mask_schedule(4, 4) == [3, 2, 1, 1] and tokens_per_step(4, 4) == [1, 1, 1, 1]
    # L = 16, 16 steps: floor(16 cos(pi/16)) = 15 at step 1 would predict nothing; one token fewer is forced
    assert mask_schedule(16, 16)[:2] == [15, 14]
    assert tokens_per_step(16, 1) == [16]


def test_every_step_predicts_a_token_and_all_tokens_are_predicted():
    for seq_len in range(1, 65):
        for num_iter in range(1, seq_len + 1):
            counts = tokens_per_step(seq_len, num_iter)
            assert len(counts) == num_iter and min(counts) >= 1 and sum(counts) == seq_len, (seq_len, num_iter)


def test_linear_guidance_rises_with_the_generated_tokens():
    assert guidance_scale(3.0, "linear", 16, 15) == pytest.approx(1 + 2 * 1 / 16)
    assert guidance_scale(3.0, "linear", 16, 1) == pytest.approx(1 + 2 * 15 / 16)
    assert guidance_scale(3.0, "constant", 16, 15) == 3.0
    assert guidance_scale(1.0, "linear", 16, 4) == 1.0


# ---------------------------------------------------------------- training loss


class ZeroHead(nn.Module):
    """A diffusion head that predicts eps = 0 and variance values 0 for every token it is given."""

    def __init__(self, channels):
        super().__init__()
        self.channels = channels
        self.seen = []

    def forward(self, x, t, c):
        self.seen.append(len(x))
        return torch.zeros(len(x), 2 * self.channels)


def test_the_loss_covers_the_masked_tokens_only():
    net = tiny_mar(diffusion_batch_mul=1).eval()
    net.diffloss.net = ZeroHead(net.token_embed_dim)
    objective = MaskedAutoregressive()
    x = torch.randn(3, 1, 8, 8)
    ratios = torch.full((3,), 0.7)  # 12 of 16 tokens masked
    # planted noise: every value of token p is p, so the eps MSE of a sample is the mean of p^2 over its masked p
    planted = net.unpatchify(torch.arange(16.0).reshape(1, 16, 1).expand(3, 16, 4))
    terms = objective.training_losses(net, x, ratios, noise=planted, model_kwargs={"y": torch.tensor([0, 1, 2])},
                                      generator=torch.Generator().manual_seed(7))
    # the objective draws the orders first from its generator
    mask = mask_by_order(12, random_orders(3, 16, generator=torch.Generator().manual_seed(7)))
    expected = torch.stack([(torch.arange(16.0)[row] ** 2).mean() for row in mask])
    assert net.diffloss.net.seen == [3 * 12]
    assert torch.allclose(terms["mse"], expected)
    # noise on the visible tokens changes nothing; noise on a masked token does
    changed = net.patchify(planted).clone()
    changed[~mask] = 100.0
    again = objective.training_losses(net, x, ratios, noise=net.unpatchify(changed),
                                      model_kwargs={"y": torch.tensor([0, 1, 2])},
                                      generator=torch.Generator().manual_seed(7))
    assert torch.equal(again["mse"], terms["mse"])
    changed[mask] = 100.0
    moved = objective.training_losses(net, x, ratios, noise=net.unpatchify(changed),
                                      model_kwargs={"y": torch.tensor([0, 1, 2])},
                                      generator=torch.Generator().manual_seed(7))
    assert torch.all(moved["mse"] > 1000)


def test_training_repeats_tokens_and_trains_every_part():
    net = tiny_mar(diffusion_batch_mul=4)
    objective = MaskedAutoregressive()
    x, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    calls = []
    net.diffloss.net.register_forward_hook(lambda module, args, output: calls.append(len(args[0])))
    terms = objective.training_losses(net, x, torch.full((4,), 0.75), model_kwargs={"y": labels},
                                      generator=torch.Generator().manual_seed(0))
    assert calls == [4 * 12 * 4] and set(terms) == {"loss", "mse", "vb"} and terms["loss"].shape == (4,)
    terms["loss"].mean().backward()
    for name in ("encoder_blocks.0.attn.qkv.weight", "decoder_blocks.0.mlp.fc2.weight", "z_proj.weight"):
        assert net.get_parameter(name).grad.abs().sum() > 0, name
    # seeded: the same generator gives the same loss, label drops and all
    first = objective.training_losses(net, x, torch.full((4,), 0.8), model_kwargs={"y": labels},
                                      generator=torch.Generator().manual_seed(1))["loss"]
    second = objective.training_losses(net, x, torch.full((4,), 0.8), model_kwargs={"y": labels},
                                       generator=torch.Generator().manual_seed(1))["loss"]
    assert torch.equal(first, second)


def test_samples_with_different_masked_counts_are_encoded_in_groups():
    net = tiny_mar().eval()
    tokens, labels = torch.randn(4, 16, 4), torch.tensor([0, 1, 2, 3])
    mask = mask_by_order(torch.tensor([12, 14, 12, 16]), random_orders(4, 16, generator=torch.Generator().manual_seed(0)))
    embedding = MaskedAutoregressive.class_embedding(net, labels, torch.zeros(4, dtype=torch.bool))
    grouped = MaskedAutoregressive.encode(net, tokens, mask, embedding)
    one_by_one = torch.cat([net.forward_mae(tokens[i:i + 1], mask[i:i + 1].float(), embedding[i:i + 1]) for i in range(4)])
    assert torch.allclose(grouped, one_by_one, atol=1e-5)
    # calibration's stratified ratios give several counts in one batch
    objective = MaskedAutoregressive()
    losses = objective.training_losses(net, torch.randn(4, 1, 8, 8), objective.stratified_timesteps(4, 0, "cpu"),
                                       model_kwargs={"y": labels}, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(losses["loss"]).all()


# ---------------------------------------------------------------- distillation


def test_distillation_of_a_copy_has_no_kd_and_the_training_loss_as_gt():
    student = tiny_mar()
    teacher = copy.deepcopy(student).eval()
    objective = MaskedAutoregressive()
    x, labels, ratios = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]), torch.full((4,), 0.8)
    noise = torch.randn_like(x)
    condition = {"y": labels, "force_drop_ids": torch.tensor([0, 1, 0, 0])}
    terms = objective.distillation_losses(student, teacher, x, ratios, noise, model_kwargs=condition,
                                          generator=torch.Generator().manual_seed(5))
    assert {"gt", "mse", "vb", "kd", "kd_mse", "kd_vb"} == set(terms)
    assert torch.allclose(terms["kd"], torch.zeros(4), atol=1e-6)
    plain = objective.training_losses(student, x, ratios, noise=noise, model_kwargs=condition,
                                      generator=torch.Generator().manual_seed(5))
    assert torch.allclose(terms["gt"], plain["loss"])
    with torch.no_grad():
        for parameter in teacher.decoder_blocks.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    moved = objective.distillation_losses(student, teacher, x, ratios, noise, model_kwargs=condition,
                                          generator=torch.Generator().manual_seed(5))
    assert torch.all(moved["kd"] > 0)
    moved["kd"].mean().backward()
    assert student.encoder_blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in teacher.parameters())


def test_decision_pairs_stay_inside_the_encoder_and_the_decoder():
    # MAR-L: 16 + 16 blocks; keeping encoder blocks 1, 3, 14 and decoder blocks 18, 20 (global indices)
    pairs = decision_pairing([1, 3, 14, 18, 20], 32, container_lengths=[16, 16])
    assert pairs == [(0, 2), (1, 13), (2, 15), (3, 19), (4, 31)]
    # without the containers the last encoder block would be matched with decoder block 17
    assert decision_pairing([1, 3, 14, 18, 20], 32)[2] == (2, 17)
    with pytest.raises(ValueError, match=r"container_lengths=\[16, 8\] do not add up to the teacher's 32 blocks"):
        decision_pairing([1, 3], 32, container_lengths=[16, 8])


# ---------------------------------------------------------------- sampling


def test_each_generation_step_samples_its_tokens_with_the_head():
    net = tiny_mar().eval()
    objective = MaskedAutoregressive()
    calls = []
    net.diffloss.net.register_forward_hook(lambda module, args, output: calls.append(len(args[0])))
    samples = objective.sample(net, torch.randn(2, 1, 8, 8), {"y": torch.tensor([3, 4])}, steps=8, head_steps=5,
                               generator=torch.Generator().manual_seed(0))
    assert samples.shape == (2, 1, 8, 8)
    expected = [2 * count for count in tokens_per_step(16, 8) for _ in range(5)]
    assert calls == expected
    calls.clear()  # with guidance the head sees each token twice (conditional and fake-latent z)
    objective.sample(objective.guided_model(net, 3.0, 10), torch.randn(2, 1, 8, 8), {"y": torch.tensor([3, 4])},
                     steps=8, head_steps=5, generator=torch.Generator().manual_seed(0))
    assert calls == [2 * size for size in expected]


def test_seeded_sampling_is_reproducible_through_sample_images():
    net = tiny_mar()
    objective = MaskedAutoregressive()
    labels = torch.tensor([0, 1, 2, 3])
    options = dict(cfg_scale=2.0, batch_size=4, progress=False, steps=4, head_steps=5)
    first = sample_images(net, objective, labels, seed=3, **options)
    assert torch.equal(first, sample_images(net, objective, labels, seed=3, **options))
    assert not torch.equal(first, sample_images(net, objective, labels, seed=4, **options))
    assert net.training  # sampling left the mode as it found it


def test_temperature_scales_the_head_steps_noise():
    process = MaskedAutoregressive().diffusion.respaced(10)
    output, x, t = torch.randn(6, 8), torch.randn(6, 4), torch.full((6,), 5)
    mean = process.p_mean_variance(output, x, t)["mean"]
    plain = process.ddpm_step(output, x, t, generator=torch.Generator().manual_seed(0))
    cooled = process.ddpm_step(output, x, t, generator=torch.Generator().manual_seed(0), temperature=0.5)
    assert torch.allclose(cooled - mean, 0.5 * (plain - mean), atol=1e-6)


@pytest.mark.parametrize("options,message", [
    ({"method": "ddim"}, r"MaskedAutoregressive has no sampler option 'method'; its options are \['steps', "
                         r"'head_steps', 'temperature', 'cfg_schedule', 'clip_denoised'\]"),
    ({"steps": 0}, r"steps=0 is invalid: expected a positive int, the generation iterations \(MAR's num_iter"),
    ({"head_steps": 2000}, r"head_steps: steps=2000 is invalid: expected an int in \[1, 1000\]"),
    ({"temperature": 0}, r"temperature=0 is invalid: expected a number > 0"),
    ({"cfg_schedule": "cosine"}, r"cfg_schedule='cosine' is invalid: expected one of \('linear', 'constant'\)"),
    ({"clip_denoised": "yes"}, r"clip_denoised='yes' is invalid: expected true or false"),
])
def test_sampler_options_are_refused_up_front(options, message):
    with pytest.raises(ValueError, match=message):
        MaskedAutoregressive().check_sampler_options(options)


def test_sampling_refuses_more_steps_than_tokens_and_guidance_channels():
    net = tiny_mar().eval()
    objective = MaskedAutoregressive()
    with pytest.raises(ValueError, match=r"steps=17 is more generation steps than the 16 tokens .* use steps <= 16"):
        objective.sample(net, torch.randn(1, 1, 8, 8), {"y": torch.tensor([0])}, steps=17)
    with pytest.raises(ValueError, match="guidance_channels=3 is not used by MAR"):
        objective.guided_model(net, 2.0, 10, guidance_channels=3)
    assert isinstance(objective.guided_model(net, 2.0, 10), GuidedMAR)
    with pytest.raises(TypeError, match=r"objective=mar trains and samples a MAR .* got a Linear without patchify"):
        objective.training_losses(nn.Linear(2, 2), torch.randn(1, 1, 8, 8), torch.ones(1))


def test_constructor_arguments_are_checked():
    with pytest.raises(ValueError, match=r"mask_ratio_min=1.0 is invalid: expected a number in \[0, 1\)"):
        MaskedAutoregressive(mask_ratio_min=1.0)
    with pytest.raises(ValueError, match=r"beta_schedule='sigmoid' is invalid"):
        MaskedAutoregressive(beta_schedule="sigmoid")
