"""Distillation: masked representation loss, beta schedule and layer pairing on hand-computed tensors;
DistillationModule with a frozen teacher that sees exactly what the student sees."""

import copy
import math

import lightning as L
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from tests.conftest import quick_trainer, tiny_dit
from tinyfusion_pl.distill import (
    DistillationModule,
    FeatureCapture,
    beta_schedule,
    decision_pairing,
    layer_pairing,
    masked_feature_mse,
    reference_pairing,
    within_k_sigma,
)
from tinyfusion_pl.pruning.export import prune_blocks


def randomized_dit(depth: int, seed: int = 0, **kwargs) -> nn.Module:
    """A tiny DiT whose zero-initialised (adaLN-Zero) weights are filled, so every block does something."""
    torch.manual_seed(seed)
    net = tiny_dit(depth, **kwargs)
    with torch.no_grad():
        for parameter in net.parameters():
            if parameter.requires_grad and not parameter.any():
                parameter.normal_(std=0.05)
    return net


def digit_like_loader(count: int = 16, batch_size: int = 4) -> DataLoader:
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(count, 1, 8, 8, generator=generator) * 2 - 1
    labels = torch.randint(0, 10, (count,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=False)


def hook_count(net: nn.Module) -> int:
    return sum(len(module._forward_hooks) for module in net.modules())


# ---------------------------------------------------------------------------------------- masked FEAT


def test_k_sigma_mask_drops_a_massive_activation_per_sample():
    # Sample 0: nine zeros and one 100 -> mean 10, population std sqrt((9 * 100 + 90^2) / 10) = 30.
    # 2 sigma = 60: the zeros (distance 10) stay, the 100 (distance 90) goes; 4 sigma = 120 keeps all.
    # Sample 1 is sample 0 shifted and scaled: per-sample statistics give it the same mask.
    first = torch.tensor([0.0] * 9 + [100.0]).view(1, 10, 1)
    hidden = torch.cat([first, 5 * first - 3])  # (2, 10, 1)
    expected = torch.tensor([True] * 9 + [False]).view(1, 10, 1).expand(2, 10, 1)
    assert torch.equal(within_k_sigma(hidden, 2.0), expected)
    assert within_k_sigma(hidden, 4.0).all()
    assert not within_k_sigma(torch.ones(1, 4, 2), 2.0).any()  # sigma = 0 keeps nothing


def test_masked_mse_compares_only_positions_inside_both_masks():
    # Student: nine zeros and an outlier 100 (masked, as above). Teacher: 1 at positions 0..7, 100 at
    # position 8 and 1 at 9: the teacher's outlier sits at position 8, the student's at 9, so only
    # positions 0..7 survive both masks, each with squared difference (0 - 1)^2 = 1.
    student = torch.tensor([0.0] * 9 + [100.0]).view(1, 10, 1)
    teacher = torch.tensor([1.0] * 8 + [100.0, 1.0]).view(1, 10, 1)
    assert within_k_sigma(teacher, 2.0).flatten().tolist() == [True] * 8 + [False, True]
    assert masked_feature_mse(student, teacher, k=2.0, form="both_masks").tolist() == [1.0]
    # Unmasked: mean of 8 * 1 + (0 - 100)^2 + (100 - 1)^2 over 10 positions.
    unmasked = (8 * 1.0 + 100.0**2 + 99.0**2) / 10
    assert masked_feature_mse(student, teacher, k=None).item() == pytest.approx(unmasked)


def test_masked_mse_gradient_reaches_only_kept_student_positions():
    student = torch.tensor([0.0] * 9 + [100.0]).view(1, 10, 1).requires_grad_(True)
    teacher = torch.tensor([1.0] * 8 + [100.0, 1.0]).view(1, 10, 1).requires_grad_(True)
    masked_feature_mse(student, teacher, k=2.0, form="both_masks").sum().backward()
    # d/ds of mean over the 8 kept positions of (s - t)^2 = 2 (s - t) / 8 = -0.25 there, 0 elsewhere.
    assert student.grad.flatten().tolist() == [-0.25] * 8 + [0.0, 0.0]
    assert teacher.grad is None


def test_reference_form_masks_each_side_by_its_own_mask_and_averages_over_all_positions():
    # Each side keeps its own non-outliers; position 8 (teacher's outlier) compares s=0 with 0, position 9
    # (student's outlier) compares 0 with t=1: squared differences 1 at 0..7, 0 at 8, 1 at 9, over 10 positions.
    student = torch.tensor([0.0] * 9 + [100.0]).view(1, 10, 1).requires_grad_(True)
    teacher = torch.tensor([1.0] * 8 + [100.0, 1.0]).view(1, 10, 1)
    loss = masked_feature_mse(student, teacher, k=2.0)  # the default form is the reference code's
    assert loss.item() == pytest.approx(0.9)
    loss.sum().backward()
    # d/ds of mean_10((m_s s - m_t t)^2) = 2 m_s (m_s s - m_t t) / 10: -0.2 at 0..7, 0 at 8 (t masked), 0 at 9 (s masked)
    assert student.grad.flatten().tolist() == pytest.approx([-0.2] * 8 + [0.0, 0.0])


def reference_masked_mse(student: torch.Tensor, teacher: torch.Tensor, k: float) -> torch.Tensor:
    """The paper's formula written out: per sample, mask = |h - mean| < k * std (unbiased), mean over all."""
    def masked(hidden):
        flat = hidden.double().flatten(1)
        mean, std = flat.mean(dim=1, keepdim=True), flat.std(dim=1, keepdim=True)  # std: unbiased
        return flat * ((flat - mean).abs() < k * std)
    return ((masked(student) - masked(teacher)) ** 2).mean(dim=1)


def test_reference_form_matches_the_formula_on_random_hidden_states_with_massive_activations():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 16, 32, generator=generator)
    student[:, :, 5] += 200.0  # one massive channel in each, at different channels
    teacher[:, :, 9] -= 150.0
    expected = reference_masked_mse(student, teacher, 2.0)
    torch.testing.assert_close(masked_feature_mse(student, teacher, k=2.0).double(), expected, rtol=1e-5, atol=1e-6)
    # The two forms differ here: positions inside one mask only count in the reference form.
    assert not torch.allclose(masked_feature_mse(student, teacher, 2.0, form="both_masks").double(), expected)
    with pytest.raises(ValueError, match=r"form='both' is not one of \('reference', 'both_masks'\)"):
        masked_feature_mse(student, teacher, form="both")


def test_masked_mse_is_per_sample_and_refuses_mismatched_shapes():
    student = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))
    teacher = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1))
    per_sample = masked_feature_mse(student, teacher, k=None)
    assert per_sample.shape == (3,)
    assert torch.allclose(per_sample, ((student - teacher) ** 2).mean(dim=(1, 2)))
    with pytest.raises(ValueError, match=r"student hidden state \(3, 5, 4\) and teacher hidden state \(3, 5, 2\)"):
        masked_feature_mse(student, teacher[..., :2])
    with pytest.raises(ValueError, match=r"k=0 must be > 0"):
        masked_feature_mse(student, teacher, k=0)


def test_beta_decays_linearly_from_start_to_end_then_stays():
    values = [beta_schedule(step, 4, start=1e-2, end=0.0) for step in range(7)]
    assert values == pytest.approx([1e-2, 7.5e-3, 5e-3, 2.5e-3, 0.0, 0.0, 0.0])
    assert beta_schedule(5, 10, start=2.0, end=4.0) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="total_steps=0 must be >= 1"):
        beta_schedule(0, 0)


# ---------------------------------------------------------------------------------------- pairing


def test_decision_pairing_matches_the_state_before_the_next_kept_block():
    # Kept 0, 2, 5, 7 of 8: student block 0 (teacher 0) is compared where teacher block 2 starts, i.e. after
    # teacher block 1; student 1 (teacher 2) after teacher 4; student 2 (teacher 5) after 6; the last after 7.
    assert decision_pairing([0, 2, 5, 7], 8) == [(0, 1), (1, 4), (2, 6), (3, 7)]
    assert decision_pairing([1, 3], 4) == [(0, 2), (1, 3)]


def test_decision_pairing_compares_equal_states_when_the_dropped_blocks_are_identities():
    """With identity blocks dropped, the paired teacher state IS the student's state: the pairing is right."""
    kept = [0, 3, 4]
    teacher = randomized_dit(6).eval()
    with torch.no_grad():
        for index in set(range(6)) - set(kept):  # adaLN-Zero: zero modulation makes a block the identity
            teacher.blocks[index].adaLN_modulation[-1].weight.zero_()
            teacher.blocks[index].adaLN_modulation[-1].bias.zero_()
    student = prune_blocks(teacher, "blocks", kept).eval()
    pairs = decision_pairing(kept, 6)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 2])
    with FeatureCapture(student.blocks, [s for s, _ in pairs]) as student_states, \
            FeatureCapture(teacher.blocks, [b for _, b in pairs]) as teacher_states, torch.no_grad():
        student(x, t, y)
        teacher(x, t, y)
    for student_block, teacher_block in pairs:
        assert torch.allclose(student_states[student_block], teacher_states[teacher_block], atol=1e-6)
    assert hook_count(student) == 0 and hook_count(teacher) == 0


def test_reference_pairing_and_refusals_show_both_depths():
    assert reference_pairing(4, 8) == [(0, 1), (1, 3), (2, 5), (3, 7)]
    with pytest.raises(ValueError, match=r"pairing='reference' pairs \[\(3, 7\)\].*student depth 4, teacher depth 6"):
        reference_pairing(4, 6)
    with pytest.raises(ValueError, match=r"pairing pairs \[\(2, 1\)\] do not fit.*student depth 2, teacher depth 4"):
        layer_pairing([[0, 1], [2, 1]], student_depth=2, teacher_depth=4)
    with pytest.raises(ValueError, match=r"pairing='closest' is not one of \('decision', 'reference'\)"):
        layer_pairing("closest", 2, 4)
    with pytest.raises(ValueError, match=r"decision keeps 3 blocks but the student has 2 \(teacher depth 4\)"):
        layer_pairing("decision", 2, 4, kept_blocks=[0, 1, 2])
    with pytest.raises(ValueError, match=r"pruned, but the teacher has 4 blocks \(student depth 2\)"):
        layer_pairing("decision", 2, 4, kept_blocks=[0, 5], pruned_depth=8)
    with pytest.raises(ValueError, match="needs the kept_blocks"):
        layer_pairing("decision", 2, 4)
    with pytest.raises(ValueError, match=r"student depth 2, teacher depth 4"):
        decision_pairing([0, 4], 4)


# ---------------------------------------------------------------------------------------- module


def distillation_pair(student_depth: int = 2, teacher_depth: int = 4, **kwargs):
    teacher = randomized_dit(teacher_depth, **kwargs)
    student = prune_blocks(teacher, "blocks", list(range(0, teacher_depth, teacher_depth // student_depth)))
    return student, teacher


def test_teacher_gets_no_gradient_no_optimizer_state_and_never_changes(tmp_path):
    student, teacher = distillation_pair()
    before = copy.deepcopy(teacher.state_dict())
    student_before = copy.deepcopy(student.state_dict())
    module = DistillationModule(student, teacher, feature_pairs=decision_pairing([0, 2], 4), lr=1e-3, ema_decay=0.9)
    trainer = quick_trainer(tmp_path, max_steps=3)
    trainer.fit(module, train_dataloaders=digit_like_loader())
    assert all(torch.equal(before[name], value) for name, value in teacher.state_dict().items())
    assert all(parameter.grad is None and not parameter.requires_grad for parameter in teacher.parameters())
    assert not teacher.training
    assert any(not torch.equal(student_before[name], value) for name, value in student.state_dict().items())
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in student.parameters() if p.requires_grad}
    assert {key.split(".")[0] for key in module.state_dict()} == {"net", "ema"}
    assert "teacher" not in module.hparams
    assert hook_count(student) == 0 and hook_count(teacher) == 0


def test_teacher_sees_the_same_noisy_input_timesteps_and_label_drops(tmp_path):
    student, teacher = distillation_pair(class_dropout_prob=0.5)
    seen = {"student": [], "teacher": []}

    def recorder(name):
        def record(module, args, kwargs, output):
            seen[name].append(args)
        return record

    # The patch embedding sees x_t, the timestep MLP the timestep features, the label table the labels after drops.
    for name, net in (("student", student), ("teacher", teacher)):
        for module in (net.x_embedder, net.t_embedder, net.y_embedder.embedding_table):
            module.register_forward_hook(recorder(name), with_kwargs=True)
    module = DistillationModule(student, teacher, lr=1e-3, ema_decay=None)
    quick_trainer(tmp_path, max_steps=4).fit(module, train_dataloaders=digit_like_loader())
    assert len(seen["student"]) == len(seen["teacher"]) == 12
    for student_args, teacher_args in zip(seen["student"], seen["teacher"], strict=True):
        assert torch.equal(student_args[0], teacher_args[0])
    labels = torch.cat([args[0] for args in seen["student"][2::3]])
    assert (labels == 10).any() and (labels < 10).any()  # with p = 0.5 over 16 labels, some are dropped


def test_an_identical_student_has_zero_kd_and_feat_and_only_the_gt_term():
    teacher = randomized_dit(2)
    student = copy.deepcopy(teacher)
    module = DistillationModule(student, teacher, feature_pairs=[(0, 0), (1, 1)], ema_decay=None)
    module.train()
    batch = next(iter(digit_like_loader()))
    terms = module.distillation_losses(batch, feature_weight=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.count_nonzero(terms["kd_mse"]) == 0 and torch.count_nonzero(terms["feat"]) == 0
    assert torch.allclose(terms["kd_vb"], torch.zeros(4), atol=1e-6)
    assert torch.allclose(terms["loss"], 0.1 * terms["gt"], atol=1e-6)
    assert (terms["gt"] > 0).all()


def test_feature_weight_follows_the_linear_schedule_during_fit(tmp_path):
    student, teacher = distillation_pair()
    betas = []

    class RecordBeta(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            betas.append(pl_module.current_feature_weight())

    module = DistillationModule(student, teacher, feature_pairs=[(0, 1), (1, 3)], feature_weight=(0.04, 0.0),
                                ema_decay=None)
    quick_trainer(tmp_path, max_steps=4, callbacks=[RecordBeta()]).fit(module, train_dataloaders=digit_like_loader())
    assert betas == pytest.approx([0.04, 0.03, 0.02, 0.01])


def test_non_finite_steps_are_skipped_counted_and_logged(tmp_path):
    student, teacher = distillation_pair()
    with torch.no_grad():
        teacher.final_layer.linear.bias.fill_(math.nan)  # the teacher's output, hence KD, is NaN
    student_before = copy.deepcopy(student.state_dict())
    module = DistillationModule(student, teacher, lr=1e-2, ema_decay=None, max_nonfinite_fraction=1.0)
    trainer = quick_trainer(tmp_path, max_steps=3)
    trainer.fit(module, train_dataloaders=digit_like_loader())
    assert module.nonfinite_steps == 3
    assert trainer.callback_metrics["train/nonfinite_steps"].item() == 3.0
    assert all(torch.equal(student_before[name], value) for name, value in student.state_dict().items())


def test_feature_capture_removes_its_hooks_even_when_the_forward_fails():
    net = randomized_dit(2)

    def explode(module, args, output):
        raise RuntimeError("boom")

    net.blocks[1].register_forward_hook(explode)
    with pytest.raises(RuntimeError, match="boom"), FeatureCapture(net.blocks, [0, 1]):
        net(torch.randn(1, 1, 8, 8), torch.tensor([1]), torch.tensor([0]))
    assert [len(block._forward_hooks) for block in net.blocks] == [0, 1]


def test_constructor_rejects_bad_arguments_naming_them():
    student, teacher = distillation_pair()
    with pytest.raises(TypeError, match="teacher is a str; pass the teacher network"):
        DistillationModule(student, "teacher.pt")
    with pytest.raises(ValueError, match=r"kd_weight=-1 must be a number >= 0.*sigma_k=0 must be > 0"):
        DistillationModule(student, teacher, kd_weight=-1, sigma_k=0)
    with pytest.raises(ValueError, match=r"feature_weight=0.01 must be \[start, end\]"):
        DistillationModule(student, teacher, feature_weight=0.01)
    with pytest.raises(ValueError, match="kd_weight=0 and gt_weight=0 leave nothing to train on"):
        DistillationModule(student, teacher, kd_weight=0, gt_weight=0)
    with pytest.raises(ValueError, match=r"feature_pairs pairs \[\(0, 4\)\] do not fit.*student depth 2, teacher depth 4"):
        DistillationModule(student, teacher, feature_pairs=[(0, 4)])

    class NoKD:
        num_timesteps = 1000

    with pytest.raises(ValueError, match="objective NoKD lacks q_sample, model_timesteps, loss_terms, distillation_terms, distillation_losses"):
        DistillationModule(student, teacher, objective=NoKD())
