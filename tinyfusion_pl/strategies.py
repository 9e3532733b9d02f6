"""Strategies for the `trainer` group: factories Hydra configs can name (YAML cannot spell a set of module classes),
Lightning's DDP and FSDP2 strategies with what this project needs of them, and FSDP2's shard units per family."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed
import torch.nn as nn
from hydra.utils import get_class
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

from tinyfusion_pl.families import find_family
from tinyfusion_pl.io import atomic_folder


class FrozenModelDDPStrategy(DDPStrategy):
    """Lightning's DDPStrategy, except that a model none of whose parameters train stays unwrapped.

    torch's DistributedDataParallel refuses such a model, yet a prune with pruning.weight_update=frozen trains only
    the mask's gate logits, which live in the callback and average their own gradients over the ranks.
    """

    def configure_ddp(self) -> None:
        if any(parameter.requires_grad for parameter in self.model.parameters()):
            super().configure_ddp()


def ddp_strategy(**kwargs: Any) -> DDPStrategy:
    """trainer=ddp: Lightning's DDP (keyword arguments as DDPStrategy's), which also runs a model that trains nothing."""
    return FrozenModelDDPStrategy(**kwargs)


def family_block_classes(root: nn.Module) -> tuple[type[nn.Module], ...]:
    """The classes of the blocks of every model under `root` that a family describes."""
    classes: set[type[nn.Module]] = set()
    for module in root.modules():
        family = find_family(module)
        if family is not None:
            for path in family.blocks:
                classes.update(type(block) for block in module.get_submodule(path))
    if not classes:
        raise ValueError(
            f"no model family describes a model inside {type(root).__name__}, so FSDP cannot tell its blocks: "
            "pass trainer.strategy.wrap_blocks=[dotted.path.of.YourBlock]."
        )
    return tuple(classes)


class FamilyBlockWrapPolicy:
    """FSDP auto-wrap policy: one shard unit per transformer block of the model's family.

    The block classes are read from the model itself when FSDP first calls the policy (on the root module),
    so one trainer config serves every family.
    """

    def __init__(self) -> None:
        self.block_classes: tuple[type[nn.Module], ...] | None = None

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        if self.block_classes is None:
            self.block_classes = family_block_classes(module)
        return True if recurse else isinstance(module, self.block_classes)


def fsdp_strategy(
    wrap_blocks: Sequence[str] | None = None,
    activation_checkpointing: bool = False,
    sharding_strategy: str = "FULL_SHARD",
    state_dict_type: str = "full",
) -> FSDPStrategy:
    """FSDP that shards each transformer block on its own: the family's blocks, or the `wrap_blocks` classes."""
    if wrap_blocks is None:
        wrap_policy, checkpoint_policy = FamilyBlockWrapPolicy(), FamilyBlockWrapPolicy()
    else:
        wrap_policy = checkpoint_policy = {get_class(path) for path in wrap_blocks}
    return FSDPStrategy(
        auto_wrap_policy=wrap_policy,
        activation_checkpointing_policy=checkpoint_policy if activation_checkpointing else None,
        sharding_strategy=sharding_strategy,
        state_dict_type=state_dict_type,
    )


@contextmanager
def model_groups_only(optimizer: torch.optim.Optimizer, model: nn.Module) -> Iterator[None]:
    """Hide the parameter groups of `optimizer` that hold no parameter of `model`, and their state, for a while.

    torch's distributed optimizer state names every parameter by its place in the model, so a group of parameters
    that live elsewhere (DifferentiableBlockMask's gate logits, kept in the callback) cannot pass through it; the
    callback saves and restores that group's state itself.
    """
    inside = {id(parameter) for parameter in model.parameters()}
    outside = [group for group in optimizer.param_groups if not any(id(p) in inside for p in group["params"])]
    if not outside:
        yield
        return
    hidden_state = {p: optimizer.state.pop(p) for group in outside for p in group["params"] if p in optimizer.state}
    optimizer.param_groups = [group for group in optimizer.param_groups if all(group is not o for o in outside)]
    try:
        yield
    finally:  # after a load, param_groups and state are the loaded ones: the hidden groups go back at the end
        optimizer.param_groups.extend(outside)
        optimizer.state.update(hidden_state)


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy whose checkpoints also hold optimizers with parameters outside the model
    (the mask's gate group), and whose sharded checkpoint folders replace the previous one atomically."""

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        with model_groups_only(getattr(optimizer, "_optimizer", optimizer), self.model):  # LightningOptimizer
            return super().optimizer_state(optimizer)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        with ExitStack() as hidden:
            for optimizer in self.optimizers:
                hidden.enter_context(model_groups_only(optimizer, self.model))
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:  # one file, gathered on rank zero and written by checkpoint_io
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        # Every rank writes its shard into one temporary folder; rank zero then puts it in place of the last one,
        # so a kill while writing leaves the previous checkpoint whole (the next run removes the stray folder).
        path = Path(self.broadcast(filepath))
        with ExitStack() as stack:
            temporary = stack.enter_context(atomic_folder(path)) if self.is_global_zero else None
            temporary = self.broadcast(temporary)
            super().save_checkpoint(checkpoint, temporary, storage_options)
            self.barrier("tinyfusion_sharded_checkpoint_written")
        self.barrier("tinyfusion_sharded_checkpoint_in_place")


def fsdp2_strategy(**kwargs) -> FSDP2Strategy:
    """FSDP2 through Lightning's ModelParallelStrategy: every process holds one data-parallel shard (no tensor
    parallelism). The modules shard themselves in `configure_model` (DiffusionModule: one unit per block of the
    model's family, see shard_family_blocks). train.py starts the processes before any Trainer is built, so their
    number is known here."""
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    processes = torch.distributed.get_world_size() if initialized else 1
    return FSDP2Strategy(data_parallel_size=processes, tensor_parallel_size=1, **kwargs)


def shard_family_blocks(root: nn.Module, mesh: torch.distributed.device_mesh.DeviceMesh) -> None:
    """FSDP2 (`fully_shard`) on every block of every model under `root` that a family describes, on the submodules
    its objective calls on their own, then on `root`; the methods the objective calls on a sharded model gather its
    weights as its forward does.

    A block is one shard unit whatever its parameters need: frozen bases and trainable adapters (LoRA) sit in
    the same unit, as FSDP2 shards each parameter on its own.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    described = [(module, family) for module in root.modules() if (family := find_family(module)) is not None]
    blocks = [block for module, family in described for path in family.blocks for block in module.get_submodule(path)]
    if not blocks:
        raise ValueError(f"no model family describes a model inside {type(root).__name__}, so FSDP2 cannot tell its "
                         "blocks: describe it (tinyfusion_pl.families) or use trainer=ddp.")
    called = [module.get_submodule(path) for module, family in described for path in family.called_submodules]
    units: dict[int, nn.Module] = {}  # an adapter and the model it wraps describe the same blocks: shard them once
    for unit in [*shared_by_blocks(blocks), *blocks, *called]:
        units.setdefault(id(unit), unit)
    for unit in units.values():
        fully_shard(unit, mesh=mesh)
    fully_shard(root, mesh=mesh)
    for module, family in described:
        for method in family.called_methods:
            register_fsdp_forward_method(module, method)  # a no-op on a module that is no shard unit


def shared_by_blocks(blocks: list[nn.Module]) -> list[nn.Module]:
    """The outermost submodules that several blocks hold (the embedder every block of diffusers' DiT shares).

    A parameter can belong to one shard unit only, so such a module becomes a unit of its own, sharded before the
    blocks that call it.
    """
    holders: dict[int, set[int]] = {}
    for block in {id(block): block for block in blocks}.values():
        for module in block.modules():
            if module is not block:
                holders.setdefault(id(module), set()).add(id(block))
    shared, inside_shared = {}, set()
    for block in blocks:
        for name, module in block.named_modules():
            if not name or any(name.startswith(prefix) for prefix in inside_shared) or len(holders[id(module)]) < 2:
                continue
            shared.setdefault(id(module), module)
            inside_shared.add(name + ".")
        inside_shared.clear()
    return list(shared.values())
