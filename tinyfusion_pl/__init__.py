"""TinyFusion learnable depth pruning for diffusion transformers, as PyTorch Lightning callbacks.

The names below load on first use, so `import tinyfusion_pl.models` or `tinyfusion_pl.objectives` does not
pull in Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the module that defines it.
_EXPORTS = {
    "CoOptimizedWeightUpdate": "tinyfusion_pl.callbacks",
    "DifferentiableBlockMask": "tinyfusion_pl.callbacks",
    "DistillationModule": "tinyfusion_pl.distill",
    "DiT": "tinyfusion_pl.models",
    "DiT_models": "tinyfusion_pl.models",
    "build_dit": "tinyfusion_pl.models",
    "dit_from_checkpoint": "tinyfusion_pl.models",
    "DiffusionModule": "tinyfusion_pl.module",
    "DiffusionObjective": "tinyfusion_pl.objectives",
    "GaussianDiffusion": "tinyfusion_pl.objectives",
    "ModelFamily": "tinyfusion_pl.families",
    "family_of": "tinyfusion_pl.families",
    "prune_blocks": "tinyfusion_pl.pruning",
    "UsageError": "tinyfusion_pl.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tinyfusion_pl' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
