"""ResumableDataLoader: a shuffling DataLoader whose place in the data goes into Lightning checkpoints."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from tinyfusion_pl.distributed import data_parallel_share


def _derived_seed(*values: int) -> int:
    """A 63-bit seed that depends only on `values` (NumPy's SeedSequence mixing)."""
    return int(np.random.SeedSequence(list(values)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def training_share(trainer: L.Trainer | None) -> tuple[int, int]:
    """(replicas, rank): this process's place in the data-parallel fit `trainer` is running; (1, 0) otherwise.

    A datamodule asks when Lightning asks it for the training loader. Outside a running fit (a loader for
    calibration after training, or for checking the data first) every process gets the whole order.
    """
    if trainer is None or trainer.state.fn != TrainerFn.FITTING or trainer.state.status != TrainerStatus.RUNNING:
        return 1, 0
    return data_parallel_share(trainer)


class PassPermutation(Sampler[int]):
    """Every index once per pass, in an order drawn from (seed, pass) alone; a pass can start part-way."""

    def __init__(self, length: int, seed: int) -> None:
        self.length = length
        self.seed = seed
        self.pass_index = 0
        self.start = 0  # indices of this pass already handed out

    @property
    def samples_per_pass(self) -> int:
        return self.length

    def __len__(self) -> int:
        return self.samples_per_pass - self.start

    def pass_order(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(_derived_seed(self.seed, self.pass_index))
        return torch.randperm(self.length, generator=generator)

    def __iter__(self) -> Iterator[int]:
        yield from self.pass_order()[self.start:].tolist()


class PassPermutationShare(PassPermutation, DistributedSampler):
    """One rank's share of a PassPermutation: of the pass's order, places rank, rank + replicas, ... (the samples
    left after an equal share each are left out of the pass).

    Taken in batches of b, the ranks' k-th batches together hold places k * replicas * b onwards of the order, the
    k-th batch of one process with batches of replicas * b: data-parallel training sees the data as that process.
    A DistributedSampler so that Lightning leaves it in place instead of wrapping it in another one.
    """

    def __init__(self, length: int, seed: int, replicas: int, rank: int) -> None:
        if not 0 <= rank < replicas:
            raise ValueError(f"rank {rank} is not one of the {replicas} ranks.")
        if length < replicas:
            raise ValueError(f"{length} samples cannot give each of {replicas} ranks one.")
        PassPermutation.__init__(self, length, seed)
        self.num_replicas, self.rank = replicas, rank

    @property
    def samples_per_pass(self) -> int:
        return self.length // self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Lightning's call at each epoch; the pass is ResumableDataLoader's to set (it survives a resume)."""

    def __iter__(self) -> Iterator[int]:
        share = self.pass_order()[self.rank::self.num_replicas][:self.samples_per_pass]
        yield from share[self.start:].tolist()


class ResumableDataLoader(DataLoader):
    """A DataLoader that can continue a pass over the data where a checkpoint left it.

    With shuffle=True the order of pass p is a permutation drawn from (seed, p) by its own generator, never from
    torch's global one, and `state_dict()` records the pass and how many batches of it were handed out. Lightning
    saves the state of such a loader in every checkpoint and loads it when a run resumes, so a run resumed in the
    middle of a pass continues with the batch that came next, and the global random state (timesteps, noise) stays
    the training's alone. A sampler given from outside (e.g. Lightning's DistributedSampler under DDP) orders the
    data instead; its pass is set with `set_epoch` and a resumed pass skips the batches already seen.

    Args:
        seed: seed of the shuffling; None draws one from torch's global generator when the loader is made (so
            `L.seed_everything` fixes it). A resumed run takes the checkpoint's.
        share: (replicas, rank) for data-parallel training: with shuffle=True this rank gets its share of the
            same order (`PassPermutationShare`), so that `replicas` ranks with batch b see the batches of one
            process with batch replicas * b. Default (1, 0): the whole order.
        The rest are DataLoader's arguments.
    """

    def __init__(self, dataset: Dataset, batch_size: int | None = 1, shuffle: bool | None = None,
                 sampler: Sampler | None = None, seed: int | None = None, share: tuple[int, int] = (1, 0),
                 **kwargs: Any) -> None:
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        self.seed = seed
        self.pass_index = 0
        self.position = 0  # batches of this pass handed out
        if shuffle and sampler is None:
            replicas, rank = share
            sampler = (PassPermutation(len(dataset), seed) if replicas == 1
                       else PassPermutationShare(len(dataset), seed, replicas, rank))
            shuffle = None
        # The workers' base seed is drawn from the loader's own generator, which is reseeded for every pass.
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, **kwargs)

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "pass": self.pass_index, "position": self.position}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.seed = state_dict.get("seed", self.seed)
        self.pass_index = state_dict.get("pass", self.pass_index)
        self.position = state_dict.get("position", self.position)

    def _batches_per_pass(self) -> int:
        samples = self.sampler.samples_per_pass if isinstance(self.sampler, PassPermutation) else len(self.sampler)
        if self.batch_size is None:  # no batching: one sample a step
            return samples
        count, remainder = divmod(samples, self.batch_size)
        return count + (0 if self.drop_last or remainder == 0 else 1)

    def __len__(self) -> int:
        return self._batches_per_pass()

    def __iter__(self) -> Iterator[Any]:
        if self.position >= self._batches_per_pass():  # the last pass was handed out whole: start the next
            self.pass_index, self.position = self.pass_index + 1, 0
        self.generator.manual_seed(_derived_seed(self.seed, self.pass_index, 1))
        skip = self.position
        if isinstance(self.sampler, PassPermutation):
            self.sampler.seed, self.sampler.pass_index = self.seed, self.pass_index
            self.sampler.start = skip * (self.batch_size or 1)
            skip = 0
        elif hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(self.pass_index)
        iterator = super().__iter__()
        for _ in range(skip):  # a foreign sampler cannot start part-way: draw the seen batches and drop them
            next(iterator)
        for batch in iterator:
            self.position += 1
            yield batch
