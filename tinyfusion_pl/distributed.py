"""The processes of a multi-device run: started once through Lightning, agreeing through Lightning's strategy.

`start_processes` starts them before any stage runs (Lightning's launcher re-runs `python train.py ...` once per
further local rank, or joins the ranks that torchrun or SLURM started), so every rank runs the same stages in
step and each `trainer.fit` joins the same process group. Work that must happen once (files, reports, W&B runs,
timing) runs on global rank zero through `on_rank_zero`; the others wait for it and receive its result, and an
error there stops every rank instead of leaving them waiting. A single process runs everything itself.
"""

from __future__ import annotations

import atexit
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed
from lightning.fabric import Fabric
from lightning.fabric.strategies import Strategy

Result = TypeVar("Result")

_strategy: Strategy | None = None  # the strategy of the launched processes (start_processes)


def start_processes(accelerator: str, devices: int | str | list[int], num_nodes: int = 1) -> Strategy | None:
    """Start (or join) the processes of a data-parallel run and its process group; None for a single process.

    Lightning Fabric's DDP launcher does it: the same processes and process group then serve every Trainer of
    the run (a Trainer finds the group initialised and the ranks created, so it starts no others).
    """
    global _strategy
    if _strategy is not None:
        return _strategy
    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy="ddp")
    if fabric.world_size == 1:
        return None
    fabric.launch()
    _strategy = fabric.strategy
    atexit.register(_end_process_group)
    return _strategy


def _end_process_group() -> None:
    """Destroy the process group while the interpreter is whole: gloo's worker threads, left to the interpreter's
    own teardown, can abort the process at exit ("terminate called without an active exception")."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def stop_launched_ranks() -> None:
    """Kill the ranks this process launched (Lightning re-ran the script for them), when this one fails alone.

    Without it they would wait in their next collective for the process group's timeout (NCCL: minutes; gloo
    notices the closed connection at once). Ranks that torchrun or SLURM started are ended by them instead.
    """
    launcher = getattr(_strategy, "launcher", None)
    for process in getattr(launcher, "procs", []):
        if process.poll() is None:
            process.kill()


def strategy() -> Strategy | None:
    """The strategy of the launched processes while their process group lives, else None (one process)."""
    if _strategy is None or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    return _strategy


def global_rank() -> int:
    processes = strategy()
    return 0 if processes is None else processes.global_rank


def world_size() -> int:
    processes = strategy()
    return 1 if processes is None else processes.world_size


def on_rank_zero(function: Callable[..., Result], *args: Any, **kwargs: Any) -> Result:
    """`function(*args, **kwargs)` on global rank zero only; every rank waits for it and returns its result.

    The result travels to the other ranks pickled: return paths, numbers and dicts, not models. An error on
    rank zero is raised there and, as a RuntimeError naming it, on every other rank.
    """
    processes = strategy()
    if processes is None:
        return function(*args, **kwargs)
    outcome: tuple[bool, Any] | None = None
    error: BaseException | None = None
    if processes.is_global_zero:
        try:
            outcome = (True, function(*args, **kwargs))
        except BaseException as raised:  # noqa: B036 - re-raised below, after the other ranks heard of it
            error = raised
            outcome = (False, f"{type(raised).__name__}: {raised}")
    succeeded, value = processes.broadcast(outcome, src=0)
    if error is not None:
        raise error
    if not succeeded:
        raise RuntimeError(f"global rank zero failed while the other ranks waited for it: {value}")
    return value


def rank_zero_first(function: Callable[..., Result], *args: Any, **kwargs: Any) -> Result:
    """`function` on rank zero first (e.g. filling a cache), then on the other ranks (finding it filled)."""
    made: list[Result] = []
    on_rank_zero(lambda: made.append(function(*args, **kwargs)))
    return made[0] if made else function(*args, **kwargs)


def check_same_on_every_rank(value: Any, what: str) -> None:
    """Raise on every rank when `value` (compared with ==) is not the same on all of them."""
    processes = strategy()
    if processes is None:
        return
    reference = processes.broadcast(value, src=0)
    differs = torch.tensor(float(value != reference), device=processes.root_device)
    if processes.all_reduce(differs, reduce_op="sum").item() > 0:
        raise RuntimeError(
            f"{what} is not the same on every rank (rank 0: {reference!r}; rank {processes.global_rank}: {value!r}). "
            "Every rank must decide alike: the run stops here, before anything is exported."
        )


def share(count: int, unit: int) -> tuple[int, int]:
    """The items [start, stop) of `count` that this rank takes, in whole units of `unit` items (e.g. batches).

    Units go to the ranks in order, as evenly as they divide; concatenating the ranks' shares in rank order gives
    the items in order.
    """
    units = -(-count // unit)
    ranks, rank = world_size(), global_rank()
    first, last = rank * units // ranks, (rank + 1) * units // ranks
    return min(first * unit, count), min(last * unit, count)


def gather_shares(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """Every rank's `tensor` (its share along dim 0, None for none) concatenated in rank order, on every rank."""
    processes = strategy()
    if processes is None:
        return tensor
    device = processes.root_device
    length = torch.tensor([0 if tensor is None else len(tensor)], device=device)
    lengths = processes.all_gather(length).view(-1).tolist()
    # shape and dtype from a rank that has a share (the others may have none)
    holder = max(range(len(lengths)), key=lambda rank: lengths[rank])
    described = None if tensor is None else (tuple(tensor.shape[1:]), tensor.dtype)
    shape, dtype = processes.broadcast(described, src=holder)
    padded = torch.zeros((max(lengths), *shape), dtype=dtype, device=device)
    if tensor is not None:
        padded[: len(tensor)] = tensor.to(device)
    gathered = processes.all_gather(padded).cpu()  # (world size, longest share, ...)
    return torch.cat([gathered[rank, :count] for rank, count in enumerate(lengths)])


def data_parallel_share(trainer: Any) -> tuple[int, int]:
    """(replicas, rank): the place of this process among the data-parallel ranks of a Lightning `trainer`;
    (1, 0) for None or a single device. Loaders deal out, and training steps draw, by it."""
    placement = None if trainer is None else trainer.distributed_sampler_kwargs  # None for a single device
    return (1, 0) if not placement else (placement["num_replicas"], placement["rank"])
