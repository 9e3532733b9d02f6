"""The MAR family (LTH14/mar): encoder then decoder blocks as one sequence, a fake latent for the null class.

MAR is called as a denoiser `net(x_t, t, y=..., force_drop_ids=..., mask=...)` (its head on every token, for
FLOP counts and timing), but only its own objective (conf/objective/mar.yaml) trains and samples it: it draws
orders and token masks and runs the transformer and the head itself. The family says so through
`own_objective`. Its checkpoints record their config (both depths): an export that keeps 8 + 8 blocks of
MAR-L loads strictly as TinyMAR-D16, any other split as a MAR of those depths.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from tinyfusion_pl.families.base import ModelFamily
from tinyfusion_pl.io import save_torch
from tinyfusion_pl.models.mar import MAR, load_mar_state_dict, mar_checkpoint, read_mar_checkpoint


class MARFamily(ModelFamily):
    name = "mar"
    model_class = MAR
    blocks = ("encoder_blocks", "decoder_blocks")
    depth_arguments = ("encoder_depth", "decoder_depth")
    label_argument = "y"
    label_drop_argument = "force_drop_ids"
    own_objective = "mar"
    called_methods = ("class_embedding", "forward_mae")  # the objective's calls (objectives/mar.py)
    called_submodules = ("diffloss.net",)

    def architecture(self, net: nn.Module) -> dict[str, Any]:
        return net.architecture()

    def sample_shape(self, net: nn.Module) -> tuple[int, ...]:
        """One latent image (vae_embed_dim, H, W), the tokens unpatchified."""
        return (net.vae_embed_dim, net.seq_h * net.patch_size, net.seq_w * net.patch_size)

    def null_label(self, net: nn.Module) -> int:
        """class_num: MAR has no null row, its class_embedding maps this label to the learned fake latent."""
        return int(net.num_classes)

    def label_dropout(self, net: nn.Module) -> float:
        return float(net.label_drop_prob)

    def load_state_dict(self, net: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
        load_mar_state_dict(net, state_dict)

    def save(self, net: nn.Module, path: str | os.PathLike) -> Path:
        """Our MAR file: the weights and the config (both depths), so mar_from_checkpoint rebuilds the model."""
        return save_torch(mar_checkpoint(net), path)

    def load(self, checkpoint: str | os.PathLike | Mapping[str, Any], like: nn.Module, prefer: str = "ema") -> nn.Module:
        """Our MAR files and the reference's checkpoint-last.pth ('model_ema' as the EMA) besides the base layouts."""
        state_dict, _ = read_mar_checkpoint(checkpoint, prefer=prefer)
        net = self.at_depth(like, self.checkpoint_block_counts(state_dict))
        self.load_state_dict(net, state_dict)
        return net
