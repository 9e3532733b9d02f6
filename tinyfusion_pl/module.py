"""DiffusionModule: trains any denoiser `net(x_t, t, **cond)` with a diffusion objective."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from tinyfusion_pl.distributed import data_parallel_share
from tinyfusion_pl.errors import UsageError
from tinyfusion_pl.evaluation.sampling import sample_images
from tinyfusion_pl.families import find_family
from tinyfusion_pl.models.checkpoints import extract_state_dict, load_checkpoint_file
from tinyfusion_pl.objectives import DiffusionObjective, GaussianDiffusion, split_batch

LR_SCHEDULES = ("constant", "cosine")
# Steps after which a run that skips most of its steps as non-finite is stopped (shorter runs: at their end).
NONFINITE_JUDGED_AFTER = 10


def ema_update(decay: float) -> Any:
    """torch's EMA update over lists of tensors, run separately on FSDP2's sharded weights (DTensors) and on the
    tensors it leaves whole (buffers such as position tables): one foreach call cannot mix the two."""
    update = get_ema_multi_avg_fn(decay)

    def update_each_kind(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: Any) -> None:
        for sharded in (True, False):
            pairs = [(a, c) for a, c in zip(averaged, current, strict=True) if isinstance(a, DTensor) == sharded]
            if pairs:
                update([a for a, _ in pairs], [c for _, c in pairs], num_averaged)

    return update_each_kind


def load_weights(net: nn.Module, checkpoint: str | dict, prefer: str = "ema") -> None:
    """Load a checkpoint file or object (plain, reference {'model','ema'} or Lightning) into `net`, strictly."""
    loaded = load_checkpoint_file(checkpoint) if isinstance(checkpoint, str) else checkpoint
    state_dict = extract_state_dict(loaded, prefer=prefer)
    family = find_family(net)
    if family is not None:
        family.load_state_dict(net, state_dict)  # a mismatch is explained key by key
    else:
        net.load_state_dict(state_dict, strict=True)


class DiffusionModule(L.LightningModule):
    """Trains a denoiser with a diffusion objective, keeps an EMA of its weights, and samples with CFG.

    Batches are `(x, y)` (class-conditional, passed to the net as `y=`) or `x` alone.
    """

    def __init__(
        self,
        net: nn.Module,
        objective: DiffusionObjective | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        lr_schedule: str = "constant",
        min_lr: float = 0.0,
        ema_decay: float | None = 0.9999,
        init_checkpoint: str | None = None,
        init_from: str = "ema",
        skip_nonfinite_steps: bool = False,
        max_nonfinite_fraction: float = 0.5,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise UsageError(f"lr={lr} must be > 0.")
        if lr_schedule not in LR_SCHEDULES:
            raise UsageError(f"lr_schedule='{lr_schedule}' is not one of {LR_SCHEDULES}.")
        if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
            raise UsageError(f"ema_decay={ema_decay} must be in [0, 1), or None to keep no EMA.")
        if isinstance(max_nonfinite_fraction, bool) or not isinstance(max_nonfinite_fraction, (int, float)) \
                or not 0.0 <= max_nonfinite_fraction <= 1.0:
            raise UsageError(f"max_nonfinite_fraction={max_nonfinite_fraction!r} must be a number in [0, 1] (the share "
                             "of skipped non-finite steps at which training stops; 1.0 never stops).")
        if init_from not in ("ema", "model"):
            raise UsageError(f"init_from='{init_from}' must be 'ema' or 'model'.")
        self.save_hyperparameters(ignore=["net", "objective"])
        self.net = net
        self.objective = objective if objective is not None else GaussianDiffusion()
        self.family = find_family(net)
        self.label_dropout = 0.0 if self.family is None else self.family.label_dropout(net)
        if init_checkpoint:
            load_weights(self.net, init_checkpoint, prefer=init_from)
        self.ema: AveragedModel | None = None
        if ema_decay is not None:
            self.ema = AveragedModel(self.net, multi_avg_fn=ema_update(ema_decay), use_buffers=True)
            self.ema.requires_grad_(False)
        self.nonfinite_steps = 0
        self.attempted_steps = 0
        self._skipping_step = False
        self._last_step_time: float | None = None
        self.sample_losses: torch.Tensor | None = None  # the last training batch's (B,) per-sample losses

    # ------------------------------------------------------------------ training
    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        return self.net(x, t, **cond)

    def diffusion_terms(self, batch: Any, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The objective's per-sample loss terms on one batch, at random timesteps and noise (drawn from `generator`)."""
        x, cond = split_batch(batch)
        t, noise, cond = self.draws(x, cond, generator)
        return self.objective.training_losses(self.net, x, t, noise=noise, model_kwargs=cond, generator=generator,
                                              share=self.batch_share())

    def draws(
        self, x: torch.Tensor, cond: dict[str, Any], generator: torch.Generator | None = None,
        drop_labels: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Times, noise and classifier-free-guidance label drops for the samples x, conditioned by `cond`.

        In data-parallel training they are drawn for the whole global batch on every rank, which takes its own
        rows: rank r's j-th sample is sample r + j * replicas of the global batch, as the training loader deals
        them out (ResumableDataLoader's share). A run on several ranks then draws what one process with the
        global batch draws, and no two ranks share noise. Label drops (drop_labels; default: in training) are
        drawn here, once per sample, and passed the way the net's family takes them (DiT's force_drop_ids), so
        that they too come from the global draw; a net whose family takes none draws them itself, per rank.
        The objective's own draws (MAR's orders and head noise) follow the same rule (`share`).
        """
        replicas, rank = self.batch_share()
        total = x.shape[0] * replicas
        t = self.objective.sample_timesteps(total, x.device, generator=generator)[rank::replicas]
        noise = torch.randn((total, *x.shape[1:]), device=x.device, dtype=x.dtype, generator=generator)[rank::replicas]
        drop_labels = self.training if drop_labels is None else drop_labels
        if drop_labels and self.label_dropout > 0 and "y" in cond and self.family.label_drop_argument is not None:
            draws = torch.rand(total, device=x.device, generator=generator)[rank::replicas]
            cond = {**cond, **self.family.condition(cond["y"], drop=(draws < self.label_dropout).long())}
        return t, noise, cond

    def batch_share(self) -> tuple[int, int]:
        """(replicas, rank): in data-parallel training, where this rank's samples sit in the global batch."""
        return data_parallel_share(self._trainer) if self.training else (1, 0)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        terms = self.diffusion_terms(batch)
        self.sample_losses = terms["loss"].detach()  # (B,): what DifferentiableBlockMask's score_function reads
        loss = terms["loss"].mean()
        self.log_terms("train", terms, batch_size=len(terms["loss"]))
        self.log_throughput(len(terms["loss"]))
        if self.hparams.skip_nonfinite_steps and self.nonfinite_on_any_rank(loss):
            return self.skip_step()
        return loss

    def nonfinite_on_any_rank(self, loss: torch.Tensor) -> bool:
        """Whether the loss is NaN or infinite on any rank: one rank's skip is every rank's skip.

        A rank that skipped its backward while another stepped would leave that one waiting in the gradient
        all-reduce; agreeing first keeps every rank on the same steps (and the weights in step).
        """
        self.attempted_steps += 1
        nonfinite = (~torch.isfinite(loss.detach())).float()
        if self.trainer.world_size > 1:
            nonfinite = self.trainer.strategy.reduce(nonfinite, reduce_op="sum")
        return bool(nonfinite > 0)

    def skip_step(self) -> torch.Tensor | None:
        """Count and log a step whose loss is not finite, and make it change nothing.

        One process returns None, which makes Lightning skip the update. Lightning refuses None under DDP, so
        there every rank returns a zero loss that reaches each trainable parameter (DDP's gradient all-reduce
        runs as on any step) and on_before_optimizer_step drops the gradients: the optimizer leaves every
        parameter and its state as they were, as with None. A run whose steps are mostly non-finite stops
        (max_nonfinite_fraction): it has diverged, and skipping on would only hide it.
        """
        self.nonfinite_steps += 1
        self.log("train/nonfinite_steps", float(self.nonfinite_steps))
        if self.attempted_steps >= NONFINITE_JUDGED_AFTER:
            self.check_nonfinite_share()
        self._skipping_step = True
        if self.trainer.world_size == 1:
            return None
        return sum((parameter * 0).sum() for parameter in self.parameters() if parameter.requires_grad)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._skipping_step:  # a skipped step: no gradient, so the optimizer moves nothing (gates included)
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    parameter.grad = None
        self._skipping_step = False

    def on_train_end(self) -> None:
        if self.hparams.skip_nonfinite_steps and self.attempted_steps:  # short runs are judged at their end
            self.check_nonfinite_share()

    def check_nonfinite_share(self) -> None:
        """Stop with the likely causes when more than max_nonfinite_fraction of the steps so far were non-finite."""
        if self.nonfinite_steps <= self.hparams.max_nonfinite_fraction * self.attempted_steps:
            return
        raise RuntimeError(
            f"{self.nonfinite_steps} of {self.attempted_steps} training steps had a non-finite loss (NaN or inf) and "
            f"were skipped: training diverged. Likely causes: the learning rate (lr={self.hparams.lr}) is too high, "
            f"lower it; or the precision ({self.trainer.precision}) cannot hold the values, use trainer.precision=32-true or "
            "bf16-mixed instead of 16-mixed. Nothing of this stage was saved."
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["nonfinite_steps"] = self.nonfinite_steps  # a resumed run goes on counting
        checkpoint["attempted_steps"] = self.attempted_steps  # and judges its share of skips over the whole run

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite_steps = checkpoint.get("nonfinite_steps", 0)
        # an older checkpoint lacks the count of attempts: at least every skipped step was one
        self.attempted_steps = checkpoint.get("attempted_steps", self.nonfinite_steps)

    def log_terms(self, split: str, terms: dict[str, torch.Tensor], batch_size: int) -> None:
        for name, value in terms.items():
            if value.ndim <= 1:
                self.log(f"{split}/{name}", value.float().mean(), prog_bar=name == "loss", batch_size=batch_size,
                         sync_dist=split != "train")

    def log_throughput(self, batch_size: int) -> None:
        # Host wall-clock between steps: no device sync, and it converges to the real rate once the queue is full.
        now = time.perf_counter()
        if self._last_step_time is not None:
            self.log("train/samples_per_s", batch_size / max(now - self._last_step_time, 1e-9))
        self._last_step_time = now

    def on_train_epoch_start(self) -> None:
        self._last_step_time = None  # do not count validation or data-loader start-up as step time

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        terms = self.diffusion_terms(batch, generator=self._val_generator)
        self.log_terms("val", terms, batch_size=len(terms["loss"]))

    def on_validation_epoch_start(self) -> None:
        # The same timesteps and noise every epoch make validation losses comparable across epochs.
        self._val_generator = torch.Generator(self.device).manual_seed(0)

    # ------------------------------------------------------------------ EMA
    def on_fit_start(self) -> None:
        if self.ema is not None and _parameter_shapes(self.ema.module) != _parameter_shapes(self.net):
            raise RuntimeError(
                "The net's parameters no longer match its EMA copy (a callback changed the architecture, e.g. LoRA "
                "adapters). Build the DiffusionModule with ema_decay=None for pruning runs."
            )

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here rather than in on_train_batch_end, which Lightning calls after the callbacks' (ModelCheckpoint's):
        # a checkpoint taken at the end of a step then holds the EMA of that step, and a resumed run misses none.
        if self.ema is not None:
            self.ema.update_parameters(self.net)

    # ------------------------------------------------------------------ sharding (trainer=fsdp2)
    def configure_model(self) -> None:
        """Under Lightning's ModelParallelStrategy: FSDP2 over the net, one unit per block of its family, and the
        EMA copy alike (so that its update pairs shards with shards). Other strategies leave the module as it is."""
        if self.device_mesh is None:
            return
        from tinyfusion_pl.strategies import shard_family_blocks

        mesh = self.device_mesh["data_parallel"]
        shard_family_blocks(self.net, mesh)
        if self.ema is not None:
            shard_family_blocks(self.ema.module, mesh)

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        if self.device_mesh is None or not gradient_clip_val or gradient_clip_algorithm not in (None, "norm"):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        # FSDP2's weights are DTensors and a mask's gate logits plain tensors; torch takes norms of one kind at a
        # time, so the global norm is put together from both and each kind is scaled by the same factor.
        from torch.distributed.tensor import DTensor

        parameters = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        kinds = [kind for kind in ([p for p in parameters if isinstance(p.grad, DTensor)],
                                   [p for p in parameters if not isinstance(p.grad, DTensor)]) if kind]
        norms = [torch.nn.utils.get_total_norm([p.grad for p in kind]) for kind in kinds]
        norms = [norm.full_tensor() if isinstance(norm, DTensor) else norm for norm in norms]
        total = torch.linalg.vector_norm(torch.stack([norm.to(self.device) for norm in norms]))
        for kind in kinds:
            torch.nn.utils.clip_grads_with_norm_(kind, gradient_clip_val, total)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        trainable = [p for p in self.net.parameters() if p.requires_grad]
        # one group even when the net is frozen (weight_update=frozen): the block mask adds the gate logits to it
        optimizer = torch.optim.AdamW([{"params": trainable}], lr=self.hparams.lr, weight_decay=self.hparams.weight_decay,
                                      betas=tuple(self.hparams.betas))
        if self.hparams.lr_schedule == "constant":
            return optimizer
        total_steps = max(int(self.trainer.estimated_stepping_batches), 1)
        min_ratio = self.hparams.min_lr / self.hparams.lr

        def cosine(step: int) -> float:
            progress = min(step / total_steps, 1.0)
            return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ sampling
    def sampling_net(self, use_ema: bool = True) -> nn.Module:
        """The EMA copy of the net when there is one and `use_ema`, else the trained net."""
        return self.ema.module if use_ema and self.ema is not None else self.net

    def sample(
        self,
        labels: torch.Tensor,
        cfg_scale: float = 1.0,
        guidance_channels: int | None = None,
        use_ema: bool = True,
        seed: int = 0,
        progress: bool = False,
        **sampler_options: Any,
    ) -> torch.Tensor:
        """Class-conditional samples (N, C, H, W) for `labels` from the EMA net, with CFG when cfg_scale > 1.

        `sampler_options` are the objective's (GaussianDiffusion: steps, method, eta, clip_denoised;
        FlowMatching: steps, method); `tinyfusion_pl.evaluation.sample_images` draws them in one batch.
        """
        return sample_images(self.sampling_net(use_ema), self.objective, labels, cfg_scale=cfg_scale,
                             guidance_channels=guidance_channels, batch_size=max(len(labels), 1), seed=seed,
                             progress=progress, **sampler_options).to(self.device)


def _parameter_shapes(module: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(p.shape)) for name, p in module.named_parameters()]
