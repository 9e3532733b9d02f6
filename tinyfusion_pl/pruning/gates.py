"""Learnable per-group gate logits over N:M keep-options, sampled with hard Gumbel-softmax."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyfusion_pl.pruning.patterns import Group, enumerate_options, group_starts

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
    """One learnable logit per keep-option of every group, their EMA, and the decision the EMA makes."""

    def __init__(self, groups: Sequence[Group], init_logit: float = 0.02) -> None:
        super().__init__()
        self.groups = [tuple(group) for group in groups]
        self.starts = group_starts(self.groups)
        self.depth = sum(size for _, size in self.groups)
        option_tables = [enumerate_options(keep, size) for keep, size in self.groups]
        self.gate_logits = nn.ParameterList(
            nn.Parameter(torch.full((len(table),), float(init_logit))) for table in option_tables
        )
        for index, table in enumerate(option_tables):
            self.register_buffer(f"options_{index}", table, persistent=False)
            self.register_buffer(f"ema_logits_{index}", torch.full((len(table),), float(init_logit)))

    @property
    def option_tables(self) -> list[torch.Tensor]:
        """Per group, the (C, M) table of 0/1 keep-masks, one row per option."""
        return [getattr(self, f"options_{index}") for index in range(len(self.groups))]

    @property
    def ema_logits(self) -> list[torch.Tensor]:
        """Per group, the exponential moving average of the gate logits."""
        return [getattr(self, f"ema_logits_{index}") for index in range(len(self.groups))]

    @property
    def option_counts(self) -> list[int]:
        """Number of options C(M, N) of every group."""
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
    def update_ema(self, decay: float) -> None:
        """ema <- decay * ema + (1 - decay) * logits, for every group."""
        for ema, logits in zip(self.ema_logits, self.gate_logits, strict=True):
            ema.lerp_(logits.detach(), 1.0 - decay)

    @torch.no_grad()
    def chosen_options(self) -> torch.Tensor:
        """(G,) index of the option with the largest EMA logit in every group (ties: the first)."""
        return torch.stack([ema.argmax() for ema in self.ema_logits])

    @torch.no_grad()
    def confidences(self, scaling: float) -> list[float]:
        """Per group, the probability that a hard Gumbel draw picks the decided option: softmax(scaling * ema)[argmax]."""
        return [float((scaling * ema.float()).softmax(dim=0).max()) for ema in self.ema_logits]

    def kept_by_group(self, chosen: Sequence[int] | None = None) -> list[list[int]]:
        """Per group, the global indices of the blocks its chosen option keeps."""
        chosen = self.chosen_options().tolist() if chosen is None else list(chosen)
        kept = []
        for start, table, option in zip(self.starts, self.option_tables, chosen, strict=True):
            kept.append([start + int(offset) for offset in table[option].nonzero().flatten().tolist()])
        return kept

    def kept_blocks(self) -> list[int]:
        """Sorted global indices of the blocks the current EMA decision keeps."""
        return [index for group in self.kept_by_group() for index in group]
