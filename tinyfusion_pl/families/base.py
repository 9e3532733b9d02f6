"""ModelFamily: the one description of a kind of diffusion transformer that generic code reads.

Stages, selectors, calibration, distillation, evaluation and export never name an architecture or a
parameter path: they ask the model's family where its blocks are, how it is conditioned, what one sample
looks like, and how to rebuild it at another depth. A new family is a small subclass in this folder,
registered in `tinyfusion_pl.families.FAMILIES`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn

from tinyfusion_pl.io import save_torch
from tinyfusion_pl.models.checkpoints import extract_state_dict, load_checkpoint_file, load_dit_state_dict


@dataclass(frozen=True)
class BlockStreams:
    """The streams a multi-stream block takes and returns (SD3, Flux: image tokens and text tokens).

    inputs: the names of the block's stream arguments, whether passed by position (in forward's order) or
    by keyword. outputs: for a block that returns a tuple, which input stream each returned position is
    (e.g. ("encoder_hidden_states", "hidden_states") for diffusers' joint blocks). A dropped block returns
    every input stream unchanged in that order. The first input is the hidden state that selectors and
    distillation compare.
    """

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


class ModelFamily:
    """How generic code finds the blocks of a model, calls it, conditions it, and builds it at another depth.

    The net is always called as `net(x, t, **condition)` and returns its prediction for x.
    """

    name: ClassVar[str]
    model_class: ClassVar[type[nn.Module]]
    # Dotted paths of the block containers under the net, in computation order.
    blocks: ClassVar[tuple[str, ...]]
    # The constructor keyword that sets the length of each container, in the same order.
    depth_arguments: ClassVar[tuple[str, ...]]
    # The keyword of the class label (None: unconditional) and of its forced drops (CFG training, KD).
    label_argument: ClassVar[str | None] = "y"
    label_drop_argument: ClassVar[str | None] = "force_drop_ids"
    # None: the net is a denoiser net(x_t, t, **condition) that any objective trains and samples. Otherwise the
    # name of the only objective (conf/objective/<name>.yaml) that can (MAR: "mar", which masks tokens and runs
    # the diffusion head); generic code that calls the net itself goes through that objective.
    own_objective: ClassVar[str | None] = None
    # The Linear layers of a block that the LoRA weight update adapts when the user names none (names or dotted
    # name endings, as CoOptimizedWeightUpdate's `target`); None: every Linear of the blocks, the paper's choice.
    lora_target: ClassVar[tuple[str, ...] | None] = None
    # Where an objective runs the net other than through forward (MAR's does): the methods it calls on the net and
    # the submodules it calls on their own. Sharding (FSDP2) gathers a unit's weights only around its forward, so
    # these methods get the net's gathering too and these submodules are shard units of their own.
    called_methods: ClassVar[tuple[str, ...]] = ()
    called_submodules: ClassVar[tuple[str, ...]] = ()

    def describes(self, cls: type) -> bool:
        """Whether instances of exactly `cls` are this family's models."""
        return cls is self.model_class

    @property
    def class_name(self) -> str:
        """The name of the class this family describes (for messages)."""
        return self.model_class.__name__

    # ---------------------------------------------------------------- structure
    def architecture(self, net: nn.Module) -> dict[str, Any]:
        """The constructor keywords that rebuild `net` (depths included) with `build`."""
        raise NotImplementedError

    def build(self, **architecture: Any) -> nn.Module:
        """A freshly initialised model of this family."""
        return self.model_class(**architecture)

    def sample_shape(self, net: nn.Module) -> tuple[int, ...]:
        """The shape of one sample the net denoises, without the batch dimension, e.g. (C, H, W)."""
        raise NotImplementedError

    def block_argument(self, prefix: str = "") -> str | list[str]:
        """The `blocks` argument of the callbacks, prune_blocks and the selectors for this family's containers.

        One path for a family with one container, else the list in computation order; `prefix` locates the
        net inside a larger module (e.g. "net." inside a LightningModule).
        """
        paths = [f"{prefix}{path}" for path in self.blocks]
        return paths[0] if len(paths) == 1 else paths

    def block_counts(self, net: nn.Module) -> list[int]:
        """The length of every block container of `net`, in computation order."""
        return [len(net.get_submodule(path)) for path in self.blocks]

    def block_streams(self, container_index: int) -> BlockStreams | None:
        """The streams of the blocks in container `container_index`; None for blocks with one hidden state."""
        return None

    def shared_input_linears(self, block: nn.Module) -> list[tuple[str, ...]]:
        """Names under `block` of Linear layers that its forward always calls on one tensor, one tuple per group.

        The LoRA weight update shares the products of each group (tinyfusion_pl.pruning.lora.SharedInputLoRA),
        with the same outputs and gradients as separate layers. None here: DiT's qkv is one Linear already.
        """
        return []

    def required_blocks(self, net: nn.Module) -> tuple[int, ...]:
        """Global indices of blocks that every exportable decision keeps (check_kept_blocks says why)."""
        return ()

    def check_kept_blocks(self, net: nn.Module, kept_blocks: Sequence[int]) -> None:
        """Refuse, with the reason, a decision (global indices in computation order) that cannot be exported."""

    def after_depth_change(self, net: nn.Module, block_counts: Sequence[int]) -> None:
        """Record new container lengths where the model keeps its depth (e.g. a diffusers config); DiT needs nothing."""

    def at_depth(self, net: nn.Module, block_counts: Sequence[int]) -> nn.Module:
        """A freshly initialised model like `net` but with `block_counts` blocks in its containers."""
        if len(block_counts) != len(self.blocks):
            raise ValueError(f"block_counts={list(block_counts)} gives {len(block_counts)} lengths for the "
                             f"{len(self.blocks)} block containers {list(self.blocks)} of the {self.name} family.")
        return self.build(**{**self.architecture(net), **dict(zip(self.depth_arguments, block_counts, strict=True))})

    def checkpoint_block_counts(self, state_dict: Mapping[str, torch.Tensor]) -> list[int]:
        """The length of every block container that a state dict of this family holds weights for."""
        counts = []
        for path in self.blocks:
            pattern = re.compile(re.escape(path) + r"\.(\d+)\.")
            indices = {int(match.group(1)) for key in state_dict if (match := pattern.match(key))}
            counts.append(max(indices) + 1 if indices else 0)
        return counts

    # ---------------------------------------------------------------- conditioning
    def num_classes(self, net: nn.Module) -> int | None:
        """Number of classes of a class-conditional net, None for an unconditional one."""
        return None if self.label_argument is None else int(net.num_classes)

    def null_label(self, net: nn.Module) -> int:
        """The label that means "no class" (classifier-free guidance's unconditional branch)."""
        return int(net.num_classes)

    def label_dropout(self, net: nn.Module) -> float:
        """The probability with which the net drops a label during training (0 when it never does)."""
        return 0.0

    def condition(self, labels: torch.Tensor | None, drop: torch.Tensor | None = None) -> dict[str, Any]:
        """The keyword arguments that condition the net on `labels`, dropping those where `drop` is 1."""
        if self.label_argument is None or labels is None:
            return {}
        condition: dict[str, Any] = {self.label_argument: labels}
        if drop is not None and self.label_drop_argument is not None:
            condition[self.label_drop_argument] = drop
        return condition

    # ---------------------------------------------------------------- saving and loading
    def checkpoint_name(self, stem: str) -> str:
        """The name `save` gives a checkpoint called `stem` in a folder: a .pt file here (a folder for diffusers)."""
        return f"{stem}.pt"

    def load_state_dict(self, net: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load strictly, or raise CheckpointMismatchError naming the missing, unexpected and misshapen keys."""
        load_dit_state_dict(net, state_dict)

    def save(self, net: nn.Module, path: str | os.PathLike) -> Path:
        """Write the net in its family's own checkpoint format (here: a plain state dict), atomically."""
        return save_torch(net.state_dict(), path)

    def load(self, checkpoint: str | os.PathLike | Mapping[str, Any], like: nn.Module, prefer: str = "ema") -> nn.Module:
        """The checkpoint's weights in a model built like `like` at the checkpoint's own depth, loaded strictly.

        Any layout `extract_state_dict` reads: a plain state dict, {'model', 'ema'} (EMA preferred by
        default) or a Lightning checkpoint. `like` supplies everything but the depth; it is not modified.
        """
        loaded = load_checkpoint_file(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
        state_dict = extract_state_dict(loaded, prefer=prefer)
        counts = self.checkpoint_block_counts(state_dict)
        net = self.at_depth(like, counts)
        self.load_state_dict(net, state_dict)
        return net
