"""RandomStateCheckpoint: the global random state of every rank goes into Lightning checkpoints."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback


def random_state() -> dict[str, Any]:
    """The state of torch's (CPU and every CUDA device's), NumPy's and Python's global generators.

    Only tensors and plain Python values, so that a checkpoint holding it loads with torch.load(weights_only=True).
    """
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_random_state(state: dict[str, Any]) -> None:
    """Put back what `random_state` returned (generators it does not name are left alone)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state:
        numpy_state = state["numpy"]
        np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                             numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    if "python" in state:
        random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class RandomStateCheckpoint(Callback):
    """Saves the global random state (torch, CUDA, NumPy, Python) of every rank and restores it on resume.

    Timesteps, noise, label dropout and anything else a training step draws from the global generators then
    continue after a resume exactly as they would have without the interruption. The state is taken when the
    checkpoint is written (after the step) and put back just before the first training batch of the resumed run;
    validation runs with its own copy of the state, so whether it ran between a checkpoint and the next step
    (before the interruption, or again after it) changes nothing for training. The data order is the loader's
    business: use a loader whose position is in the checkpoint (`ResumableDataLoader`). Resumed on another number
    of ranks, every rank takes rank zero's state.

        trainer = L.Trainer(callbacks=[ModelCheckpoint(every_n_train_steps=100, save_last=True), RandomStateCheckpoint()])
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None
        self._outside_validation: dict[str, Any] | None = None
        self._rank, self._world_size = 0, 1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._rank, self._world_size = trainer.global_rank, trainer.world_size

    def state_dict(self) -> dict[str, Any]:
        # Every rank builds the checkpoint (only rank zero writes it), so the states can be gathered here.
        state = random_state()
        if self._world_size > 1 and dist.is_available() and dist.is_initialized():
            ranks: list[Any] = [None] * self._world_size
            dist.all_gather_object(ranks, state)
            return {"ranks": ranks}
        return {"ranks": [state]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ranks = state_dict.get("ranks") or []
        if ranks:
            self._pending = ranks[self._rank] if len(ranks) == self._world_size else ranks[0]

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pending is not None:
            set_random_state(self._pending)
            self._pending = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._outside_validation = random_state()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._outside_validation is not None:
            set_random_state(self._outside_validation)
            self._outside_validation = None
