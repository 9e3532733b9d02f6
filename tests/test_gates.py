"""Gate logits: hard Gumbel-softmax with straight-through gradients, schedules, EMA and the decision."""

import itertools
import math

import pytest
import torch

from tinyfusion_pl.pruning.gates import BlockGates, gumbel_noise, linear_schedule, straight_through_gumbel


def test_gumbel_noise_has_the_gumbel_mean_and_variance():
    noise = gumbel_noise((200_000,), torch.Generator().manual_seed(0)).double()
    euler_gamma = 0.5772156649015329
    assert noise.mean().item() == pytest.approx(euler_gamma, abs=0.01)
    assert noise.var().item() == pytest.approx(math.pi**2 / 6, abs=0.02)
    assert torch.isfinite(noise).all()


def test_hard_draws_follow_softmax_of_scaled_logits_whatever_tau():
    # Gumbel-max: argmax(scaling * logits + g) ~ Categorical(softmax(scaling * logits)); tau only shapes gradients.
    scaling = 100.0
    probabilities = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    logits = (probabilities.log() / scaling).float()
    noise = gumbel_noise((40_000, 4), torch.Generator().manual_seed(1))
    for tau in (4.0, 0.1):
        hard = straight_through_gumbel(logits, noise, scaling, tau)
        frequencies = hard.double().mean(dim=0)
        assert torch.allclose(frequencies, probabilities, atol=0.01)


def test_forward_is_an_exact_one_hot_of_the_noisy_argmax():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(6, generator=generator) * 0.05
    noise = gumbel_noise((32, 6), generator)
    hard = straight_through_gumbel(logits, noise, scaling=100.0, tau=0.7)
    expected_index = (100.0 * logits.double() + noise.double()).argmax(dim=1)
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(hard.sum(dim=1), torch.ones(32))
    assert torch.equal(hard.argmax(dim=1), expected_index)


@pytest.mark.parametrize("scaling, tau", [(100.0, 4.0), (100.0, 0.5), (1.0, 1.0)])
def test_straight_through_gradient_is_the_soft_probability_gradient(scaling, tau):
    generator = torch.Generator().manual_seed(3)
    logits = (torch.randn(5, generator=generator) * 0.01).requires_grad_()
    noise = gumbel_noise((8, 5), generator)
    weights = torch.randn(8, 5, generator=generator)
    (straight_through_gumbel(logits, noise, scaling, tau) * weights).sum().backward()

    # d/dl sum_b w_b . softmax((s l + g_b) / tau) = (s / tau) sum_b p_b * (w_b - p_b . w_b), in float64
    scores = (scaling * logits.detach().double() + noise.double()) / tau
    p = torch.exp(scores - scores.logsumexp(dim=1, keepdim=True))
    w = weights.double()
    expected = (scaling / tau) * (p * (w - (p * w).sum(dim=1, keepdim=True))).sum(dim=0)
    assert torch.allclose(logits.grad.double(), expected, rtol=1e-4, atol=1e-6)


def test_linear_schedule_at_start_middle_end_and_beyond():
    assert linear_schedule((4.0, 0.1), 0.0) == 4.0
    assert linear_schedule((4.0, 0.1), 0.5) == pytest.approx(2.05)
    assert linear_schedule((4.0, 0.1), 1.0) == pytest.approx(0.1)
    assert linear_schedule((4.0, 0.1), 1.7) == pytest.approx(0.1)
    assert linear_schedule((4.0, 0.1), -0.2) == 4.0
    assert linear_schedule(100.0, 0.3) == 100.0
    assert linear_schedule((1.0, 3.0), 0.25) == pytest.approx(1.5)


def test_initial_decision_is_option_zero_with_uniform_confidence():
    gates = BlockGates([(2, 4), (1, 2), (3, 4)], init_logit=0.02)
    assert gates.option_counts == [6, 2, 4]
    assert gates.chosen_options().tolist() == [0, 0, 0]
    assert gates.kept_blocks() == [0, 1, 4, 6, 7, 8]
    assert gates.confidences(100.0) == pytest.approx([1 / 6, 1 / 2, 1 / 4])
    assert all(torch.equal(ema, logits.detach()) for ema, logits in zip(gates.ema_logits, gates.gate_logits, strict=True))


def test_sampled_masks_keep_the_drawn_option_of_every_group_per_sample():
    groups = [(2, 4), (1, 2)]
    gates = BlockGates(groups)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for logits in gates.gate_logits:
            logits.copy_(torch.randn(logits.shape, generator=generator) * 0.02)
    noise = gates.draw_noise(16, generator)
    masks = gates.sample_masks(noise, scaling=100.0, tau=1.0)
    assert masks.shape == (16, 6)
    combos = [list(itertools.combinations(range(4), 2)), list(itertools.combinations(range(2), 1))]
    for sample in range(16):
        expected = []
        for group, (_, size) in enumerate(groups):
            drawn = int((100.0 * gates.gate_logits[group].detach() + noise[group][sample]).argmax())
            expected += [1.0 if offset in combos[group][drawn] else 0.0 for offset in range(size)]
        assert masks[sample].tolist() == expected
    (masks * torch.arange(6.0)).sum().backward()
    assert all(logits.grad.abs().sum() > 0 for logits in gates.gate_logits)


def test_ema_follows_its_closed_form():
    gates = BlockGates([(1, 2)], init_logit=0.02)
    target = torch.tensor([0.5, -0.3])
    with torch.no_grad():
        gates.gate_logits[0].copy_(target)
    decay, steps = 0.9, 7
    for _ in range(steps):
        gates.update_ema(decay)
    expected = target.double() + (0.02 - target.double()) * decay**steps
    assert torch.allclose(gates.ema_logits[0].double(), expected, atol=1e-6)


def test_decision_and_confidence_come_from_the_ema_not_the_raw_logits():
    gates = BlockGates([(2, 4), (1, 2)])
    with torch.no_grad():
        gates.ema_logits[0].copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.03, 0.0]))  # option 4 keeps offsets 1, 3
        gates.ema_logits[1].copy_(torch.tensor([0.0, 0.01]))
        gates.gate_logits[0].fill_(-1.0)
    assert gates.chosen_options().tolist() == [4, 1]
    assert gates.kept_by_group() == [[1, 3], [5]]
    assert gates.kept_blocks() == [1, 3, 5]
    first = torch.tensor([0.0] * 4 + [3.0, 0.0], dtype=torch.float64)  # 100 * ema
    assert gates.confidences(100.0) == pytest.approx(
        [float(first.exp().max() / first.exp().sum()), 1 / (1 + math.exp(-1.0))], rel=1e-5
    )
