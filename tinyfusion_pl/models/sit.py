"""Scalable Interpolant Transformer (SiT): DiT's backbone in continuous time, and its size registry.

SiT (willisma/SiT) keeps DiT's blocks and parameter names, so its public checkpoints (SiT-XL-2-256x256.pt)
are plain state dicts with DiT's keys and load into this class strictly. Two things differ from DiT: the
time t is a float in [0, 1] that enters the same sinusoidal embedder unscaled, and with learn_sigma the
sigma half of the output is still computed (the checkpoints hold its weights) but not returned.
Classifier-free guidance is DiT.forward_with_cfg unchanged: by default it guides the first 3 of the
returned channels, as SiT's sampling scripts do for reproducibility.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tinyfusion_pl.models.dit import DiT, build_from_registry, registry_entry

#################################################################################
#                                 Core SiT model                                #
#################################################################################


class SiT(DiT):
    """DiT's backbone predicting from float times t in [0, 1]; parameter names match willisma/SiT."""

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        force_drop_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict (N, in_channels, H, W) from x_t (N, C, H, W), float times t (N,) in [0, 1], labels y (N,).

        The output keeps only the first in_channels channels, so with learn_sigma the sigma half is
        dropped. force_drop_ids works as in DiT.forward.
        """
        output = super().forward(x, t, y, force_drop_ids)  # (N, C_out, H, W), C_out = 2C with learn_sigma
        return output[:, : self.in_channels]  # (N, C, H, W)


#################################################################################
#                                   SiT configs                                 #
#################################################################################


# The same sizes as DiT's registry; kwargs set the data keywords (input_size, in_channels, num_classes,
# learn_sigma, class_dropout_prob) and may override depth.
def SiT_XL_2(**kwargs: Any) -> SiT:
    return registry_entry(SiT, "SiT-XL/2", kwargs, depth=28, hidden_size=1152, num_heads=16, patch_size=2)


def SiT_XL_4(**kwargs: Any) -> SiT:
    return registry_entry(SiT, "SiT-XL/4", kwargs, depth=28, hidden_size=1152, num_heads=16, patch_size=4)


def SiT_XL_8(**kwargs: Any) -> SiT:
    return registry_entry(SiT, "SiT-XL/8", kwargs, depth=28, hidden_size=1152, num_heads=16, patch_size=8)


def SiT_L_2(**kwargs: Any) -> SiT:
    return registry_entry(SiT, "SiT-L/2", kwargs, depth=24, hidden_size=1024, num_heads=16, patch_size=2)


def SiT_L_4(**kwargs: Any) -> SiT:
    return registry_entry(SiT, "SiT-L/4", kwargs, depth=24, hidden_size=1024, num_heads=16, patch_size=4)


def SiT_L_8(**kwargs: Any) -> SiT:
    return registry_entry(SiT, "SiT-L/8", kwargs, depth=24, hidden_size=1024, num_heads=16, patch_size=8)


def SiT_B_2(**kwargs: Any) -> SiT:
    return registry_entry(SiT, "SiT-B/2", kwargs, depth=12, hidden_size=768, num_heads=12, patch_size=2)


def SiT_B_4(**kwargs: Any) -> SiT:
    return registry_entry(SiT, "SiT-B/4", kwargs, depth=12, hidden_size=768, num_heads=12, patch_size=4)


def SiT_B_8(**kwargs: Any) -> SiT:
    return registry_entry(SiT, "SiT-B/8", kwargs, depth=12, hidden_size=768, num_heads=12, patch_size=8)


def SiT_S_2(**kwargs: Any) -> SiT:
    return registry_entry(SiT, "SiT-S/2", kwargs, depth=12, hidden_size=384, num_heads=6, patch_size=2)


def SiT_S_4(**kwargs: Any) -> SiT:
    return registry_entry(SiT, "SiT-S/4", kwargs, depth=12, hidden_size=384, num_heads=6, patch_size=4)


def SiT_S_8(**kwargs: Any) -> SiT:
    return registry_entry(SiT, "SiT-S/8", kwargs, depth=12, hidden_size=384, num_heads=6, patch_size=8)


# TinyFusion's SiT result: SiT-XL/2 width with 14 of its 28 blocks kept.
def TinySiT_D14_2(**kwargs: Any) -> SiT:
    architecture = dict(depth=14, hidden_size=1152, num_heads=16, patch_size=2)
    return registry_entry(SiT, "TinySiT-D14/2", kwargs, **architecture)


# Small sizes for CPU work, as DiT's: Tiny has 8 blocks of width 128, Mini 12 of width 256.
def SiT_Tiny_1(**kwargs: Any) -> SiT:
    return registry_entry(SiT, "SiT-Tiny/1", kwargs, depth=8, hidden_size=128, num_heads=4, patch_size=1)


def SiT_Tiny_2(**kwargs: Any) -> SiT:
    return registry_entry(SiT, "SiT-Tiny/2", kwargs, depth=8, hidden_size=128, num_heads=4, patch_size=2)


def SiT_Tiny_4(**kwargs: Any) -> SiT:
    return registry_entry(SiT, "SiT-Tiny/4", kwargs, depth=8, hidden_size=128, num_heads=4, patch_size=4)


def SiT_Mini_1(**kwargs: Any) -> SiT:
    return registry_entry(SiT, "SiT-Mini/1", kwargs, depth=12, hidden_size=256, num_heads=4, patch_size=1)


def SiT_Mini_2(**kwargs: Any) -> SiT:
    return registry_entry(SiT, "SiT-Mini/2", kwargs, depth=12, hidden_size=256, num_heads=4, patch_size=2)


def SiT_Mini_4(**kwargs: Any) -> SiT:
    return registry_entry(SiT, "SiT-Mini/4", kwargs, depth=12, hidden_size=256, num_heads=4, patch_size=4)


SiT_models: dict[str, Callable[..., SiT]] = {
    "SiT-XL/2": SiT_XL_2, "SiT-XL/4": SiT_XL_4, "SiT-XL/8": SiT_XL_8,
    "SiT-L/2": SiT_L_2, "SiT-L/4": SiT_L_4, "SiT-L/8": SiT_L_8,
    "SiT-B/2": SiT_B_2, "SiT-B/4": SiT_B_4, "SiT-B/8": SiT_B_8,
    "SiT-S/2": SiT_S_2, "SiT-S/4": SiT_S_4, "SiT-S/8": SiT_S_8,
    "TinySiT-D14/2": TinySiT_D14_2,
    "SiT-Tiny/1": SiT_Tiny_1, "SiT-Tiny/2": SiT_Tiny_2, "SiT-Tiny/4": SiT_Tiny_4,
    "SiT-Mini/1": SiT_Mini_1, "SiT-Mini/2": SiT_Mini_2, "SiT-Mini/4": SiT_Mini_4,
}  # fmt: skip


def build_sit(name: str, **kwargs: Any) -> SiT:
    """Build the registry entry `name` (e.g. 'SiT-XL/2'); kwargs go to the SiT constructor."""
    return build_from_registry(SiT_models, SiT, name, kwargs)
