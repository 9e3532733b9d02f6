"""Baseline selectors on planted models whose right answer is known in closed form."""

import itertools
import math
from collections import Counter

import pytest
import torch
import torch.nn as nn

from tests.conftest import tiny_dit
from tinyfusion_pl.objectives import DiffusionObjective, GaussianDiffusion
from tinyfusion_pl.pruning.calibration import calibration_loss
from tinyfusion_pl.pruning.export import prune_blocks
from tinyfusion_pl.pruning.selectors import (
    Selection,
    bi_score,
    bk_sdm_blocks,
    block_influence,
    by_index,
    oracle,
    random_blocks,
    removal_costs,
    selection_groups,
    sensitivity,
)


class Rotation(nn.Module):
    """A block that rotates every 2-D token by a fixed angle: cos(h, block(h)) = cos(angle) for every token."""

    def __init__(self, angle: float):
        super().__init__()
        self.angle = nn.Parameter(torch.tensor(angle))

    def forward(self, x, c):
        cos, sin = torch.cos(self.angle), torch.sin(self.angle)
        return torch.stack([cos * x[..., 0] - sin * x[..., 1], sin * x[..., 0] + cos * x[..., 1]], dim=-1)


class RotationNet(nn.Module):
    """Reads an image as 2-D tokens, rotates them block by block and reads them back as the eps prediction.

    The blocks commute, so the output is the input rotated by the sum of the angles; with angles summing
    to 0 the full net predicts eps from x_t as well as a rotation can, and removing block i rotates it by
    -angle_i, which costs more the larger |angle_i| is.
    """

    def __init__(self, angles):
        super().__init__()
        self.blocks = nn.ModuleList(Rotation(angle) for angle in angles)

    def forward(self, x, t, y=None):
        tokens = x.reshape(x.shape[0], -1, 2)  # (N, T, 2)
        for block in self.blocks:
            tokens = block(tokens, None)
        return tokens.reshape(x.shape)


def image_batches(count: int = 3, batch_size: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.rand(batch_size, 1, 8, 8, generator=generator) * 2 - 1,
             {"y": torch.randint(0, 10, (batch_size,), generator=generator)}) for _ in range(count)]


def randomized_dit(depth: int, identities=(), seed: int = 0) -> nn.Module:
    """A tiny DiT with random weights everywhere; the blocks in `identities` keep adaLN-Zero, i.e. are identities."""
    torch.manual_seed(seed)
    net = tiny_dit(depth)
    with torch.no_grad():
        for parameter in net.parameters():
            if parameter.requires_grad and not parameter.any():
                parameter.normal_(std=0.05)
        for index in identities:
            net.blocks[index].adaLN_modulation[-1].weight.zero_()
            net.blocks[index].adaLN_modulation[-1].bias.zero_()
    return net


PLAIN_EPS = GaussianDiffusion(learn_sigma=False)
ANGLES = [1.2, 0.1, -0.4, 0.9, -1.5, -0.3]  # sum 0; |angle| order: 4, 0, 3, 2, 5, 1


# ---------------------------------------------------------------------------------------- block influence


def test_block_influence_of_a_rotation_is_one_minus_its_cosine():
    scores = block_influence(RotationNet(ANGLES), PLAIN_EPS, image_batches())
    assert scores.tolist() == pytest.approx([1 - math.cos(angle) for angle in ANGLES], abs=1e-6)


def test_bi_score_drops_the_blocks_closest_to_identity():
    net = RotationNet(ANGLES)
    assert bi_score(net, PLAIN_EPS, image_batches(), [(3, 6)]).kept_blocks == [0, 3, 4]
    # Within groups of 3 (2:3): the two largest turns of (1.2, 0.1, -0.4) and of (0.9, -1.5, -0.3).
    assert bi_score(net, PLAIN_EPS, image_batches(), [(2, 3), (2, 3)]).kept_blocks == [0, 2, 3, 4]


def test_bi_score_on_a_dit_drops_its_identity_blocks():
    net = randomized_dit(4, identities=(1, 2))
    selection = bi_score(net, GaussianDiffusion(), image_batches(), [(2, 4)])
    assert selection.kept_blocks == [0, 3]
    assert max(abs(selection.scores[1]), abs(selection.scores[2])) < 1e-5 < min(selection.scores[0], selection.scores[3])
    assert net.training and all(not block._forward_hooks for block in net.blocks)  # left as it was found


# ---------------------------------------------------------------------------------------- sensitivity


def test_removal_costs_equal_the_loss_of_the_physically_shallower_model():
    net, objective, batches = randomized_dit(4), GaussianDiffusion(), image_batches(count=2)
    full = calibration_loss(net, objective, batches, seed=5)
    expected = [calibration_loss(prune_blocks(net, "blocks", [k for k in range(4) if k != removed]), objective,
                                 batches, seed=5) - full for removed in range(4)]
    assert removal_costs(net, objective, batches, seed=5).tolist() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_sensitivity_drops_the_blocks_whose_removal_costs_least():
    net = RotationNet(ANGLES)
    selection = sensitivity(net, PLAIN_EPS, image_batches(), [(3, 6)])
    assert selection.kept_blocks == [0, 3, 4]
    by_cost = sorted(range(6), key=lambda block: selection.scores[block])
    assert by_cost == sorted(range(6), key=lambda block: abs(ANGLES[block]))
    assert min(selection.scores) > 0  # every removal turns the prediction away from the best one


def test_sensitivity_of_identity_blocks_in_a_dit_is_zero():
    selection = sensitivity(randomized_dit(4, identities=(0, 3)), GaussianDiffusion(), image_batches(count=1),
                            [(1, 2), (1, 2)])
    assert selection.scores[0] == selection.scores[3] == 0.0
    assert selection.kept_blocks == [1 if selection.scores[1] > 0 else 0, 2 if selection.scores[2] > 0 else 3]


# ---------------------------------------------------------------------------------------- random


def test_random_is_reproducible_from_its_seed():
    groups = [(2, 4), (2, 4)]
    assert random_blocks(8, groups, seed=3) == random_blocks(8, groups, seed=3)
    assert len({tuple(random_blocks(8, groups, seed=seed).kept_blocks) for seed in range(20)}) > 5


def test_random_keeps_every_n_of_m_subset_equally_often():
    draws = Counter(tuple(random_blocks(4, [(2, 4)], seed=seed).kept_blocks) for seed in range(3000))
    assert set(draws) == set(itertools.combinations(range(4), 2))
    chi_square = sum((count - 500) ** 2 / 500 for count in draws.values())
    assert chi_square < 20.5  # the 0.999 quantile of chi-square with 5 degrees of freedom


def test_random_keeps_exactly_n_in_every_group():
    for seed in range(50):
        kept = random_blocks(6, [(1, 2), (2, 4)], seed=seed).kept_blocks
        assert sum(block < 2 for block in kept) == 1 and sum(block >= 2 for block in kept) == 2


# ---------------------------------------------------------------------------------------- oracle and by_index


def test_oracle_default_is_the_bk_sdm_list_for_dit_xl():
    published = [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27]
    pairs = [(first, first + 1) for first in range(0, 28, 2)]
    rule = [first for first, _ in pairs[:7]] + [last for _, last in pairs[7:]]
    assert oracle(28).kept_blocks == published == rule
    assert oracle(8).kept_blocks == [0, 2, 5, 7]
    assert oracle(8, [1, 6]).kept_blocks == [1, 6]
    with pytest.raises(ValueError, match=r"depth=6: the BK-SDM oracle .* multiple of 4.*Pass kept_blocks"):
        bk_sdm_blocks(6)


def test_by_index_keeps_the_list_sorted_and_scores_it():
    selection = by_index(6, [4, 1, 2])
    assert selection.kept_blocks == [1, 2, 4]
    assert selection.scores == [0.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    assert selection.as_dict()["group_kept_blocks"] == [[1, 2, 4]]


@pytest.mark.parametrize(
    ("kept_blocks", "num_keep", "error", "message"),
    [
        ([0, 8], None, ValueError,
         r"kept_blocks=\[0, 8\] holds \[8\], outside the model's 8 blocks \(valid indices: 0 to 7;"),
        ([-1, 2], None, ValueError, r"holds \[-1\], outside .*negative indices are not accepted"),
        ([1, 3, 1], None, ValueError, r"kept_blocks=\[1, 3, 1\] lists \[1\] more than once"),
        ([0, 1, 2], 4, ValueError, r"keeps 3 blocks but num_keep=4: list exactly 4 blocks"),
        ([], None, ValueError, r"kept_blocks=\[\] keeps nothing"),
        ([0, 1.5], None, TypeError, r"holds entries that are not integers. Pass kept_blocks as a list"),
        ([True, 2], None, TypeError, r"holds entries that are not integers"),
        ("0,2", None, TypeError, r"kept_blocks='0,2' is not a list of block indices"),
    ],
)
def test_by_index_refuses_bad_lists_naming_the_problem(kept_blocks, num_keep, error, message):
    with pytest.raises(error, match=message):
        by_index(8, kept_blocks, num_keep=num_keep)


# ---------------------------------------------------------------------------------------- groups


def test_selection_groups_rank_globally_unless_a_pattern_is_given():
    assert selection_groups(28, keep_ratio=0.5) == [(14, 28)]
    assert selection_groups(8, pattern="1:2") == [(1, 2)] * 4
    assert selection_groups(8, keep_ratio=0.5, group_size=4) == [(2, 4), (2, 4)]
    with pytest.raises(ValueError, match=r"keep_ratio=0.3 with all 8 blocks in one group would keep 2.4 blocks "
                                         r"per group, not a whole number.*realisable keep ratios are 0\.125, 0\.25"):
        selection_groups(8, keep_ratio=0.3)
    with pytest.raises(ValueError, match=r"No pattern given"):
        selection_groups(8)
    with pytest.raises(ValueError, match=r"keep_ratio=1.5 must be a number in \(0, 1\]"):
        selection_groups(8, keep_ratio=1.5)


def test_selection_reports_kept_blocks_per_group():
    selection = Selection(kept_blocks=[1, 2, 5], scores=[0.0] * 6, groups=[(1, 2), (2, 4)])
    assert selection.as_dict()["group_kept_blocks"] == [[1], [2, 5]]


def test_scoring_runs_the_net_under_inference_mode_with_a_progress_bar(capsys):
    net = RotationNet(ANGLES[:2])
    modes = []
    net.blocks[0].register_forward_hook(lambda module, args, output: modes.append(torch.is_inference_mode_enabled()))
    bi_score(net, PLAIN_EPS, image_batches(count=2), [(1, 2)], progress=True)
    sensitivity(net, PLAIN_EPS, image_batches(count=2), [(1, 2)], progress=True)
    assert modes and all(modes)
    progress = capsys.readouterr().err
    assert "block influence" in progress and "sensitivity" in progress


# ---------------------------------------------------------------------------------------- calibration


class ContinuousTimeObjective(DiffusionObjective):
    """A flow-matching-like objective with float times in [0, 1] that records what calibration feeds it."""

    def __init__(self):
        self.seen = []

    def sample_timesteps(self, batch_size, device, generator=None):
        return torch.rand(batch_size, device=device, generator=generator)

    def stratified_timesteps(self, batch_size, batch_index, device):
        return (torch.arange(batch_size, device=device) / batch_size + 0.1 * batch_index) % 1.0

    def q_sample(self, x_start, t, noise=None):
        return t.view(-1, 1, 1, 1) * x_start + (1 - t.view(-1, 1, 1, 1)) * noise

    def loss_terms(self, model_output, x_start, x_t, t, noise):
        self.seen.append((t.clone(), noise.clone()))
        return {"loss": ((model_output - (x_start - noise)) ** 2).mean(dim=(1, 2, 3))}

    def distillation_terms(self, student_output, teacher_output, x_t, t):
        return {"kd": ((student_output - teacher_output) ** 2).mean(dim=(1, 2, 3))}

    def sample(self, model, noise, model_kwargs=None, **sampler_options):
        raise NotImplementedError


def test_every_score_sees_the_objectives_stratified_times_and_the_same_noise():
    objective, net, batches = ContinuousTimeObjective(), RotationNet(ANGLES), image_batches(count=2)
    calibration_loss(net, objective, batches, seed=7)
    bi_score(net, objective, batches, [(3, 6)], seed=7)
    sensitivity(net, objective, batches, [(3, 6)], seed=7)
    per_batch = [objective.seen[index::2] for index in range(2)]  # every scoring pass runs batch 0 then batch 1
    assert len(objective.seen) == 2 * (1 + 1 + 1 + 6)
    for index, seen in enumerate(per_batch):
        expected_t = objective.stratified_timesteps(8, index, "cpu")
        assert all(torch.equal(t, expected_t) and t.is_floating_point() for t, _ in seen)
        assert all(torch.equal(noise, seen[0][1]) for _, noise in seen)
    assert not torch.equal(per_batch[0][0][1], per_batch[1][0][1])  # fresh noise per batch
