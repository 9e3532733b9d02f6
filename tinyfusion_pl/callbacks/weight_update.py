"""The co-optimized weight update of TinyFusion: a small update trained jointly with the block gates."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn as nn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from tinyfusion_pl.callbacks.block_mask import DifferentiableBlockMask
from tinyfusion_pl.errors import UsageError
from tinyfusion_pl.pruning.containers import (
    BlockPaths,
    BlockSequence,
    block_paths,
    block_paths_problem,
    describe_containers,
    describe_paths,
    resolve_block_sequence,
)
from tinyfusion_pl.pruning.lora import LoRALinear, inject_block_lora, lora_argument_problems, remove_lora

METHODS = ("lora", "full", "frozen")


class CoOptimizedWeightUpdate(L.Callback):
    """Train a weight update of the blocks during fit (LoRA, full or none) and take it back out at the end.

    method="lora" (the paper's default) wraps every Linear of the blocks in a LoRA adapter and freezes
    every original weight of the LightningModule; "full" makes all block weights trainable; "frozen"
    freezes every original weight so that only the block gates learn. When fit ends (or fails) the model
    gets its original weights, plain Linear layers and requires_grad flags back (the paper's choice);
    merge=True keeps the learned update in the weights instead.

    `target` names the Linears LoRA adapts (names or dotted name endings); by default the model family's choice:
    every Linear of the blocks, except in diffusers' DiT, whose blocks each hold a copy of the timestep/label
    embedder that DiT keeps outside its blocks: there the Linears of DiT's own block. A given target wins.

    blocks=None (the default) adapts exactly the blocks of the DifferentiableBlockMask in the same Trainer,
    so the path is written once, on the mask; give `blocks` (one path or a list) to adapt others.

        mask = DifferentiableBlockMask(blocks="net.blocks", pattern="2:4")
        trainer = L.Trainer(max_steps=10_000, callbacks=[mask, CoOptimizedWeightUpdate(method="lora", rank=8)])
    """

    def __init__(
        self,
        method: str = "lora",
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        blocks: BlockPaths | None = None,
        merge: bool = False,
        target: Sequence[str] | None = None,
    ):
        problems = []
        if method not in METHODS:
            problems.append(
                f"method={method!r} is not one of {list(METHODS)}: 'lora' trains low-rank adapters (the paper's "
                "default), 'full' all block weights, 'frozen' nothing but the gates"
            )
        paths_problem = None if blocks is None else block_paths_problem(blocks)
        if paths_problem:
            problems.append(paths_problem + " (or None: the blocks of the DifferentiableBlockMask)")
        if not isinstance(merge, bool):
            problems.append(f"merge={merge!r} must be True or False")
        elif merge and method == "frozen":
            problems.append("merge=True has nothing to merge with method='frozen'; drop merge or pick 'lora'/'full'")
        problems += lora_argument_problems(rank, alpha, dropout)
        if problems:
            raise UsageError("Invalid CoOptimizedWeightUpdate arguments: " + "; ".join(problems) + ".")
        self.method = method
        self.rank = rank
        self.alpha = alpha
        self.dropout = dropout
        self.blocks = blocks if blocks is None or isinstance(blocks, str) else list(blocks)
        self.merge = merge
        self.target = None if target is None else ([target] if isinstance(target, str) else list(target))
        self.wrapped_layers: list[str] = []
        self._sequence: BlockSequence | None = None
        self._requires_grad_before: list[tuple[nn.Parameter, bool]] = []
        self._weights_before: list[tuple[nn.Parameter, torch.Tensor]] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before Lightning restores a checkpoint and builds the optimizers, so that a resumed run finds
        # the adapters in the state dict and configure_optimizers sees exactly the trainable update.
        if stage != "fit":
            return
        if self._sequence is not None:
            raise UsageError(
                "This CoOptimizedWeightUpdate is already active on a model; use one instance per running fit."
            )
        sequence = resolve_block_sequence(pl_module, self._blocks_to_adapt(trainer, pl_module))
        # Recorded first: if anything below fails, on_exception restores the model from this.
        self._sequence = sequence
        self._requires_grad_before = [(p, p.requires_grad) for p in pl_module.parameters()]
        self.wrapped_layers = []
        if self.method == "lora":
            # Wrapped before freezing, so that each wrapper records its layer's own flags for an export.
            self.wrapped_layers = inject_block_lora(pl_module, sequence, rank=self.rank, alpha=self.alpha,
                                                    dropout=self.dropout, target=self.target)
        if self.method in ("lora", "frozen"):
            adapters = {id(p) for container in sequence.containers for m in container.modules()
                        if isinstance(m, LoRALinear) for p in m.adapters()}
            for parameter in pl_module.parameters():
                parameter.requires_grad_(id(parameter) in adapters)
        if self.method == "full":
            for container in sequence.containers:
                container.requires_grad_(True)
            if not self.merge:
                # Kept on the CPU so that discarding the update costs no accelerator memory.
                self._weights_before = [
                    (p, p.detach().to("cpu", copy=True)) for p in pl_module.parameters() if p.requires_grad
                ]
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        total = sum(p.numel() for p in pl_module.parameters())
        rank_zero_info(
            f"CoOptimizedWeightUpdate(method={self.method!r}): {trainable:,} of {total:,} parameters of "
            f"{type(pl_module).__name__} train ({100 * trainable / max(total, 1):.2f}%)"
            + (f", LoRA rank {self.rank} on {len(self.wrapped_layers)} Linear layers." if self.method == "lora" else ".")
        )

    def _blocks_to_adapt(self, trainer: L.Trainer, pl_module: L.LightningModule) -> BlockPaths:
        """The given `blocks`, else those of the DifferentiableBlockMask in the Trainer; refuse when there is none."""
        masks = [callback for callback in trainer.callbacks if isinstance(callback, DifferentiableBlockMask)]
        gated = {block_paths(mask.blocks) for mask in masks}
        if self.blocks is not None:
            if gated and block_paths(self.blocks) not in gated:
                rank_zero_warn(
                    f"CoOptimizedWeightUpdate adapts blocks={describe_paths(self.blocks)} while the "
                    f"DifferentiableBlockMask gates {' and '.join(describe_paths(mask.blocks) for mask in masks)}: "
                    "the update then simulates the recovery of other blocks than those being pruned. Leave "
                    "blocks=None to adapt exactly the gated blocks."
                )
            return self.blocks
        if len(gated) == 1:
            return masks[0].blocks
        if gated:
            raise UsageError(
                f"CoOptimizedWeightUpdate(blocks=None) adapts the blocks of the DifferentiableBlockMask, but the "
                f"Trainer has {len(masks)} masks on different blocks "
                f"({', '.join(describe_paths(mask.blocks) for mask in masks)}). Pass blocks=... to choose."
            )
        raise UsageError(
            f"CoOptimizedWeightUpdate(blocks=None) adapts the blocks of the DifferentiableBlockMask in the same "
            f"Trainer, but trainer.callbacks has none. Containers of same-class blocks in "
            f"{type(pl_module).__name__}: {describe_containers(pl_module)}. Pass one of them (or a list) as "
            "blocks=..., or add a DifferentiableBlockMask(blocks=...) to the callbacks."
        )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._sequence is None or self.method == "frozen":
            return
        in_optimizer = {id(p) for optimizer in trainer.optimizers for group in optimizer.param_groups for p in group["params"]}
        missing = [
            name if len(self._sequence.paths) == 1 else f"{path}.{name}"
            for path, container in zip(self._sequence.paths, self._sequence.containers, strict=True)
            for name, p in container.named_parameters() if p.requires_grad and id(p) not in in_optimizer
        ]
        if missing:
            blocks = self._sequence.paths[0] if len(self._sequence.paths) == 1 else list(self._sequence.paths)
            raise UsageError(
                f"CoOptimizedWeightUpdate(method={self.method!r}): the optimizer does not hold {len(missing)} "
                f"trainable parameters of {describe_paths(blocks)}, e.g. {missing[:3]}. The update is created in setup, "
                "before configure_optimizers runs: build the optimizer from self.parameters() there "
                "(frozen weights cost nothing: they get no gradient)."
            )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._restore_model()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Lightning skips teardown when fit fails; the model must still come back as it was.
        self._restore_model()

    def _restore_model(self) -> None:
        if self._sequence is None:
            return
        if self.method == "lora":
            for container in self._sequence.containers:
                remove_lora(container, merge=self.merge)
        with torch.no_grad():
            for parameter, weights in self._weights_before:
                parameter.copy_(weights)
        for parameter, requires_grad in self._requires_grad_before:
            parameter.requires_grad_(requires_grad)
        self._sequence = None
        self._requires_grad_before = []
        self._weights_before = []

    def state_dict(self) -> dict[str, Any]:
        # The adapters themselves are in the model's state dict; this records how to rebuild them.
        return {"method": self.method, "rank": self.rank, "alpha": self.alpha, "wrapped_layers": self.wrapped_layers}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = {key: state_dict[key] for key in ("method", "rank", "alpha") if key in state_dict}
        current = {key: getattr(self, key) for key in saved}
        if saved != current:
            raise UsageError(
                f"The checkpoint was trained with CoOptimizedWeightUpdate({saved}) but this run uses {current}. "
                "Resume with the same method, rank and alpha, or start a new run."
            )
