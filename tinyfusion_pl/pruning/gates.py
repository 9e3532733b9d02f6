"""Learnable per-group gate logits over N:M keep-options, sampled with hard Gumbel-softmax."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyfusion_pl.pruning.patterns import Group, enumerate_options, group_starts, required_blocks_problem

Schedule = float | tuple[float, float]


def linear_schedule(value: Schedule, progress: float) -> float:
    """`value` itself when constant, else start + (end - start) * progress with progress clipped to [0, 1]."""
    if isinstance(value, (int, float)):
        return float(value)
    start, end = value
    progress = min(max(progress, 0.0), 1.0)
    return float(start) + (float(end) - float(start)) * progress


def gumbel_noise(shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """Standard Gumbel(0, 1) samples on the generator's device, float32."""
    uniform = torch.rand(tuple(shape), generator=generator, device=generator.device)
    tiny = torch.finfo(uniform.dtype).tiny
    return -torch.log(-torch.log(uniform.clamp(min=tiny, max=1.0 - 1e-7)))


def straight_through_gumbel(
    logits: torch.Tensor, noise: torch.Tensor, scaling: float, tau: float
) -> torch.Tensor:
    """Exact one-hot of argmax(scaling * logits + noise) per row; gradients of softmax((scaling * logits + noise) / tau)."""
    scores = (scaling * logits + noise) / tau  # (B, K)
    soft = scores.softmax(dim=-1)  # (B, K)
    hard = F.one_hot(scores.argmax(dim=-1), num_classes=scores.shape[-1]).to(soft.dtype)  # (B, K)
    # soft - soft.detach() is exactly zero in the forward pass, so the output stays an exact one-hot.
    return hard + (soft - soft.detach())


class BlockGates(nn.Module):
    """One learnable logit per admissible keep-option of every group, their EMA, and the decision the EMA makes.

    An option is admissible when it keeps every one of `required_blocks` (global indices) that lies in its
    group; without required blocks every C(M, N) option is. Options are numbered by their position among
    all C(M, N) options of the group in lexicographic order (`enumerate_options`), whatever the requirement,
    so decisions, histories and saved states compare across requirements.
    """

    def __init__(self, groups: Sequence[Group], init_logit: float = 0.02, required_blocks: Sequence[int] = ()) -> None:
        super().__init__()
        self.groups = [tuple(group) for group in groups]
        problem = required_blocks_problem(self.groups, required_blocks)
        if problem is not None:
            raise ValueError(f"required_blocks={sorted(required_blocks)}: {problem}.")
        self.required_blocks = tuple(sorted(set(required_blocks)))
        self.init_logit = float(init_logit)
        self.starts = group_starts(self.groups)
        self.depth = sum(size for _, size in self.groups)
        # Per group, every C(M, N) option (for reading any option number back) and the numbers of the admissible ones.
        self.all_options = [enumerate_options(keep, size) for keep, size in self.groups]
        option_ids = []
        for start, table in zip(self.starts, self.all_options, strict=True):
            offsets = [block - start for block in self.required_blocks if start <= block < start + table.shape[1]]
            option_ids.append(table[:, offsets].all(dim=1).nonzero().flatten())
        self.gate_logits = nn.ParameterList(
            nn.Parameter(torch.full((len(ids),), self.init_logit)) for ids in option_ids
        )
        for index, (table, ids) in enumerate(zip(self.all_options, option_ids, strict=True)):
            self.register_buffer(f"options_{index}", table[ids], persistent=False)
            self.register_buffer(f"option_ids_{index}", ids, persistent=False)
            self.register_buffer(f"ema_logits_{index}", torch.full((len(ids),), self.init_logit))

    @property
    def option_tables(self) -> list[torch.Tensor]:
        """Per group, the (C, M) table of 0/1 keep-masks, one row per admissible option."""
        return [getattr(self, f"options_{index}") for index in range(len(self.groups))]

    @property
    def option_ids(self) -> list[torch.Tensor]:
        """Per group, (C,) the number of every admissible option among all C(M, N) options of the group."""
        return [getattr(self, f"option_ids_{index}") for index in range(len(self.groups))]

    @property
    def ema_logits(self) -> list[torch.Tensor]:
        """Per group, the exponential moving average of the gate logits."""
        return [getattr(self, f"ema_logits_{index}") for index in range(len(self.groups))]

    @property
    def option_counts(self) -> list[int]:
        """Number of admissible options of every group (C(M, N) without required blocks)."""
        return [len(logits) for logits in self.gate_logits]

    def draw_noise(self, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
        """Per group, (B, C) Gumbel noise for one per-sample draw."""
        return [gumbel_noise((batch_size, count), generator) for count in self.option_counts]

    def sample_masks(self, noise: Sequence[torch.Tensor], scaling: float, tau: float) -> torch.Tensor:
        """Hard per-sample block masks (B, L) with straight-through gradients to the gate logits."""
        masks = []
        for logits, table, group_noise in zip(self.gate_logits, self.option_tables, noise, strict=True):
            choice = straight_through_gumbel(logits, group_noise.to(logits.device), scaling, tau)  # (B, C)
            masks.append(choice @ table)  # (B, M)
        return torch.cat(masks, dim=1)  # (B, L)

    @torch.no_grad()
    def sample_choices(self, noise: Sequence[torch.Tensor], scaling: float) -> list[torch.Tensor]:
        """Per group, (B,) the admissible option argmax(scaling * logits + noise) picks: a draw from softmax(scaling * logits).

        The same options `sample_masks` picks from the same noise (its temperature shapes only gradients).
        """
        return [(scaling * logits + group_noise.to(logits.device)).argmax(dim=-1)
                for logits, group_noise in zip(self.gate_logits, noise, strict=True)]

    def masks_of(self, choices: Sequence[torch.Tensor]) -> torch.Tensor:
        """Hard block masks (B, L) of per-group option picks (positions among the admissible options), no gradient."""
        return torch.cat([table[choice] for table, choice in zip(self.option_tables, choices, strict=True)], dim=1)

    @torch.no_grad()
    def score_function_gradients(
        self, choices: Sequence[torch.Tensor], advantages: torch.Tensor, scaling: float
    ) -> list[torch.Tensor]:
        """Per group, the REINFORCE estimate of d E[loss] / d logits from per-sample picks and their advantages.

        With p = softmax(scaling * logits), d log p[c] / d logits = scaling * (onehot(c) - p); the estimate is
        the mean over samples of advantage * scaling * (onehot(c) - p), the advantage being a sample's loss
        minus a baseline that does not depend on its pick.
        """
        gradients = []
        for logits, choice in zip(self.gate_logits, choices, strict=True):
            probabilities = (scaling * logits.float()).softmax(dim=0)  # (C,)
            picks = F.one_hot(choice, num_classes=len(logits)).to(probabilities.dtype)  # (B, C)
            weights = advantages.to(probabilities)[:, None]  # (B, 1)
            gradients.append((scaling * weights * (picks - probabilities)).mean(dim=0).to(logits.dtype))
        return gradients

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        """ema <- decay * ema + (1 - decay) * logits, for every group."""
        for ema, logits in zip(self.ema_logits, self.gate_logits, strict=True):
            ema.lerp_(logits.detach(), 1.0 - decay)

    @torch.no_grad()
    def chosen_options(self) -> torch.Tensor:
        """(G,) number of the option with the largest EMA logit in every group (ties: the first), among all C(M, N)."""
        return torch.stack([ids[ema.argmax()] for ids, ema in zip(self.option_ids, self.ema_logits, strict=True)])

    @torch.no_grad()
    def confidences(self, scaling: float) -> list[float]:
        """Per group, the probability that a hard Gumbel draw picks the decided option: softmax(scaling * ema)[argmax]."""
        return [float((scaling * ema.float()).softmax(dim=0).max()) for ema in self.ema_logits]

    def kept_by_group(self, chosen: Sequence[int] | None = None) -> list[list[int]]:
        """Per group, the global indices of the blocks its chosen option (a number among all C(M, N)) keeps."""
        chosen = self.chosen_options().tolist() if chosen is None else list(chosen)
        kept = []
        for start, table, option in zip(self.starts, self.all_options, chosen, strict=True):
            kept.append([start + int(offset) for offset in table[option].nonzero().flatten().tolist()])
        return kept

    def kept_blocks(self) -> list[int]:
        """Sorted global indices of the blocks the current EMA decision keeps."""
        return [index for group in self.kept_by_group() for index in group]

    # ------------------------------------------------------------------ states over all options

    @torch.no_grad()
    def full_logits(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per group, the gate logits and their EMA over all C(M, N) options, -inf at the inadmissible ones (CPU)."""
        full: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        for table, ids, logits, ema in zip(self.all_options, self.option_ids, self.gate_logits, self.ema_logits,
                                           strict=True):
            for target, values in zip(full, (logits, ema), strict=True):
                spread = torch.full((len(table),), -math.inf, dtype=values.dtype)
                spread[ids.cpu()] = values.detach().cpu()
                target.append(spread)
        return full

    @torch.no_grad()
    def load_full_logits(
        self, gate_logits: Sequence[torch.Tensor] = (), ema_logits: Sequence[torch.Tensor] = ()
    ) -> None:
        """Take each admissible option's logit and EMA from per-group values over all C(M, N) options.

        Options that are -inf there (inadmissible where they were saved) keep their current values; groups
        missing from the lists are left alone.
        """
        for group, (ids, logits, ema) in enumerate(zip(self.option_ids, self.gate_logits, self.ema_logits,
                                                        strict=True)):
            for target, saved in ((logits, gate_logits), (ema, ema_logits)):
                if group >= len(saved):
                    continue
                values = torch.as_tensor(saved[group])
                if values.shape != (len(self.all_options[group]),):
                    raise ValueError(
                        f"group {group} {list(self.groups[group])} has {len(self.all_options[group])} options, but "
                        f"the saved logits hold {tuple(values.shape)} values; save and load with the same pattern."
                    )
                values = values[ids.cpu()].to(target.device, target.dtype)
                learned = torch.isfinite(values)
                target[learned] = values[learned]

    def with_required_blocks(self, required_blocks: Sequence[int]) -> BlockGates:
        """Gates over the same groups whose options keep `required_blocks`; options both admit keep their logits."""
        gates = BlockGates(self.groups, self.init_logit, required_blocks).to(self.gate_logits[0].device)
        gates.load_full_logits(*self.full_logits())
        return gates
