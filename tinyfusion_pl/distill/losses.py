"""Distillation losses of recovery fine-tuning: masked representation loss, its beta schedule, layer pairing.

The output KD itself (eps MSE and the learned-variance KL) lives with the objective
(GaussianDiffusion.distillation_terms); this file holds what is specific to hidden states.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch

from tinyfusion_pl.errors import UsageError

Pair = tuple[int, int]  # (student block, teacher block) whose output hidden states are matched

PAIRINGS = ("decision", "reference")


FEATURE_LOSS_FORMS = ("reference", "both_masks")


def within_k_sigma(hidden: torch.Tensor, k: float, unbiased: bool = False) -> torch.Tensor:
    """Bool mask of the positions with |h - mu| < k * sigma, mu and sigma per sample over all other dims.

    sigma is the population standard deviation, or the unbiased one (n - 1 in the denominator, torch.std's
    default, what the reference code uses) with unbiased=True. Massive activations (a few channels with
    huge values) fall outside the mask; a constant sample keeps nothing (sigma = 0).
    """
    values = hidden.detach().float()
    dims = tuple(range(1, values.ndim))
    # Squared deviations against k^2 * variance: the same test as |h - mu| < k sigma without abs or sqrt, and
    # mean-then-deviation is both stable and several times faster than torch.std_mean's Welford pass on CPU.
    squared_deviation = (values - values.mean(dim=dims, keepdim=True)).square_()  # (N, T, D)
    variance = squared_deviation.mean(dim=dims, keepdim=True)  # (N, 1, 1)
    if unbiased:
        count = squared_deviation[0].numel()
        variance = variance * (count / max(count - 1, 1))
    return squared_deviation < (k * k) * variance  # (N, T, D)


def masked_feature_mse(
    student: torch.Tensor, teacher: torch.Tensor, k: float | None = 2.0, form: str = "reference"
) -> torch.Tensor:
    """Per-sample (N,) masked MSE between two hidden states (N, T, D); the teacher side carries no gradient.

    form="reference" (the paper's code): each side is multiplied by its OWN k-sigma mask (unbiased std) and
    the squared difference is averaged over ALL positions, mean((m_s * h_s - m_t * h_t)^2): a position inside
    one mask only is compared with zero. form="both_masks": only positions inside both masks (population
    std) are compared, and the sum is divided by their count (a sample with none contributes 0).
    k=None compares every position in either form (plain representation KD, which diverges on DiTs).
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"student hidden state {tuple(student.shape)} and teacher hidden state {tuple(teacher.shape)} differ; "
            "paired blocks must have the same width and token count."
        )
    if k is not None and not k > 0:
        raise UsageError(f"k={k!r} must be > 0 (the paper uses 2), or None to keep every position.")
    if form not in FEATURE_LOSS_FORMS:
        raise UsageError(f"form={form!r} is not one of {FEATURE_LOSS_FORMS} ('reference' is the paper's code).")
    student_values, teacher_values = student.float(), teacher.detach().float()
    dims = tuple(range(1, student_values.ndim))
    if k is None:
        return (student_values - teacher_values).square().mean(dim=dims)
    if form == "reference":
        masked_student = student_values * within_k_sigma(student, k, unbiased=True)  # (N, T, D)
        masked_teacher = teacher_values * within_k_sigma(teacher, k, unbiased=True)  # (N, T, D)
        return (masked_student - masked_teacher).square().mean(dim=dims)
    keep = within_k_sigma(student, k) & within_k_sigma(teacher, k)  # (N, T, D)
    return ((student_values - teacher_values) * keep).square().sum(dim=dims) / keep.sum(dim=dims).clamp(min=1)


def beta_schedule(step: int, total_steps: int, start: float = 1e-2, end: float = 0.0) -> float:
    """The weight of the representation loss: linear from `start` at step 0 to `end` at `total_steps`, then `end`."""
    if total_steps < 1:
        raise UsageError(f"total_steps={total_steps} must be >= 1.")
    progress = min(max(step, 0) / total_steps, 1.0)
    return start + (end - start) * progress


# ---------------------------------------------------------------------------------------- layer pairing


def decision_pairing(
    kept_blocks: Sequence[int], teacher_depth: int, container_lengths: Sequence[int] | None = None
) -> list[Pair]:
    """Pair every student block with the teacher's hidden state at the same depth of computation.

    Student block i was teacher block k_i; its output is matched with the teacher's hidden state just
    before the next kept block k_{i+1} (the output of teacher block k_{i+1} - 1), and the last student
    block with the output of the teacher's last block. With the teacher's `container_lengths` (several
    block lists, e.g. MAR's encoder then decoder, whose hidden states differ in token count) a pair never
    leaves its container: the last kept block of a container is matched with that container's last block.
    """
    kept = sorted(int(block) for block in kept_blocks)
    if not kept or kept[0] < 0 or kept[-1] >= teacher_depth or len(set(kept)) != len(kept):
        raise UsageError(
            f"kept_blocks={list(kept_blocks)} does not describe a pruning of a teacher with {teacher_depth} blocks "
            f"(student depth {len(kept)}, teacher depth {teacher_depth}): the decision must list distinct "
            f"blocks from 0 to {teacher_depth - 1}. Use the teacher the model was pruned from, or "
            "pairing=reference / an explicit list of [student, teacher] pairs."
        )
    lengths = [teacher_depth] if container_lengths is None else [int(length) for length in container_lengths]
    if sum(lengths) != teacher_depth or any(length < 0 for length in lengths):
        raise ValueError(f"container_lengths={list(lengths)} do not add up to the teacher's {teacher_depth} blocks; "
                         "pass the teacher's block count of every container (ModelFamily.block_counts).")
    ends = [sum(lengths[: index + 1]) for index in range(len(lengths))]  # one past each container's last block

    def container_end(block: int) -> int:
        return next(end for end in ends if block < end)

    following = kept[1:] + [teacher_depth]
    return [(student, min(next_kept, container_end(block)) - 1)
            for student, (block, next_kept) in enumerate(zip(kept, following, strict=True))]


def reference_pairing(student_depth: int, teacher_depth: int) -> list[Pair]:
    """The reference code's fixed pairing: student block i with teacher block 2i + 1."""
    return check_pairs([(block, 2 * block + 1) for block in range(student_depth)], student_depth, teacher_depth,
                       name="pairing='reference'")


def check_pairs(pairs: Any, student_depth: int, teacher_depth: int, name: str = "pairing") -> list[Pair]:
    """`pairs` as a list of (student, teacher) block pairs after checking that both indices exist."""
    depths = f"(student depth {student_depth}, teacher depth {teacher_depth})"
    try:
        checked = [(operator.index(student), operator.index(teacher)) for student, teacher in pairs]
    except (TypeError, ValueError) as error:
        raise UsageError(
            f"{name}={pairs!r} is not a list of [student_block, teacher_block] integer pairs {depths}."
        ) from error
    if not checked:
        raise UsageError(f"{name}=[] pairs no blocks {depths}; give at least one [student, teacher] pair.")
    misfits = [pair for pair in checked if not (0 <= pair[0] < student_depth and 0 <= pair[1] < teacher_depth)]
    if misfits:
        raise UsageError(
            f"{name} pairs {misfits[:4]} do not fit the two models {depths}: student blocks must lie in "
            f"0..{student_depth - 1} and teacher blocks in 0..{teacher_depth - 1}. Use pairing=decision, "
            "or a teacher deep enough for the pairing."
        )
    return checked


def layer_pairing(
    pairing: str | Sequence[Sequence[int]],
    student_depth: int,
    teacher_depth: int,
    kept_blocks: Sequence[int] | None = None,
    pruned_depth: int | None = None,
    container_lengths: Sequence[int] | None = None,
) -> list[Pair]:
    """Resolve a pairing option: 'decision' (from the kept blocks), 'reference' (2i + 1) or explicit pairs.

    pruned_depth, the depth of the model the decision was made on, lets 'decision' refuse another teacher;
    container_lengths, the teacher's block lists, keeps 'decision' pairs inside one list (decision_pairing).
    """
    if isinstance(pairing, str):
        if pairing == "reference":
            return reference_pairing(student_depth, teacher_depth)
        if pairing != "decision":
            raise UsageError(
                f"pairing={pairing!r} is not one of {PAIRINGS} nor a list of [student, teacher] pairs."
            )
        if kept_blocks is None:
            raise UsageError("pairing='decision' needs the kept_blocks of the pruning decision (decision.json).")
        if len(kept_blocks) != student_depth:
            raise UsageError(
                f"pairing='decision': the decision keeps {len(kept_blocks)} blocks but the student has "
                f"{student_depth} (teacher depth {teacher_depth}). Use the decision the student was pruned with."
            )
        if pruned_depth is not None and pruned_depth != teacher_depth:
            raise UsageError(
                f"pairing='decision' maps blocks of the {pruned_depth}-block model that was pruned, but the teacher "
                f"has {teacher_depth} blocks (student depth {student_depth}). Use pairing=reference or an explicit "
                "list of [student, teacher] pairs for a teacher of another depth."
            )
        return decision_pairing(kept_blocks, teacher_depth, container_lengths)
    return check_pairs(pairing, student_depth, teacher_depth)
