"""How the gates learn: the straight-through estimate (the paper's) and the score function (REINFORCE)."""

import itertools

import lightning as L
import pytest
import torch
import torch.nn as nn

from tests.conftest import quick_trainer
from tests.test_block_mask import index_loader
from tinyfusion_pl.callbacks.block_mask import DifferentiableBlockMask
from tinyfusion_pl.errors import UsageError
from tinyfusion_pl.pruning.gates import BlockGates

# ---------------------------------------------------------------------------- the estimate itself


def test_the_score_function_gradient_is_the_gradient_of_the_log_probability_of_the_draws():
    torch.manual_seed(0)
    gates = BlockGates([(2, 4), (1, 3)])
    for logits in gates.gate_logits:
        logits.data = torch.randn_like(logits) * 0.02
    choices = [torch.randint(0, count, (32,)) for count in gates.option_counts]
    advantages = torch.randn(32)
    scaling = 50.0
    # reference: autograd through mean(advantage * log softmax(scaling * logits)[pick])
    surrogate = sum((advantages * (scaling * logits).log_softmax(dim=0)[choice]).mean()
                    for logits, choice in zip(gates.gate_logits, choices, strict=True))
    expected = torch.autograd.grad(surrogate, list(gates.gate_logits))
    for got, want in zip(gates.score_function_gradients(choices, advantages, scaling), expected, strict=True):
        torch.testing.assert_close(got, want)


def test_on_average_it_is_the_gradient_of_the_expected_loss():
    # Losses fixed per option: E[loss] = sum_k p_k loss_k with p = softmax(scaling * logits), differentiated exactly.
    gates = BlockGates([(2, 4)])
    gates.gate_logits[0].data = torch.tensor([0.01, -0.005, 0.0, 0.02, -0.01, 0.004])
    option_loss = torch.tensor([0.3, 1.2, 0.7, 0.1, 0.9, 0.5])
    scaling = 100.0
    expected_loss = ((scaling * gates.gate_logits[0]).softmax(dim=0) * option_loss).sum()
    exact, = torch.autograd.grad(expected_loss, [gates.gate_logits[0]])

    generator = torch.Generator().manual_seed(0)
    estimates = []
    for _ in range(50):
        choices = gates.sample_choices(gates.draw_noise(4096, generator), scaling)
        losses = option_loss[choices[0]]
        estimates.append(gates.score_function_gradients(choices, losses - losses.mean(), scaling)[0])
    estimate = torch.stack(estimates).mean(dim=0)
    # the batch-mean baseline includes the sample itself: the estimate is (1 - 1/B) of the gradient
    torch.testing.assert_close(estimate, exact * (1 - 1 / 4096), atol=0.02 * float(exact.abs().max()), rtol=0)


def test_both_estimators_draw_the_same_masks_from_the_same_noise():
    gates = BlockGates([(2, 4), (1, 2), (3, 4)])
    for logits in gates.gate_logits:
        logits.data = torch.randn_like(logits) * 0.03
    noise = gates.draw_noise(64, torch.Generator().manual_seed(3))
    straight_through = gates.sample_masks(noise, scaling=100.0, tau=0.7)
    score_function = gates.masks_of(gates.sample_choices(noise, scaling=100.0))
    assert torch.equal(straight_through.detach(), score_function)
    assert score_function.sum(dim=1).eq(2 + 1 + 3).all()


# ---------------------------------------------------------------------------- a planted case: what each one learns

# Eight blocks, 2:4. Each block adds its own unit vector to the hidden state; a sample's loss reads the result:
# block 0 removes a loss of 2 through a steep sigmoid, so its loss gradient is ~0 whether it is kept or not;
# blocks 1-7 lower the loss linearly by their weights (the exact gradient of their mask).
LINEAR_GAIN = torch.tensor([0.0, 0.3, 0.2, 0.1, 0.6, 0.1, 0.4, 0.0])


class AddsItsDirection(nn.Module):
    def __init__(self, index):
        super().__init__()
        self.register_buffer("direction", torch.eye(8)[index])

    def forward(self, x):
        return x + self.direction


class StepOrLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(AddsItsDirection(index) for index in range(8))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def planted_sample_losses(hidden, offsets):
    """Per sample: 2 * sigmoid(-40 (h_0 - 1/2)) - gain . h, plus a per-sample offset no mask changes."""
    return 2 * torch.sigmoid(-40 * (hidden[:, 0] - 0.5)) - hidden @ LINEAR_GAIN + offsets


class PlantedLosses(L.LightningModule):
    """Reports its per-sample losses as the score function asks; trains only a harmless offset."""

    def __init__(self, publish_losses=True):
        super().__init__()
        self.net = StepOrLinear()
        self.offset = nn.Parameter(torch.zeros(()))
        self.publish_losses = publish_losses

    def training_step(self, batch, batch_idx):
        generator = torch.Generator().manual_seed(self.global_step)
        offsets = torch.rand(64, generator=generator)  # loss differences between samples that no block causes
        losses = planted_sample_losses(self.net(torch.zeros(64, 8)), offsets) + self.offset ** 2
        if self.publish_losses:
            self.sample_losses = losses.detach()
        return losses.mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)  # the gates: 1e-2, as in the embedded default


def best_kept_set():
    """The 2:4 kept-set with the lowest loss, by trying all 36."""
    def loss(kept):
        hidden = torch.zeros(1, 8)
        hidden[0, list(kept)] = 1.0
        return float(planted_sample_losses(hidden, torch.zeros(1)))
    options = list(itertools.combinations(range(4), 2))
    return min(([*first, *(4 + i for i in second)] for first in options for second in options), key=loss)


def learned_kept_set(estimator, tmp_path):
    L.seed_everything(0)
    mask = DifferentiableBlockMask("net.blocks", pattern="2:4", estimator=estimator, plot=False)
    quick_trainer(tmp_path, max_steps=150, callbacks=[mask]).fit(PlantedLosses(), train_dataloaders=index_loader(150))
    return mask.kept_blocks


def test_the_score_function_finds_the_best_kept_set_where_the_straight_through_estimate_is_misled(tmp_path):
    assert best_kept_set() == [0, 1, 4, 6]
    assert learned_kept_set("score_function", tmp_path / "score_function") == [0, 1, 4, 6]
    # the linear blocks' gradients outweigh block 0's flat one: the straight-through estimate drops block 0
    assert learned_kept_set("straight_through", tmp_path / "straight_through") == [1, 2, 4, 6]


# ---------------------------------------------------------------------------- what a user is told


@pytest.mark.parametrize("publish_losses, found", [(False, "no sample_losses attribute"),
                                                   ("once", "the previous batch's sample_losses again"),
                                                   ("wrong_shape", r"sample_losses of shape \(1,\)")])
def test_a_module_without_per_sample_losses_is_told_how_to_give_them(publish_losses, found, tmp_path):
    module = PlantedLosses(publish_losses=publish_losses is not False)
    if publish_losses == "once":
        module.publish_losses = False
        module.sample_losses = torch.zeros(64)  # set once, never updated
    if publish_losses == "wrong_shape":
        module.publish_losses = False
        module.sample_losses = torch.zeros(1)
    mask = DifferentiableBlockMask("net.blocks", pattern="2:4", estimator="score_function", plot=False)
    trainer = quick_trainer(tmp_path, max_steps=3, callbacks=[mask])
    match = (r"DifferentiableBlockMask\(estimator='score_function'\) needs the per-sample losses .* self\.sample_losses = <the \(64,\) loss of "
             rf"each sample, detached> in training_step \(found {found}\), or use estimator='straight_through'")
    with pytest.raises(UsageError, match=match):
        trainer.fit(module, train_dataloaders=index_loader(3))


def test_an_unknown_estimator_is_refused_naming_both():
    with pytest.raises(UsageError, match=r"estimator='reinforce' must be one of 'straight_through', 'score_function'"):
        DifferentiableBlockMask("net.blocks", pattern="2:4", estimator="reinforce")
