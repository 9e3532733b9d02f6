"""DifferentiableBlockMask: learn which blocks of any transformer to keep, inside any Lightning Trainer."""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from tinyfusion_pl.distributed import data_parallel_share
from tinyfusion_pl.errors import UsageError
from tinyfusion_pl.io import save_json
from tinyfusion_pl.pruning.block_hooks import (
    BlockMask,
    BlockMaskHooks,
    StreamsArgument,
    sequence_streams,
    streams_problem,
)
from tinyfusion_pl.pruning.containers import (
    BlockPaths,
    BlockSequence,
    block_paths_problem,
    describe_paths,
    described_owners,
    resolve_block_sequence,
)
from tinyfusion_pl.pruning.dynamics import decision_dynamics_figure, save_figure_atomically
from tinyfusion_pl.pruning.gates import BlockGates, Schedule, linear_schedule
from tinyfusion_pl.pruning.patterns import BlockPattern, Group, required_blocks_problem

DYNAMICS_FILENAME = "decision_dynamics.png"
ESTIMATORS = ("straight_through", "score_function")


def _check_schedule(name: str, value: object) -> tuple[Schedule | None, str | None]:
    """A positive number or a (start, end) pair of positive numbers, else an error message."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value), None
    if (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        return (float(value[0]), float(value[1])), None
    return None, (
        f"{name}={value!r} must be a positive number (constant) or a (start, end) pair of positive numbers "
        f"annealed linearly over the run, e.g. {name}=(4.0, 0.1)."
    )


# Per-parameter-group lists that torch's schedulers zip strictly against optimizer.param_groups.
_SCHEDULER_LR_LISTS = ("base_lrs", "max_lrs", "min_lrs")
_SCHEDULER_OTHER_LISTS = ("lr_lambdas", "base_momentums", "max_momentums")


def _to_optimizer_state(value: Any, key: str, parameter: torch.Tensor, group: dict[str, Any]) -> Any:
    """A saved optimizer state entry placed as torch's Optimizer.load_state_dict places it."""
    if not torch.is_tensor(value):
        return value
    if key == "step" and not (group.get("capturable") or group.get("fused")):
        return value.clone()  # a CPU scalar unless the optimizer keeps it on the parameter's device
    return value.to(parameter.device, parameter.dtype if value.is_floating_point() else value.dtype)


def _describe_losses(losses: Any, last_taken: torch.Tensor | None) -> str:
    if losses is None:
        return "no sample_losses attribute"
    if losses is last_taken:
        return "the previous batch's sample_losses again"
    return f"sample_losses of shape {tuple(losses.shape)}" if torch.is_tensor(losses) else f"sample_losses={losses!r}"


def _extend_scheduler_to_new_group(scheduler: Any, optimizer: torch.optim.Optimizer, lr_multiplier: float) -> None:
    """Give a scheduler of `optimizer` an entry for the group just appended, modelled on the first group's."""
    for nested in getattr(scheduler, "_schedulers", ()):  # SequentialLR and ChainedScheduler step their parts
        _extend_scheduler_to_new_group(nested, optimizer, lr_multiplier)
    if getattr(scheduler, "optimizer", None) is not optimizer:
        return
    groups_before = len(optimizer.param_groups) - 1
    for name in _SCHEDULER_LR_LISTS + _SCHEDULER_OTHER_LISTS:
        values = getattr(scheduler, name, None)
        if isinstance(values, list) and len(values) == groups_before:
            values.append(values[0] * lr_multiplier if name in _SCHEDULER_LR_LISTS else values[0])


class DifferentiableBlockMask(Callback):
    """Learns, while the user's LightningModule trains, which N of every M consecutive blocks to keep.

    Every block of ``blocks`` keeps running, but its output hidden state becomes
    ``m * block(x, ...) + (1 - m) * x`` (every stream of a multi-stream block alike) with a per-sample hard 0/1 mask ``m`` drawn once per training batch by
    a hard Gumbel-softmax over the C(M, N) keep-options of its group; the gate logits learn from the loss by
    the straight-through or the score-function estimate (``estimator``). Outside training batches
    (validation, sampling, ``trainer.validate``) every block follows the current decision, so the logged
    validation metrics measure the pruned model. The decision is, per group, the option with the largest
    exponential moving average of its logit; ``kept_blocks`` holds it at any time.

    When a model family describes the module that owns the blocks and requires some of them (SD3's
    context-pre-only last block; block 0 of a diffusers DiT whose blocks hold different embedders), setup
    restricts every group to the options that keep them: the gates never draw, and the decision never
    drops, a block that ``prune_blocks`` would refuse to drop. A group that cannot keep all of its required
    blocks stops setup with a message naming them and the fix.

    The gate logits live in the callback, never in the model: they join the first optimizer that
    ``configure_optimizers`` returns as an extra parameter group, and teardown removes every hook, so the
    model's parameters, state-dict keys and ``requires_grad`` flags are never changed. Under DDP the gates
    are outside the wrapped module, so the callback all-reduces (averages) their gradients before each step;
    each rank takes its samples' rows of one Gumbel draw for the global batch (so several ranks draw what one
    process with that batch draws), and identical logits, updates and EMA give the same decision on every rank.

        mask = DifferentiableBlockMask(blocks="net.blocks", pattern="2:4")
        trainer = L.Trainer(max_steps=10_000, callbacks=[mask, CoOptimizedWeightUpdate()])  # adapts mask's blocks

    Args:
        blocks: dotted path from the LightningModule to the container of blocks (e.g. ``"net.blocks"``), or a
            list of paths whose blocks run one container after the other (Flux:
            ``["net.transformer_blocks", "net.single_transformer_blocks"]``). Their blocks form one sequence:
            patterns, groups and ``kept_blocks`` use global indices in the order listed.
        pattern: ``"N:M"`` for equal consecutive groups, or a list of ``[N, M]`` groups whose M cover the depth.
        keep_ratio: instead of ``pattern``, the kept fraction of blocks; with ``group_size`` the M of the groups,
            without it the smallest group size that realises the ratio on this depth.
        group_size: the M used with ``keep_ratio``.
        scaling: factor on the logits before the Gumbel-softmax; a number, or (start, end) annealed linearly.
        tau: Gumbel-softmax temperature; a number, or (start, end) annealed linearly from the first to the
            last step of the run.
        init_logit: initial value of every logit (equal values: every option equally likely).
        lr_multiplier: the gate logits get their own parameter group in the first optimizer, at this multiple
            of the current learning rate of its first parameter group (re-applied before every step, so the
            gates follow the user's schedule), with weight decay 0.
        ema_decay: decay of the moving average of the logits that makes the decision.
        hidden_state: positional index or keyword name of the hidden-state argument of a block's forward.
            The batch must be its first dimension, and blocks must not modify it in place.
        streams: for blocks that take and return several streams, a ``BlockStreams`` naming the stream
            arguments and the stream each returned position carries (or a list with one per container); a
            dropped block passes every stream through. None: the streams the model family of the module that
            owns the blocks gives (SD3, Flux), else one hidden state (``hidden_state``).
        total_steps: optimizer steps the schedules span; default ``trainer.estimated_stepping_batches``.
        seed: seed of the Gumbel noise; default ``torch.initial_seed()`` (the one ``L.seed_everything`` set).
            Each draw is seeded from (seed, draw count), so a resumed run draws the same noise.
        plot: at the end of fit, write ``decision_dynamics.png`` in the run folder and log it as an image.
        log_every_n_steps: steps between logged metrics and decision-history records; default the Trainer's.
        estimator: how the gates learn from the loss. ``"straight_through"`` (the paper's): the gradient of the
            loss through the soft probabilities, a first-order estimate of what adding or removing a block
            does, which can misjudge blocks whose effect on the loss is far from linear in their mask.
            ``"score_function"``: REINFORCE, unbiased for the expected loss of the drawn keep-options: every
            sample's loss minus the batch mean, times the gradient of the log-probability of its draw. It needs
            the LightningModule to set ``self.sample_losses`` to the (B,) per-sample losses of every training
            batch (DiffusionModule does); tau does not act under it (the draws do not depend on it).
    """

    def __init__(
        self,
        blocks: BlockPaths,
        pattern: str | Sequence[Sequence[int]] | None = None,
        keep_ratio: float | None = None,
        group_size: int | None = None,
        scaling: Schedule = 100.0,
        tau: Schedule = (4.0, 0.1),
        init_logit: float = 0.02,
        lr_multiplier: float = 10.0,
        ema_decay: float = 0.999,
        hidden_state: int | str = 0,
        streams: StreamsArgument = None,
        total_steps: int | None = None,
        seed: int | None = None,
        plot: bool = True,
        log_every_n_steps: int | None = None,
        estimator: str = "straight_through",
    ) -> None:
        super().__init__()
        errors = []
        paths_problem = block_paths_problem(blocks)
        errors += [paths_problem + "."] if paths_problem else []
        try:
            self.pattern = BlockPattern.parse(pattern, keep_ratio, group_size)
        except ValueError as error:
            errors.append(str(error))
        self.scaling, message = _check_schedule("scaling", scaling)
        errors += [message] if message else []
        self.tau, message = _check_schedule("tau", tau)
        errors += [message] if message else []
        if isinstance(init_logit, bool) or not isinstance(init_logit, (int, float)) or not math.isfinite(init_logit):
            errors.append(f"init_logit={init_logit!r} must be a finite number (the paper uses 0.02).")
        if isinstance(lr_multiplier, bool) or not isinstance(lr_multiplier, (int, float)) or lr_multiplier <= 0:
            errors.append(f"lr_multiplier={lr_multiplier!r} must be a positive number (the paper uses 10.0).")
        if isinstance(ema_decay, bool) or not isinstance(ema_decay, (int, float)) or not 0 <= ema_decay < 1:
            errors.append(f"ema_decay={ema_decay!r} must be in [0, 1) (the paper uses 0.999; 0 disables the EMA).")
        if isinstance(hidden_state, bool) or not (
            (isinstance(hidden_state, int) and hidden_state >= 0) or (isinstance(hidden_state, str) and hidden_state)
        ):
            errors.append(
                f"hidden_state={hidden_state!r} must be the positional index (>= 0) or the keyword name of the "
                "hidden-state argument of a block's forward, e.g. 0 or 'x'."
            )
        container_count = 1 if paths_problem or isinstance(blocks, str) else len(blocks)
        message = streams_problem(streams, container_count)
        errors += [message + "."] if message else []
        if streams is not None and hidden_state != 0:
            errors.append(
                f"hidden_state={hidden_state!r} and streams were both given; with streams, the first input stream "
                "is the hidden state: drop hidden_state."
            )
        for name, value in (("total_steps", total_steps), ("log_every_n_steps", log_every_n_steps)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                errors.append(f"{name}={value!r} must be a positive integer or None (None: taken from the Trainer).")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            errors.append(f"seed={seed!r} must be a non-negative integer or None (None: torch.initial_seed()).")
        if estimator not in ESTIMATORS:
            errors.append(f"estimator={estimator!r} must be one of {', '.join(map(repr, ESTIMATORS))}.")
        if errors:
            raise UsageError("DifferentiableBlockMask: " + "\n".join(errors))

        self.blocks = blocks if isinstance(blocks, str) else list(blocks)
        self.streams = streams
        self.init_logit = float(init_logit)
        self.lr_multiplier = float(lr_multiplier)
        self.ema_decay = float(ema_decay)
        self.hidden_state = hidden_state
        self.total_steps = total_steps
        self.plot = plot
        self.log_every_n_steps = log_every_n_steps
        self.estimator = estimator
        self.gates: BlockGates | None = None
        fixed = self.pattern.fixed_groups
        if fixed is not None:
            self.gates = BlockGates(fixed, self.init_logit)
        self._seed = seed
        self._share = (1, 0)  # (replicas, rank)
        self._draws = 0
        self._progress = 0.0
        self._decision_changes: int | torch.Tensor = 0
        self._step_at_batch_start = 0
        self._history: list[dict[str, Any]] = []
        self._previous_choice: torch.Tensor | None = None
        self._hooks: BlockMaskHooks | None = None
        self._pending_state: dict[str, Any] | None = None
        self._optimizer: torch.optim.Optimizer | None = None  # the one holding the gate group
        self._pending_optimizer_state: list[dict[str, Any]] | None = None
        self._sampling = False
        self._sample: torch.Tensor | None = None
        self._choices: list[torch.Tensor] | None = None  # score_function: this batch's per-group picks (B,)
        self._scored_losses: torch.Tensor | None = None  # the module's last per-sample losses taken
        self._kept_mask: list[bool] | None = None
        self._run_steps: int | None = None
        self._record_every = 1
        self._container_starts: list[int] = []
        self._required_blocks: tuple[int, ...] | None = None  # known from setup on

    # ------------------------------------------------------------------ public read-outs

    @property
    def state_key(self) -> str:
        return self._generate_state_key(blocks=self.blocks, pattern=self.pattern.describe())

    @property
    def groups(self) -> list[Group]:
        """The [N, M] groups in block order (known at construction for an explicit list, else after setup)."""
        return list(self._ready_gates().groups)

    @property
    def kept_blocks(self) -> list[int]:
        """Sorted global indices of the blocks the current decision keeps."""
        return self._ready_gates().kept_blocks()

    @property
    def chosen_options(self) -> list[int]:
        """Per group, the index of the decided option among its C(M, N) options (lexicographic)."""
        return self._ready_gates().chosen_options().tolist()

    @property
    def confidences(self) -> list[float]:
        """Per group, the probability that a hard Gumbel draw at the current scaling picks the decided option."""
        return self._ready_gates().confidences(self.current_scaling)

    @property
    def current_tau(self) -> float:
        """The temperature at the current point of the run."""
        return linear_schedule(self.tau, self._progress)

    @property
    def current_scaling(self) -> float:
        """The logit scaling at the current point of the run."""
        return linear_schedule(self.scaling, self._progress)

    def decision(self) -> dict[str, Any]:
        """The current decision and its history as a JSON-able dict."""
        gates = self._ready_gates()
        chosen = gates.chosen_options().tolist()
        return {
            "blocks": self.blocks,
            "depth": gates.depth,
            "pattern": self.pattern.describe(),
            "groups": [list(group) for group in gates.groups],
            "kept_blocks": gates.kept_blocks(),
            "required_blocks": list(gates.required_blocks),
            "group_kept_blocks": gates.kept_by_group(chosen),
            "chosen_options": chosen,
            "confidences": gates.confidences(self.current_scaling),
            "scaling": self.current_scaling,
            "history": copy.deepcopy(self._history),
        }

    def save_decision(self, path: str | os.PathLike) -> Path:
        """Write `decision()` as JSON at `path`, atomically."""
        return save_json(self.decision(), path)

    def plot_dynamics(self, path: str | os.PathLike) -> Path:
        """Write the decision-dynamics PNG (kept blocks per group against the step) at `path`, atomically."""
        figure = decision_dynamics_figure(self._history, self.groups, container_starts=self._container_starts)
        return save_figure_atomically(figure, path)

    def _ready_gates(self) -> BlockGates:
        if self.gates is None:
            raise RuntimeError(
                f"DifferentiableBlockMask(pattern={self.pattern.describe()!r}) does not know the depth of "
                f"{describe_paths(self.blocks)} yet: the decision exists once trainer.fit (or validate) has run setup. "
                "Pass pattern as an explicit list of [N, M] groups to have it from construction."
            )
        return self.gates

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        sequence = resolve_block_sequence(pl_module, self.blocks)
        groups = self.pattern.groups_for_depth(len(sequence))
        required = self._family_required_blocks(pl_module, sequence, groups)
        if self.gates is None:
            self.gates = BlockGates(groups, self.init_logit, required)
        if self._pending_state is not None:
            self._apply_state(self._pending_state)
            self._pending_state = None
        if self.gates.required_blocks != required:  # gates built at construction, or a state from another model
            self.gates = self.gates.with_required_blocks(required)
            self._kept_mask = None
        self._required_blocks = required
        if self._seed is None:
            self._seed = torch.initial_seed()
        # This process's place among the data-parallel ranks: masks are drawn for the global batch, rows taken
        # like the module's noise (DiffusionModule.draws), so ranks draw what one process with that batch draws.
        self._share = data_parallel_share(trainer)
        self._remove_hooks()
        self._hooks = BlockMaskHooks(sequence.blocks, self._mask_for_block, self.hidden_state,
                                     streams=sequence_streams(pl_module, sequence, self.streams))
        self._container_starts = sequence.starts

    def _family_required_blocks(
        self, root: nn.Module, sequence: BlockSequence, groups: list[Group]
    ) -> tuple[int, ...]:
        """The blocks the families of the modules owning the containers require, or raise if the groups cannot keep them."""
        required: set[int] = set()
        families = []
        for owner in described_owners(root, sequence.paths):
            blocks = owner.required_blocks(root, sequence)
            if blocks:
                required.update(blocks)
                families.append(f"the {owner.family.class_name} family (of '{owner.path or type(root).__name__}')")
        problem = required_blocks_problem(groups, sorted(required))
        if problem is not None:
            raise UsageError(
                f"DifferentiableBlockMask(blocks={describe_paths(self.blocks)}, pattern={self.pattern.describe()!r}): "
                f"{' and '.join(families)} requires blocks {sorted(required)} (global indices over the blocks; every "
                f"exportable decision keeps them, prune_blocks refuses one that drops them), but {problem}."
            )
        return tuple(sorted(required))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning 2.6 order: setup -> callback state restored -> configure_optimizers -> on_fit_start ->
        # optimizer and scheduler state restored. The gate group added here therefore exists when a resumed
        # run loads the optimizer state, and the model already sits on its device.
        gates = self._ready_gates()
        gates.to(pl_module.device)
        self._kept_mask = None
        self._previous_choice = gates.chosen_options()
        self._run_steps = self.total_steps or self._estimate_run_steps(trainer)
        self._record_every = self.log_every_n_steps or max(trainer.log_every_n_steps, 1)
        self._add_gate_group(trainer)
        if not self._history:
            self._record(trainer.global_step)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After every restore: strategies that save only the model's parameters' optimizer state (FSDP2Strategy)
        # leave the gate group's moments to this callback; where Lightning restored them too, they are the same.
        if self._pending_optimizer_state is not None and self._optimizer is not None:
            gate_group = self._gate_group(self._optimizer)
            for logits, saved in zip(gate_group["params"], self._pending_optimizer_state, strict=True):
                self._optimizer.state[logits] = {key: _to_optimizer_state(value, key, logits, gate_group)
                                                 for key, value in saved.items()}
        self._pending_optimizer_state = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._progress = trainer.global_step / max(self._run_steps - 1, 1)
        self._step_at_batch_start = trainer.global_step
        self._sampling = True
        self._sample = None
        self._choices = None

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.estimator != "score_function" or self._choices is None:
            return
        losses = getattr(pl_module, "sample_losses", None)
        rows = len(self._choices[0])
        if not torch.is_tensor(losses) or losses.shape != (rows,) or losses is self._scored_losses:
            raise UsageError(
                f"DifferentiableBlockMask(estimator='score_function') needs the per-sample losses of every training "
                f"batch: set self.sample_losses = <the ({rows},) loss of each sample, detached> in training_step "
                f"(found {_describe_losses(losses, self._scored_losses)}), or use estimator='straight_through'."
            )
        self._scored_losses = losses
        losses = losses.detach().float()
        baseline = losses.mean()
        if trainer.world_size > 1:  # the global batch's mean: ranks then estimate what one process would
            baseline = trainer.strategy.reduce(baseline, reduce_op="mean")
        if torch.isfinite(losses).all() and torch.isfinite(baseline):  # a non-finite step is skipped whole
            gates = self._ready_gates()
            gradients = gates.score_function_gradients(self._choices, losses - baseline, self.current_scaling)
            for logits, gradient in zip(gates.gate_logits, gradients, strict=True):
                gradient = gradient / trainer.accumulate_grad_batches  # as Lightning scales the loss
                logits.grad = gradient if logits.grad is None else logits.grad + gradient
        self._choices = None

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        gate_group = self._gate_group(optimizer)
        if gate_group is None:
            return
        gate_group["lr"] = self.lr_multiplier * optimizer.param_groups[0]["lr"]
        if trainer.world_size > 1:
            # The gates live outside the DDP-wrapped module, so their gradients are averaged here; with
            # identical initial values and identical updates the logits, EMA and decision agree on every rank.
            for logits in self._ready_gates().gate_logits:
                gradient = logits.grad if logits.grad is not None else torch.zeros_like(logits)
                logits.grad = trainer.strategy.reduce(gradient, reduce_op="mean")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._sampling = False
        self._sample = None
        self._choices = None
        if trainer.global_step == self._step_at_batch_start:  # accumulating gradients: no optimizer step yet
            return
        gates = self._ready_gates()
        gates.update_ema(self.ema_decay)
        self._kept_mask = None
        chosen = gates.chosen_options()
        # a device tensor, so that counting needs no host sync on steps that are not logged
        self._decision_changes = self._decision_changes + (chosen != self._previous_choice).sum()
        self._previous_choice = chosen
        if trainer.global_step % self._record_every == 0:
            self._record(trainer.global_step)
            self._log_metrics(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._history or self._history[-1]["step"] != trainer.global_step:
            self._record(trainer.global_step)
        rank_zero_info(f"DifferentiableBlockMask: keeping blocks {self.kept_blocks} of {describe_paths(self.blocks)}.")
        if not self.plot:
            return
        run_folder = trainer.log_dir or trainer.default_root_dir  # collective call: every rank asks
        if not trainer.is_global_zero:
            return
        figure = decision_dynamics_figure(self._history, self.groups, container_starts=self._container_starts)
        path = save_figure_atomically(figure, Path(run_folder) / DYNAMICS_FILENAME)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):  # WandbLogger and loggers shaped like it
                logger.log_image(key="block_mask/decision_dynamics", images=[str(path)], step=trainer.global_step)
            elif hasattr(getattr(logger, "experiment", None), "add_figure"):  # TensorBoard's SummaryWriter
                logger.experiment.add_figure("block_mask/decision_dynamics", figure, trainer.global_step)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Lightning skips the teardown hooks when fit fails; the model must still come back unhooked.
        self._remove_hooks()

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        if self.gates is None:
            return {}
        # Over all C(M, N) options of each group (-inf where inadmissible), so a state loads whatever the requirement.
        gate_logits, ema_logits = self.gates.full_logits()
        return {
            "groups": [list(group) for group in self.gates.groups],
            "required_blocks": list(self.gates.required_blocks),
            "gate_logits": gate_logits,
            "ema_logits": ema_logits,
            "seed": self._seed,
            "draws": self._draws,
            "progress": self._progress,
            "decision_changes": int(self._decision_changes),
            "history": copy.deepcopy(self._history),
            # the gate group's optimizer state (e.g. AdamW's moments): not every strategy saves it with the model's
            "gate_optimizer_state": [{key: value.detach().clone() if torch.is_tensor(value) else value
                                      for key, value in self._optimizer.state.get(logits, {}).items()}
                                     for logits in self.gates.gate_logits] if self._optimizer is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.gates is None:  # the depth is not known before setup; apply it there
            self._pending_state = dict(state_dict)
            return
        self._apply_state(state_dict)

    def _apply_state(self, state: dict[str, Any]) -> None:
        gates = self._ready_gates()
        saved_groups = [tuple(group) for group in state.get("groups", gates.groups)]
        if saved_groups != list(gates.groups):
            raise UsageError(
                f"The checkpoint's DifferentiableBlockMask state has groups {saved_groups}, but this callback "
                f"has {list(gates.groups)}. Resume with the pattern the checkpoint was trained with."
            )
        saved_required = tuple(state.get("required_blocks", gates.required_blocks))
        if self._required_blocks is None and saved_required != gates.required_blocks:
            # Before setup the family's requirement is unknown: take the checkpoint's (setup checks it again).
            gates = self.gates = gates.with_required_blocks(saved_required)
        gates.load_full_logits(state.get("gate_logits", []), state.get("ema_logits", []))
        self._seed = state.get("seed", self._seed)
        self._draws = state.get("draws", self._draws)
        self._progress = state.get("progress", self._progress)
        self._decision_changes = state.get("decision_changes", self._decision_changes)
        self._history = copy.deepcopy(state.get("history", self._history))
        self._pending_optimizer_state = state.get("gate_optimizer_state")
        self._previous_choice = gates.chosen_options()
        self._kept_mask = None

    # ------------------------------------------------------------------ internals

    def _mask_for_block(self, index: int, hidden_in: torch.Tensor, block: nn.Module) -> BlockMask:
        """Per-sample gate draw in training batches; the current hard decision everywhere else."""
        if self._sampling and block.training:
            # One draw per training batch, shared by all blocks (and by any recomputation of them).
            if self._sample is None or self._sample.shape[0] != hidden_in.shape[0]:
                self._sample = self._draw_sample(hidden_in.shape[0]).to(hidden_in.device)  # (B, L)
            return self._sample[:, index]
        if self._kept_mask is None:
            kept = set(self._ready_gates().kept_blocks())
            self._kept_mask = [block_index in kept for block_index in range(self._ready_gates().depth)]
        return self._kept_mask[index]

    def _draw_sample(self, batch_size: int) -> torch.Tensor:
        """Hard per-sample masks (B, L) from noise that depends only on (seed, draw count) and this rank's rows."""
        # (seed, 0, draw count): the 0 keeps the noise of earlier runs, when it was the rank of one process.
        entropy = np.random.SeedSequence([self._seed, 0, self._draws]).generate_state(1, np.uint64)[0]
        generator = torch.Generator().manual_seed(int(entropy))
        self._draws += 1
        gates = self._ready_gates()
        replicas, rank = self._share
        noise = [group[rank::replicas] for group in gates.draw_noise(batch_size * replicas, generator)]
        if self.estimator == "score_function":  # the same draws; the gates learn in on_after_backward
            self._choices = gates.sample_choices(noise, self.current_scaling)
            # A zero path to the gates keeps a loss that reaches no trained weight differentiable (weight_update=frozen).
            return gates.masks_of(self._choices) + sum(logits.sum() for logits in gates.gate_logits) * 0.0
        return gates.sample_masks(noise, self.current_scaling, self.current_tau)

    def _add_gate_group(self, trainer: L.Trainer) -> None:
        """Add the gate logits as a parameter group of the first optimizer and teach its schedulers about it."""
        # With configure_optimizers returning None, Lightning steps a stand-in optimizer without parameter groups.
        if not trainer.optimizers or not trainer.optimizers[0].param_groups:
            raise RuntimeError(
                "DifferentiableBlockMask needs an optimizer to train the gate logits, but configure_optimizers "
                "returned none. Return an optimizer (e.g. torch.optim.AdamW) from configure_optimizers."
            )
        optimizer = trainer.optimizers[0]
        user_group = optimizer.param_groups[0]
        # The user's hyperparameters (betas, eps, scheduler keys such as OneCycleLR's max_lr) carry over;
        # the lr is re-derived from the user's before every step (on_before_optimizer_step).
        gate_group = {key: value for key, value in user_group.items() if key != "params"}
        gate_group["params"] = list(self._ready_gates().gate_logits)
        gate_group["lr"] = self.lr_multiplier * user_group["lr"]
        gate_group["initial_lr"] = self.lr_multiplier * user_group.get("initial_lr", user_group["lr"])
        if "weight_decay" in gate_group:
            gate_group["weight_decay"] = 0.0  # decay would pull the logits back toward uniform
        optimizer.add_param_group(gate_group)
        self._optimizer = optimizer
        for config in trainer.lr_scheduler_configs:
            _extend_scheduler_to_new_group(config.scheduler, optimizer, self.lr_multiplier)

    def _gate_group(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """The parameter group of `optimizer` that holds the gate logits, if any (found anew: resuming replaces groups)."""
        first_gate = self._ready_gates().gate_logits[0]
        return next((g for g in optimizer.param_groups if any(p is first_gate for p in g["params"])), None)

    def _estimate_run_steps(self, trainer: L.Trainer) -> int:
        steps = trainer.estimated_stepping_batches
        if not math.isfinite(steps) or steps < 1:
            raise UsageError(
                f"DifferentiableBlockMask anneals tau/scaling over the run, but the Trainer's run length is "
                f"{steps} steps. Set Trainer(max_steps=...) or max_epochs, or pass total_steps=... to the callback."
            )
        return int(steps)

    def _record(self, step: int) -> None:
        gates = self._ready_gates()
        self._history.append(
            {
                "step": int(step),
                "chosen_options": gates.chosen_options().tolist(),
                "confidences": gates.confidences(self.current_scaling),
            }
        )

    def _log_metrics(self, trainer: L.Trainer) -> None:
        """Log through every logger the Trainer has, on global rank zero only."""
        if not trainer.loggers or not trainer.is_global_zero:
            self._decision_changes = 0
            return
        record = self._history[-1]
        metrics = {
            "block_mask/tau": self.current_tau,
            "block_mask/scaling": self.current_scaling,
            "block_mask/decision_changes": float(self._decision_changes),
            "block_mask/mean_confidence": float(np.mean(record["confidences"])),
        }
        for group, (option, confidence) in enumerate(zip(record["chosen_options"], record["confidences"], strict=True)):
            metrics[f"block_mask/confidence/group_{group}"] = confidence
            metrics[f"block_mask/choice/group_{group}"] = float(option)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=record["step"])
        self._decision_changes = 0

    def _remove_hooks(self) -> None:
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
        self._sampling = False
        self._sample = None
