"""Timestep respacing: which steps of a long diffusion process a shorter sampler keeps (improved DDPM convention)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tinyfusion_pl.errors import UsageError


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> set[int]:
    """Return the kept timesteps of a `num_timesteps` process for improved DDPM's `section_counts` spec.

    "ddimN" keeps range(0, num_timesteps, stride) for the stride that yields exactly N steps.
    Otherwise the process is cut into len(section_counts) near-equal sections ("N" is one section,
    "a,b,c" or [a, b, c] three), and section i keeps section_counts[i] evenly spread steps,
    always including its first and last step.
    """
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise UsageError(f"num_timesteps={num_timesteps!r} is invalid: expected a positive int.")
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        return _ddim_timesteps(num_timesteps, section_counts)
    counts = _parse_section_counts(section_counts)
    return _sectioned_timesteps(num_timesteps, counts)


def _ddim_timesteps(num_timesteps: int, spec: str) -> set[int]:
    """Keep range(0, T, stride) for the stride giving exactly the requested number of steps."""
    desired = spec[len("ddim"):]
    if not desired.isdigit() or int(desired) < 1:
        raise UsageError(
            f"section_counts={spec!r} is invalid: expected 'ddimN' with N a positive integer, e.g. 'ddim25'."
        )
    desired_count = int(desired)
    stride = ddim_stride(num_timesteps, desired_count)
    if stride is not None:
        return set(range(0, num_timesteps, stride))
    raise UsageError(
        f"section_counts={spec!r} is impossible for num_timesteps={num_timesteps}: no integer stride gives "
        f"exactly {desired_count} steps of range(0, {num_timesteps}, stride). Use a plain count such as "
        f"'{desired_count}' (evenly spaced sections) or a ddim count that divides the process evenly."
    )


def ddim_stride(num_timesteps: int, count: int) -> int | None:
    """The smallest stride for which range(0, num_timesteps, stride) has exactly `count` steps, or None."""
    for stride in range(1, num_timesteps + 1):
        if len(range(0, num_timesteps, stride)) == count:
            return stride
    return None


def _parse_section_counts(section_counts: str | int | Sequence[int]) -> list[int]:
    """Turn "N", "a,b,c", N or [a, b, c] into a list of positive ints."""
    hint = "expected a positive int, a string like '250' or '10,15,20', a list of positive ints, or 'ddimN'"
    if isinstance(section_counts, bool):
        raise UsageError(f"section_counts={section_counts!r} is invalid: {hint}.")
    if isinstance(section_counts, int):
        counts = [section_counts]
    elif isinstance(section_counts, str):
        parts = [part.strip() for part in section_counts.split(",")]
        if not all(part.isdigit() for part in parts):
            raise UsageError(f"section_counts={section_counts!r} is invalid: {hint}.")
        counts = [int(part) for part in parts]
    elif isinstance(section_counts, Sequence) and all(
        isinstance(count, int) and not isinstance(count, bool) for count in section_counts
    ):
        counts = list(section_counts)
    else:
        raise UsageError(f"section_counts={section_counts!r} is invalid: {hint}.")
    if not counts or any(count < 1 for count in counts):
        raise UsageError(f"section_counts={section_counts!r} is invalid: {hint}.")
    return counts


def _sectioned_timesteps(num_timesteps: int, counts: list[int]) -> set[int]:
    """Split the process into near-equal sections and spread each section's count over it."""
    base_size, remainder = divmod(num_timesteps, len(counts))
    kept: set[int] = set()
    section_start = 0
    for section, count in enumerate(counts):
        # The first `remainder` sections take one extra step so the sections tile the whole process.
        size = base_size + (1 if section < remainder else 0)
        if count > size:
            raise UsageError(
                f"section_counts={counts} asks for {count} steps in section {section}, which only has "
                f"{size} of the {num_timesteps} timesteps; use at most {size} steps there or fewer sections."
            )
        stride = 1.0 if count == 1 else (size - 1) / (count - 1)
        # Running sum of a fractional stride, rounded: the same float path as improved DDPM, so the
        # kept steps match its checkpoints' samplers bit for bit (ties round half to even).
        position = 0.0
        for _ in range(count):
            kept.add(section_start + round(position))
            position += stride
        section_start += size
    return kept


def respace_betas(alphas_cumprod: torch.Tensor, kept_timesteps: set[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (betas, timestep_map) of the process that keeps only `kept_timesteps`.

    beta_i = 1 - abar_i / abar_prev over the kept steps, so the respaced alphas_cumprod equal the kept
    original ones exactly; timestep_map[i] is the original timestep of respaced step i.
    """
    timestep_map = torch.tensor(sorted(kept_timesteps), dtype=torch.long)
    kept_alphas_cumprod = alphas_cumprod[timestep_map]  # (K,)
    previous = torch.cat([kept_alphas_cumprod.new_ones(1), kept_alphas_cumprod[:-1]])  # (K,)
    return 1.0 - kept_alphas_cumprod / previous, timestep_map
