"""The DiT family (facebookresearch/DiT): one `blocks` list, class labels with a null row, square latents."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from tinyfusion_pl.families.base import ModelFamily
from tinyfusion_pl.models.dit import DiT


class DiTFamily(ModelFamily):
    name = "dit"
    model_class = DiT
    blocks = ("blocks",)
    depth_arguments = ("depth",)

    def architecture(self, net: nn.Module) -> dict[str, Any]:
        return {
            "input_size": net.input_size, "patch_size": net.patch_size, "in_channels": net.in_channels,
            "hidden_size": net.hidden_size, "depth": len(net.blocks), "num_heads": net.num_heads,
            "mlp_ratio": net.mlp_ratio, "class_dropout_prob": net.y_embedder.dropout_prob,
            "num_classes": net.num_classes, "learn_sigma": net.learn_sigma,
        }

    def sample_shape(self, net: nn.Module) -> tuple[int, ...]:
        return (net.in_channels, net.input_size, net.input_size)

    def label_dropout(self, net: nn.Module) -> float:
        return float(net.y_embedder.dropout_prob)
