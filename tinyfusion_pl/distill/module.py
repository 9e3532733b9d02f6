"""DistillationModule: recovery fine-tuning of a pruned student from a frozen teacher (KD and masked KD)."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any

import torch
import torch.nn as nn

from tinyfusion_pl.distill.losses import (
    FEATURE_LOSS_FORMS,
    Pair,
    beta_schedule,
    check_pairs,
    masked_feature_mse,
)
from tinyfusion_pl.errors import UsageError
from tinyfusion_pl.families import BlockStreams
from tinyfusion_pl.module import DiffusionModule
from tinyfusion_pl.objectives import DiffusionObjective, split_batch
from tinyfusion_pl.pruning.block_hooks import BlockCall, StreamsArgument, sequence_streams
from tinyfusion_pl.pruning.containers import BlockPaths, resolve_block_sequence

# What the module asks of its objective: every DiffusionObjective has them.
_OBJECTIVE_METHODS = ("q_sample", "model_timesteps", "loss_terms", "distillation_terms", "distillation_losses")


class FrozenTeacher:
    """A teacher net that never trains: eval mode, no gradients, and not a submodule of anything.

    Not being an nn.Module keeps it out of the LightningModule's parameters (no optimizer state), out of
    its checkpoints, and out of `train()` calls that would switch it back to training mode.
    """

    def __init__(self, net: nn.Module) -> None:
        self.net = net.eval().requires_grad_(False)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> FrozenTeacher:
        self.net.to(device=device, dtype=dtype)
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.net(*args, **kwargs)


class FeatureCapture:
    """A context manager whose forward hooks record the output hidden states of some blocks; removed on exit.

    `blocks` is the sequence of blocks (global indices); `streams` describes multi-stream blocks (one
    BlockStreams for all, or one or None per block): their returned hidden state, the output position that
    carries the first input stream (`hidden_states` for SD3 and Flux), is what is recorded.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        indices: Sequence[int],
        streams: BlockStreams | Sequence[BlockStreams | None] | None = None,
    ) -> None:
        self.blocks = blocks
        self.indices = sorted(set(indices))
        per_block = [streams] * len(blocks) if streams is None or isinstance(streams, BlockStreams) else streams
        # Only the captured blocks are described: reading a block's signature costs more than its hook.
        self.calls = {index: BlockCall(blocks[index], per_block[index]) for index in self.indices}
        self.features: dict[int, torch.Tensor] = {}
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> dict[int, torch.Tensor]:
        self.features = {}
        self.handles = [self.blocks[index].register_forward_hook(self._recorder(index)) for index in self.indices]
        return self.features

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: TracebackType | None) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _recorder(self, index: int) -> Any:
        def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self.features[index] = self.calls[index].hidden_output(output)  # (N, T, D)

        return record


class DistillationModule(DiffusionModule):
    """Fine-tunes a student with loss = kd_weight * KD + gt_weight * GT (+ beta * masked FEAT) from a frozen teacher.

    Both nets see the same noisy input, time and classifier-free-guidance label drops (drawn once and passed
    to both the way the net's family says). KD is the objective's output distillation (GaussianDiffusion:
    eps MSE plus the learned-variance KL; FlowMatching: velocity MSE); FEAT is the masked representation loss
    (`feature_loss`: 'reference' or 'both_masks', see masked_feature_mse) over `feature_pairs` of
    (student block, teacher block) in the block containers `blocks` (one path or a list: global indices in the
    order listed; default: the family's), between the hidden states (for multi-stream blocks, `streams` or
    the family's: the first input stream's output), with beta
    decaying linearly from feature_weight[0] to feature_weight[1] over the run. Other keyword arguments go
    to DiffusionModule (lr, lr_schedule, ema_decay, ...).
    """

    def __init__(
        self,
        net: nn.Module,
        teacher: nn.Module,
        objective: DiffusionObjective | None = None,
        kd_weight: float = 0.9,
        gt_weight: float = 0.1,
        feature_pairs: Sequence[Sequence[int]] | None = None,
        feature_weight: Sequence[float] = (1e-2, 0.0),
        sigma_k: float | None = 2.0,
        blocks: BlockPaths | None = None,
        streams: StreamsArgument = None,
        feature_loss: str = "reference",
        skip_nonfinite_steps: bool = True,
        **module_kwargs: Any,
    ) -> None:
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher is a {type(teacher).__name__}; pass the teacher network (an nn.Module).")
        # Rebound before DiffusionModule saves the init arguments: a FrozenTeacher is never taken for a submodule.
        teacher = FrozenTeacher(teacher)
        super().__init__(net, objective=objective, skip_nonfinite_steps=skip_nonfinite_steps, **module_kwargs)
        self.save_hyperparameters(ignore=["net", "objective", "teacher", "streams"])
        self._check_arguments(kd_weight, gt_weight, feature_weight, sigma_k, feature_loss)
        self.teacher = teacher
        if blocks is None and self.family is None:
            raise UsageError(f"no model family describes {type(net).__name__}: pass blocks='<path of its block list>'.")
        # Resolved on use, not stored: a stored ModuleList would become a submodule and duplicate the weights.
        self.blocks_path = self.family.block_argument() if blocks is None else blocks
        self.streams = streams
        self.feature_pairs: list[Pair] = []
        if feature_pairs is not None:
            student_depth = len(resolve_block_sequence(self.net, self.blocks_path))
            teacher_depth = len(resolve_block_sequence(teacher.net, self.blocks_path))
            self.feature_pairs = check_pairs(feature_pairs, student_depth, teacher_depth, name="feature_pairs")
        self._total_steps = 1

    def _check_arguments(
        self, kd_weight: float, gt_weight: float, feature_weight: Sequence[float], sigma_k: float | None,
        feature_loss: str,
    ) -> None:
        problems = []
        missing = [name for name in _OBJECTIVE_METHODS if not callable(getattr(self.objective, name, None))]
        if missing:
            problems.append(
                f"objective {type(self.objective).__name__} lacks {', '.join(missing)}; distillation needs a "
                "DiffusionObjective (GaussianDiffusion, FlowMatching)"
            )
        if feature_loss not in FEATURE_LOSS_FORMS:
            problems.append(f"feature_loss={feature_loss!r} must be one of {FEATURE_LOSS_FORMS} "
                            "('reference' is the paper's code)")
        for name, value in (("kd_weight", kd_weight), ("gt_weight", gt_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                problems.append(f"{name}={value!r} must be a number >= 0")
        if not problems and kd_weight == 0 and gt_weight == 0:
            problems.append("kd_weight=0 and gt_weight=0 leave nothing to train on; the paper uses 0.9 and 0.1")
        if (
            isinstance(feature_weight, (str, bytes))
            or not isinstance(feature_weight, Sequence)
            or len(feature_weight) != 2
            or not all(isinstance(value, (int, float)) and value >= 0 for value in feature_weight)
        ):
            problems.append(
                f"feature_weight={feature_weight!r} must be [start, end], two numbers >= 0 (the paper: [1e-2, 0.0])"
            )
        if sigma_k is not None and (isinstance(sigma_k, bool) or not isinstance(sigma_k, (int, float)) or sigma_k <= 0):
            problems.append(f"sigma_k={sigma_k!r} must be > 0 (the paper uses 2), or None for unmasked FEAT")
        if problems:
            raise UsageError("invalid DistillationModule arguments: " + "; ".join(problems) + ".")

    # ------------------------------------------------------------------ losses
    def distillation_losses(
        self, batch: Any, feature_weight: float = 0.0, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Per-sample (N,) terms on one batch; "loss" = kd_weight * kd + gt_weight * gt + feature_weight * feat."""
        x, cond = split_batch(batch)
        # Student and teacher see the same label drops (in validation too, like the training loss they measure).
        t, noise, cond = self.draws(x, cond, generator, drop_labels=True)
        student_indices = [student for student, _ in self.feature_pairs]
        teacher_indices = [teacher for _, teacher in self.feature_pairs]
        with self.feature_capture(self.net, student_indices) as student_features, \
                self.feature_capture(self.teacher.net, teacher_indices) as teacher_features:
            # gt is the objective's loss; its parts (e.g. mse, vb) and the KD parts are logged beside it
            terms = self.objective.distillation_losses(self.net, self.teacher.net, x, t, noise, model_kwargs=cond,
                                                       generator=generator, share=self.batch_share())
        loss = self.hparams.kd_weight * terms["kd"] + self.hparams.gt_weight * terms["gt"]
        if self.feature_pairs:
            per_pair = [masked_feature_mse(student_features[student], teacher_features[teacher], self.hparams.sigma_k,
                                           form=self.hparams.feature_loss)
                        for student, teacher in self.feature_pairs]
            terms["feat"] = torch.stack(per_pair).mean(dim=0)  # (N,)
            loss = loss + feature_weight * terms["feat"]
        terms["loss"] = loss
        return terms

    def feature_capture(self, net: nn.Module, indices: Sequence[int]) -> FeatureCapture:
        """A FeatureCapture of the blocks at `indices` (global) of `net`'s block sequence."""
        sequence = resolve_block_sequence(net, self.blocks_path)
        return FeatureCapture(sequence.blocks, indices, sequence_streams(net, sequence, self.streams))

    def current_feature_weight(self) -> float:
        """beta at this step: linear from feature_weight[0] to feature_weight[1] over the run."""
        start, end = self.hparams.feature_weight
        return beta_schedule(self.global_step, self._total_steps, start, end)

    # ------------------------------------------------------------------ training
    def on_fit_start(self) -> None:
        super().on_fit_start()
        # The teacher is no submodule, so Lightning does not move it: follow the student's device and precision.
        self.teacher.to(self.device, dtype=next(self.net.parameters()).dtype)

    def on_train_start(self) -> None:
        self._total_steps = max(int(self.trainer.estimated_stepping_batches), 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        feature_weight = self.current_feature_weight()
        terms = self.distillation_losses(batch, feature_weight)
        loss = terms["loss"].mean()
        self.log_terms("train", terms, batch_size=len(terms["loss"]))
        if self.feature_pairs:
            self.log("train/beta", feature_weight)
        self.log_throughput(len(terms["loss"]))
        if self.hparams.skip_nonfinite_steps and self.nonfinite_on_any_rank(loss):
            return self.skip_step()
        return loss
