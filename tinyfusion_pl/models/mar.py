"""Masked Autoregressive model (MAR) with the parameter names of LTH14/mar, its size registry and checkpoints.

MAR ("Autoregressive Image Generation without Vector Quantization") generates the tokens of a VAE latent in a
random order, a few at a time. A ViT encoder sees a buffer of `buffer_size` class-embedding tokens and the
visible tokens only; a ViT decoder adds learned mask tokens at the masked positions; its per-token outputs z
condition a small MLP diffusion head (`diffloss.net`) that denoises each token's latent channels.

What lives here is the network and the small pieces its objective combines; generation orders, mask ratios
and masks, the diffusion loss of the head and the iterative sampler live in the objective (tinyfusion_pl.objectives), which reuses the project's
Gaussian diffusion. The pieces, under the reference names and meanings:

- `patchify(x)` (N, C, H, W) -> tokens (N, L, C * p * p); `unpatchify` back.
- `class_embedding(labels, force_drop_ids=None)` (N, D): class_emb, or the learned `fake_latent` where the
  label is the null label `class_num`, where force_drop_ids is 1, or at random with `label_drop_prob` in
  train mode when no force_drop_ids is given (the reference drops inside its encoder; the result is the same).
- `forward_mae_encoder(tokens, mask, class_embedding)`, `forward_mae_decoder(x, mask)`, and
  `forward_mae(tokens, mask, class_embedding)` (both): z (N, L, decoder_embed_dim), with
  `diffusion_pos_embed_learned` added. Every sample must mask the same number of tokens (as MAR's do).
- `forward(x, t, y, force_drop_ids=None, mask=None)`: MAR as a denoiser net(x_t, t, **condition), so generic code
  (FLOP counts, timing) can call it: the transformer on x's visible tokens (all when mask is None), then the
  head on every token of x at step t -> (N, 2C, H, W). The objective calls the pieces instead.
- `diffloss.net(x, t, c)`: the head, token latents x (M, C * p * p), integer steps t (M,) and z rows c (M, D)
  -> (M, 2 * C * p * p): the eps prediction, then the learned-variance channels.
- Attributes the objective reads: seq_len, token_embed_dim, num_classes (= class_num), label_drop_prob,
  mask_ratio_min, buffer_size, num_sampling_steps, diffusion_batch_mul.

The ViT blocks are timm's `Block` with qkv bias, exact GELU, LayerNorm eps 1e-6 and dropout; they are written
here with timm's parameter names (norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2), since timm is not a
dependency. A public `checkpoint-last.pth` ({'model', 'model_ema', ...}) loads strictly into its registry entry.

Digits on the CPU (MAR-Tiny, MAR-Mini): the 8x8 single-channel images are the "latents" themselves
(vae_stride=1, vae_embed_dim=1) cut into 2x2 pixel patches (patch_size=2): 16 tokens of token_embed_dim 4.
These are the defaults of the small entries, with 10 classes and a buffer of 4 class tokens.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from tinyfusion_pl.models.checkpoints import (
    CheckpointMismatchError,
    _natural_sorted,
    _preview,
    extract_state_dict,
    load_checkpoint_file,
)
from tinyfusion_pl.models.dit import Attention, Mlp, TimestepEmbedder

# The norm every public MAR uses (the reference's factories pass it); a checkpoint's config does not record it.
DEFAULT_NORM_LAYER = functools.partial(nn.LayerNorm, eps=1e-6)


#################################################################################
#                        Encoder/decoder block (timm names)                     #
#################################################################################


class Block(nn.Module):
    """Pre-norm ViT block: x + attn(norm1(x)), then x + mlp(norm2(x)) (timm's Block, no layer scale)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        norm_layer: Callable[[int], nn.Module] = DEFAULT_NORM_LAYER,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, attn_drop=attn_drop, proj_drop=proj_drop)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), approximate="none", drop=proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))  # (N, T, D)
        return x + self.mlp(self.norm2(x))  # (N, T, D)


#################################################################################
#                     Diffusion head (SimpleMLPAdaLN, reference names)          #
#################################################################################


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN's affine map for per-row conditions: x, shift, scale all (M, C)."""
    return x * (1 + scale) + shift


class ResBlock(nn.Module):
    """Residual MLP block of the head, its LayerNorm modulated by the condition (adaLN, gated residual)."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(channels, channels, bias=True),
            nn.SiLU(),
            nn.Linear(channels, channels, bias=True),
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels, bias=True))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)  # 3 x (M, W)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))  # (M, W)


class FinalLayer(nn.Module):
    """Modulated LayerNorm and a linear map to the output channels (DiT's final layer, one row per token)."""

    def __init__(self, model_channels: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(model_channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(model_channels, out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels, 2 * model_channels, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)  # 2 x (M, W)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (M, C_out)


class SimpleMLPAdaLN(nn.Module):
    """The head's denoiser: net(x, t, c) for token latents x, steps t and transformer outputs c (one row each)."""

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        z_channels: int,
        num_res_blocks: int,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.grad_checkpointing = grad_checkpointing

        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList(ResBlock(model_channels) for _ in range(num_res_blocks))
        self.final_layer = FinalLayer(model_channels, out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The reference's initialisation: xavier Linear layers, small time MLP, zero adaLN and output."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        # Zero modulation: every residual block starts as the identity; zero output: the head predicts 0.
        for block in self.res_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """(M, out_channels) from token latents x (M, in_channels), steps t (M,) and conditions c (M, z_channels)."""
        x = self.input_proj(x)  # (M, W)
        y = self.time_embed(t) + self.cond_embed(c)  # (M, W)
        for block in self.res_blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, y, use_reentrant=False)
            else:
                x = block(x, y)  # (M, W)
        return self.final_layer(x, y)  # (M, C_out)


class DiffLoss(nn.Module):
    """The reference's `diffloss` module without its diffusion: it holds the head `net` (eps and variance).

    The diffusion that trains and samples the head is the objective's; `num_sampling_steps` is kept here as
    the respacing the reference samples with ('100').
    """

    def __init__(
        self,
        target_channels: int,
        z_channels: int,
        depth: int,
        width: int,
        num_sampling_steps: str,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        self.in_channels = target_channels
        self.num_sampling_steps = num_sampling_steps
        self.net = SimpleMLPAdaLN(
            in_channels=target_channels,
            model_channels=width,
            out_channels=2 * target_channels,  # eps and the learned variance
            z_channels=z_channels,
            num_res_blocks=depth,
            grad_checkpointing=grad_checkpointing,
        )


#################################################################################
#                                 Core MAR model                                #
#################################################################################


class MAR(nn.Module):
    """MAR's encoder, decoder and diffusion head; parameter and keyword names match LTH14/mar.

    Defaults are the reference class's, except norm_layer: LayerNorm(eps=1e-6), what the reference's
    factories pass for every released model (its class alone would default to eps 1e-5).
    """

    def __init__(
        self,
        img_size: int = 256,
        vae_stride: int = 16,
        patch_size: int = 1,
        encoder_embed_dim: int = 1024,
        encoder_depth: int = 16,
        encoder_num_heads: int = 16,
        decoder_embed_dim: int = 1024,
        decoder_depth: int = 16,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_layer: Callable[[int], nn.Module] = DEFAULT_NORM_LAYER,
        vae_embed_dim: int = 16,
        mask_ratio_min: float = 0.7,
        label_drop_prob: float = 0.1,
        class_num: int = 1000,
        attn_dropout: float = 0.1,
        proj_dropout: float = 0.1,
        buffer_size: int = 64,
        diffloss_d: int = 3,
        diffloss_w: int = 1024,
        num_sampling_steps: str = "100",
        diffusion_batch_mul: int = 4,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        _validate_mar_arguments(
            img_size=img_size, vae_stride=vae_stride, patch_size=patch_size, encoder_embed_dim=encoder_embed_dim,
            encoder_depth=encoder_depth, encoder_num_heads=encoder_num_heads, decoder_embed_dim=decoder_embed_dim,
            decoder_depth=decoder_depth, decoder_num_heads=decoder_num_heads, mlp_ratio=mlp_ratio,
            vae_embed_dim=vae_embed_dim, mask_ratio_min=mask_ratio_min, label_drop_prob=label_drop_prob,
            class_num=class_num, attn_dropout=attn_dropout, proj_dropout=proj_dropout, buffer_size=buffer_size,
            diffloss_d=diffloss_d, diffloss_w=diffloss_w, num_sampling_steps=num_sampling_steps,
            diffusion_batch_mul=diffusion_batch_mul,
        )
        # VAE latents and their tokens.
        self.img_size = img_size
        self.vae_stride = vae_stride
        self.patch_size = patch_size
        self.vae_embed_dim = vae_embed_dim
        self.seq_h = self.seq_w = img_size // vae_stride // patch_size
        self.seq_len = self.seq_h * self.seq_w
        self.token_embed_dim = vae_embed_dim * patch_size**2
        self.grad_checkpointing = grad_checkpointing

        # Architecture, kept so that the model rebuilds at another depth.
        self.encoder_embed_dim = encoder_embed_dim
        self.encoder_num_heads = encoder_num_heads
        self.decoder_embed_dim = decoder_embed_dim
        self.decoder_num_heads = decoder_num_heads
        self.mlp_ratio = mlp_ratio
        self.norm_layer = norm_layer
        self.attn_dropout = attn_dropout
        self.proj_dropout = proj_dropout
        self.diffloss_d = diffloss_d
        self.diffloss_w = diffloss_w

        # What the objective reads: label dropout, mask ratios, the head's sampling steps and batch repeat.
        self.num_classes = class_num
        self.label_drop_prob = label_drop_prob
        self.mask_ratio_min = mask_ratio_min
        self.num_sampling_steps = num_sampling_steps
        self.diffusion_batch_mul = diffusion_batch_mul

        # Class embedding, and the learned "fake latent" that replaces it for CFG's unconditional branch.
        self.class_emb = nn.Embedding(class_num, encoder_embed_dim)
        self.fake_latent = nn.Parameter(torch.zeros(1, encoder_embed_dim))

        # Encoder: token projection, buffer + token position embedding, ViT blocks.
        self.z_proj = nn.Linear(self.token_embed_dim, encoder_embed_dim, bias=True)
        self.z_proj_ln = nn.LayerNorm(encoder_embed_dim, eps=1e-6)
        self.buffer_size = buffer_size
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len + buffer_size, encoder_embed_dim))
        self.encoder_blocks = nn.ModuleList(
            Block(encoder_embed_dim, encoder_num_heads, mlp_ratio, norm_layer, proj_dropout, attn_dropout)
            for _ in range(encoder_depth)
        )
        self.encoder_norm = norm_layer(encoder_embed_dim)

        # Decoder: mask tokens at the masked positions, its own position embedding, ViT blocks.
        self.decoder_embed = nn.Linear(encoder_embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len + buffer_size, decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, norm_layer, proj_dropout, attn_dropout)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, decoder_embed_dim))

        self.initialize_weights()

        # The diffusion head, initialised by itself (the reference builds it after the transformer's init).
        self.diffloss = DiffLoss(
            target_channels=self.token_embed_dim,
            z_channels=decoder_embed_dim,
            width=diffloss_w,
            depth=diffloss_d,
            num_sampling_steps=num_sampling_steps,
            grad_checkpointing=grad_checkpointing,
        )

    @property
    def encoder_depth(self) -> int:
        return len(self.encoder_blocks)

    @property
    def decoder_depth(self) -> int:
        return len(self.decoder_blocks)

    def initialize_weights(self) -> None:
        """The reference's initialisation of the transformer part (the head initialises itself)."""
        # Embeddings, fake latent, mask token and learned position embeddings: small normal values.
        for parameter in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                          self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(parameter, std=0.02)
        # Xavier-uniform Linear weights (as JAX ViT), zero biases; LayerNorms start as plain normalisation.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                if module.weight is not None:
                    nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # ---------------------------------------------------------------- tokens
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """Latents (N, C, H, W) as tokens (N, L, C * p * p), row-major over the p x p patches (channel first)."""
        batch, channels, height, width = x.shape
        p = self.patch_size
        x = x.reshape(batch, channels, height // p, p, width // p, p)  # (N, C, h, p, w, p)
        x = torch.einsum("nchpwq->nhwcpq", x)  # (N, h, w, C, p, p)
        return x.reshape(batch, (height // p) * (width // p), channels * p * p)  # (N, L, C * p * p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (N, L, C * p * p) back to latents (N, C, H, W)."""
        if x.shape[-1] != self.token_embed_dim:
            raise ValueError(f"tokens have {x.shape[-1]} values each; this MAR's tokens have token_embed_dim="
                             f"{self.token_embed_dim} (vae_embed_dim * patch_size^2).")
        return self._unpatchify_channels(x)  # (N, C, H, W)

    # ---------------------------------------------------------------- class conditioning
    def class_embedding(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The class tokens (N, D): class_emb, or fake_latent for null labels (class_num) and dropped labels.

        force_drop_ids (N,) of 0/1 drops the labels flagged 1, in any mode; without it, train mode drops each
        label with probability label_drop_prob (CFG training), eval mode drops none.
        """
        drop = labels == self.num_classes  # (N,)
        if force_drop_ids is not None:
            if force_drop_ids.shape != labels.shape:
                raise ValueError(
                    f"force_drop_ids has shape {tuple(force_drop_ids.shape)} but the labels have shape "
                    f"{tuple(labels.shape)}; pass one 0/1 flag per label (1 = replace by the fake latent)."
                )
            drop = drop | (force_drop_ids == 1)
        elif self.training and self.label_drop_prob > 0:
            drop = drop | (torch.rand(labels.shape, device=labels.device) < self.label_drop_prob)
        embedding = self.class_emb(torch.where(drop, torch.zeros_like(labels), labels))  # (N, D)
        return torch.where(drop[:, None], self.fake_latent.to(embedding.dtype), embedding)  # (N, D)

    # ---------------------------------------------------------------- transformer
    def _run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)  # (N, T, D)
        return x

    def _visible(self, mask: torch.Tensor) -> torch.Tensor:
        """Bool (N, B + L): the never-masked class buffer, then the tokens that mask (N, L) leaves visible."""
        if mask.ndim != 2 or mask.shape[1] != self.seq_len:
            raise ValueError(
                f"mask has shape {tuple(mask.shape)}; expected (N, {self.seq_len}), one 0/1 flag per token "
                "(1 = masked), e.g. from the objective's mask_by_order(count, random_orders(N, L))."
            )
        buffer = torch.ones(mask.shape[0], self.buffer_size, device=mask.device, dtype=torch.bool)
        visible = torch.cat([buffer, mask == 0], dim=1)  # (N, B + L)
        counts = visible.sum(dim=1)
        if bool((counts != counts[0]).any()):
            raise ValueError(
                f"the mask masks {sorted(set((self.seq_len + self.buffer_size - counts).tolist()))} tokens in "
                "different samples; MAR's encoder needs the same number of masked tokens in every sample of a batch "
                "(as MAR's objective and sampler give)."
            )
        return visible

    def forward_mae_encoder(
        self, x: torch.Tensor, mask: torch.Tensor | None, class_embedding: torch.Tensor
    ) -> torch.Tensor:
        """Encode the class buffer and the visible tokens: tokens (N, L, C_tok) -> (N, B + visible, D_enc).

        mask (N, L): 1 (or True) = masked; None = nothing masked. Every sample must mask as many tokens.
        """
        x = self.z_proj(x)  # (N, L, D)
        batch, _, width = x.shape
        buffer = class_embedding.to(x.dtype).unsqueeze(1).expand(batch, self.buffer_size, width)  # (N, B, D)
        x = torch.cat([buffer, x], dim=1) + self.encoder_pos_embed_learned  # (N, B + L, D)
        x = self.z_proj_ln(x)
        if mask is not None:
            visible = self._visible(mask)  # (N, B + L)
            x = x[visible].reshape(batch, -1, width)  # (N, B + visible, D)
        x = self._run_blocks(self.encoder_blocks, x)
        return self.encoder_norm(x)  # (N, B + visible, D)

    def forward_mae_decoder(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Decode with mask tokens at the masked positions: (N, B + visible, D_enc) -> z (N, L, D_dec)."""
        x = self.decoder_embed(x)  # (N, B + visible, D)
        if mask is not None:
            visible = self._visible(mask)  # (N, B + L)
            padded = self.mask_token.to(x.dtype).expand(*visible.shape, x.shape[-1]).clone()  # (N, B + L, D)
            padded[visible] = x.reshape(-1, x.shape[-1])
            x = padded
        x = x + self.decoder_pos_embed_learned  # (N, B + L, D)
        x = self._run_blocks(self.decoder_blocks, x)
        x = self.decoder_norm(x)
        return x[:, self.buffer_size :] + self.diffusion_pos_embed_learned  # (N, L, D)

    def forward_mae(
        self, x: torch.Tensor, mask: torch.Tensor | None, class_embedding: torch.Tensor
    ) -> torch.Tensor:
        """z (N, L, D_dec) that conditions the head, for tokens (N, L, C_tok), mask (N, L) and class tokens (N, D)."""
        return self.forward_mae_decoder(self.forward_mae_encoder(x, mask, class_embedding), mask)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        force_drop_ids: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The head's output (N, 2C, H, W) for every token of x (N, C, H, W) at head steps t (N,), labels y (N,).

        The transformer sees x's tokens where mask (N, L) is 0 (all of them when mask is None) and the head
        denoises every token of x at its sample's step t, conditioned on z: with clean tokens at the visible
        positions and noisy ones at the masked positions this is MAR's prediction for the masked tokens.
        It makes MAR callable as net(x_t, t, **condition) (FLOP counts, timing); MAR's objective calls the
        pieces instead. Label drops work as in class_embedding.
        """
        tokens = self.patchify(x)  # (N, L, C_tok)
        z = self.forward_mae(tokens, mask, self.class_embedding(y, force_drop_ids))  # (N, L, D)
        batch, length, channels = tokens.shape
        steps = t.reshape(batch, 1).expand(batch, length).reshape(-1)  # (N * L,)
        out = self.diffloss.net(tokens.reshape(-1, channels), steps, z.reshape(batch * length, -1))  # (N * L, 2C_tok)
        return self._unpatchify_channels(out.reshape(batch, length, -1))  # (N, 2C, H, W)

    def _unpatchify_channels(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token values (N, L, K * p * p) as K-channel latents (N, K, H, W), K a multiple of vae_embed_dim."""
        batch, p = x.shape[0], self.patch_size
        channels = x.shape[-1] // (p * p)
        x = x.reshape(batch, self.seq_h, self.seq_w, channels, p, p)  # (N, h, w, K, p, p)
        x = torch.einsum("nhwcpq->nchpwq", x)  # (N, K, h, p, w, p)
        return x.reshape(batch, channels, self.seq_h * p, self.seq_w * p)  # (N, K, H, W)

    def architecture(self) -> dict[str, Any]:
        """The constructor keywords that rebuild this model (norm_layer included)."""
        return {
            "img_size": self.img_size, "vae_stride": self.vae_stride, "patch_size": self.patch_size,
            "encoder_embed_dim": self.encoder_embed_dim, "encoder_depth": self.encoder_depth,
            "encoder_num_heads": self.encoder_num_heads, "decoder_embed_dim": self.decoder_embed_dim,
            "decoder_depth": self.decoder_depth, "decoder_num_heads": self.decoder_num_heads,
            "mlp_ratio": self.mlp_ratio, "norm_layer": self.norm_layer, "vae_embed_dim": self.vae_embed_dim,
            "mask_ratio_min": self.mask_ratio_min, "label_drop_prob": self.label_drop_prob,
            "class_num": self.num_classes, "attn_dropout": self.attn_dropout, "proj_dropout": self.proj_dropout,
            "buffer_size": self.buffer_size, "diffloss_d": self.diffloss_d, "diffloss_w": self.diffloss_w,
            "num_sampling_steps": self.num_sampling_steps, "diffusion_batch_mul": self.diffusion_batch_mul,
            "grad_checkpointing": self.grad_checkpointing,
        }  # fmt: skip


def _validate_mar_arguments(**arguments: Any) -> None:
    """Check every MAR constructor argument at once and raise one ValueError listing all problems."""
    problems = []
    positive = ("img_size", "vae_stride", "patch_size", "encoder_embed_dim", "encoder_num_heads", "decoder_embed_dim",
                "decoder_num_heads", "vae_embed_dim", "class_num", "diffloss_w", "diffusion_batch_mul")
    non_negative = ("encoder_depth", "decoder_depth", "buffer_size", "diffloss_d")
    for name in (*positive, *non_negative):
        value, least = arguments[name], 1 if name in positive else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            problems.append(f"{name}={value!r} must be an int >= {least}")
    if problems:
        raise ValueError("invalid MAR arguments: " + "; ".join(problems) + ".")
    if arguments["img_size"] % (arguments["vae_stride"] * arguments["patch_size"]):
        problems.append(f"img_size={arguments['img_size']} must be divisible by vae_stride * patch_size = "
                        f"{arguments['vae_stride'] * arguments['patch_size']}")
    for side in ("encoder", "decoder"):
        width, heads = arguments[f"{side}_embed_dim"], arguments[f"{side}_num_heads"]
        if width % heads:
            problems.append(f"{side}_embed_dim={width} must be divisible by {side}_num_heads={heads}")
    if not arguments["mlp_ratio"] > 0:
        problems.append(f"mlp_ratio={arguments['mlp_ratio']!r} must be > 0")
    if not 0 <= arguments["mask_ratio_min"] <= 1:
        problems.append(f"mask_ratio_min={arguments['mask_ratio_min']!r} must be in [0, 1]")
    for name in ("label_drop_prob", "attn_dropout", "proj_dropout"):
        if not 0 <= arguments[name] < 1:
            problems.append(f"{name}={arguments[name]!r} must be in [0, 1)")
    steps = str(arguments["num_sampling_steps"])
    if not steps.isdigit() or int(steps) < 1:
        problems.append(f"num_sampling_steps={arguments['num_sampling_steps']!r} must be a positive step count "
                        "such as '100'")
    if problems:
        raise ValueError("invalid MAR arguments: " + "; ".join(problems) + ".")


#################################################################################
#                                   MAR configs                                 #
#################################################################################

# Keywords a registry entry fixes: the transformer widths and head counts (depths and the head may be set).
_FIXED_BY_ENTRY = ("encoder_embed_dim", "encoder_num_heads", "decoder_embed_dim", "decoder_num_heads")
# The public checkpoints' data: 256px ImageNet through the KL-16 VAE (16 x 16 tokens of 16 channels).
_PUBLIC_DATA = dict(img_size=256, vae_stride=16, patch_size=1, vae_embed_dim=16, class_num=1000, buffer_size=64)
# 8x8 single-channel digits as their own latents, 2x2 pixel patches: 16 tokens of 4 values, 10 classes.
_DIGITS_DATA = dict(img_size=8, vae_stride=1, patch_size=2, vae_embed_dim=1, class_num=10, buffer_size=4)


def _entry(name: str, overrides: dict[str, Any], **defaults: Any) -> MAR:
    """Build a registry entry; overrides may set anything but the widths and head counts the entry fixes."""
    clashes = sorted(set(_FIXED_BY_ENTRY) & set(overrides))
    if clashes:
        fixed = ", ".join(f"{key}={defaults[key]}" for key in _FIXED_BY_ENTRY)
        raise ValueError(
            f"{name} fixes {', '.join(clashes)} ({fixed}); got "
            f"{', '.join(f'{key}={overrides[key]!r}' for key in clashes)}. "
            "Build MAR(...) directly for another width or head count."
        )
    return MAR(**{**defaults, **overrides})


def _transformer(width: int, heads: int, depth: int) -> dict[str, int]:
    return dict(encoder_embed_dim=width, encoder_num_heads=heads, encoder_depth=depth,
                decoder_embed_dim=width, decoder_num_heads=heads, decoder_depth=depth)


# The public sizes with the diffusion head of their released checkpoints (the reference's README).
def MAR_B(**kwargs: Any) -> MAR:
    return _entry("MAR-B", kwargs, **_transformer(768, 12, 12), diffloss_d=6, diffloss_w=1024, **_PUBLIC_DATA)


def MAR_L(**kwargs: Any) -> MAR:
    return _entry("MAR-L", kwargs, **_transformer(1024, 16, 16), diffloss_d=8, diffloss_w=1280, **_PUBLIC_DATA)


def MAR_H(**kwargs: Any) -> MAR:
    return _entry("MAR-H", kwargs, **_transformer(1280, 16, 20), diffloss_d=12, diffloss_w=1536, **_PUBLIC_DATA)


# TinyFusion's MAR result: MAR-L with 8 of its 16 encoder and 8 of its 16 decoder blocks (its head unchanged).
def TinyMAR_D16(**kwargs: Any) -> MAR:
    return _entry("TinyMAR-D16", kwargs, **_transformer(1024, 16, 8), diffloss_d=8, diffloss_w=1280,
                  **_PUBLIC_DATA)


# Small sizes for CPU work on 8x8 digits (see the module docstring): Tiny 4 + 4 blocks of width 128 and a
# 3 x 128 head, Mini 6 + 6 blocks of width 256 and a 3 x 256 head.
def MAR_Tiny(**kwargs: Any) -> MAR:
    return _entry("MAR-Tiny", kwargs, **_transformer(128, 4, 4), diffloss_d=3, diffloss_w=128, **_DIGITS_DATA)


def MAR_Mini(**kwargs: Any) -> MAR:
    return _entry("MAR-Mini", kwargs, **_transformer(256, 4, 6), diffloss_d=3, diffloss_w=256, **_DIGITS_DATA)


MAR_models: dict[str, Callable[..., MAR]] = {
    "MAR-B": MAR_B, "MAR-L": MAR_L, "MAR-H": MAR_H, "TinyMAR-D16": TinyMAR_D16,
    "MAR-Tiny": MAR_Tiny, "MAR-Mini": MAR_Mini,
}  # fmt: skip


def build_mar(name: str, **kwargs: Any) -> MAR:
    """Build the registry entry `name` (e.g. 'MAR-L'); kwargs go to the MAR constructor."""
    if name not in MAR_models:
        raise ValueError(
            f"unknown MAR model name={name!r}; valid names: {', '.join(MAR_models)}. "
            "Pick one of these, or build MAR(...) directly for a custom size."
        )
    return MAR_models[name](**kwargs)


#################################################################################
#                                   Checkpoints                                 #
#################################################################################

# Where our own MAR files keep the constructor keywords (norm_layer aside) beside the weights under 'model'.
CONFIG_KEY = "mar_config"
# Arguments of the reference's main_mar.py that a checkpoint's 'args' records and its shapes do not show.
_REFERENCE_ARGUMENTS = ("img_size", "vae_stride", "patch_size", "mask_ratio_min", "label_drop_prob", "attn_dropout",
                        "proj_dropout", "num_sampling_steps", "diffusion_batch_mul")
_BLOCK_KEY = re.compile(r"(encoder_blocks|decoder_blocks|diffloss\.net\.res_blocks)\.(\d+)\.")
_REQUIRED_MAR_KEYS = ("z_proj.weight", "decoder_embed.weight", "class_emb.weight", "encoder_pos_embed_learned",
                      "diffusion_pos_embed_learned", "diffloss.net.input_proj.weight")


def mar_checkpoint(net: MAR) -> dict[str, Any]:
    """What our MAR files hold: {'mar_config': constructor keywords, 'model': state dict}.

    The config records both depths, so the file rebuilds the same model. norm_layer is not recorded: a model
    with another norm than LayerNorm(eps=1e-6) is refused, naming the fix.
    """
    config = net.architecture()
    if not _is_default_norm(config.pop("norm_layer")):
        raise ValueError(
            "this MAR was built with a custom norm_layer, which a checkpoint's config cannot record; save its "
            "state_dict() yourself and rebuild it with the same norm_layer, or use the default LayerNorm(eps=1e-6)."
        )
    return {CONFIG_KEY: config, "model": net.state_dict()}


def _is_default_norm(norm_layer: Any) -> bool:
    """Whether norm_layer builds LayerNorm(eps=1e-6) (a deep copy of the model copies the partial)."""
    return (isinstance(norm_layer, functools.partial) and norm_layer.func is nn.LayerNorm and not norm_layer.args
            and norm_layer.keywords == DEFAULT_NORM_LAYER.keywords)


def read_mar_checkpoint(
    checkpoint: str | os.PathLike | Mapping[str, Any], prefer: str = "ema"
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(state dict, config or None) of a MAR checkpoint file or loaded object.

    Layouts: our files (mar_checkpoint: their saved config), the reference's checkpoint-last.pth ({'model',
    'model_ema', 'args', ...}: 'model_ema' with prefer='ema'; the config is the shapes' completed by the
    training arguments it records, such as vae_stride and patch_size), and everything extract_state_dict
    reads (plain, Lightning, ...: no config).
    """
    loaded = load_checkpoint_file(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    if isinstance(loaded, Mapping) and CONFIG_KEY in loaded:
        return extract_state_dict(loaded["model"], prefer=prefer), dict(loaded[CONFIG_KEY])
    state_dict = extract_state_dict(loaded, prefer=prefer)
    args = loaded.get("args") if isinstance(loaded, Mapping) else None
    if not isinstance(args, argparse.Namespace):
        return state_dict, None
    recorded = {key: value for key, value in vars(args).items() if key in _REFERENCE_ARGUMENTS}
    return state_dict, {**infer_mar_config(state_dict), **recorded}


def infer_mar_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The MAR constructor keywords a state dict's shapes imply.

    Shapes do not show the VAE stride and patch size (only L tokens of C * p * p values): they are taken as
    the public setup's, stride 16 and patch 1 (img_size = 16 * sqrt(L)), unless the caller overrides them.
    Head counts are those of the registry entry of the same width, else 64-wide heads.
    """
    missing = [key for key in _REQUIRED_MAR_KEYS if key not in state_dict]
    if missing:
        raise ValueError(f"cannot read a MAR config: the state dict lacks {', '.join(missing)}; its keys start "
                         f"with {_preview(_natural_sorted(state_dict))}. Is it a MAR state dict?")
    encoder_width, token_dim = state_dict["z_proj.weight"].shape
    decoder_width = state_dict["decoder_embed.weight"].shape[0]
    seq_len = state_dict["diffusion_pos_embed_learned"].shape[1]
    side = math.isqrt(seq_len)
    if side * side != seq_len:
        raise ValueError(f"diffusion_pos_embed_learned has {seq_len} tokens, not a square grid; MAR's is square.")
    depths = _block_counts(state_dict)
    fc1 = next((state_dict[f"{side_name}.0.mlp.fc1.weight"] for side_name in ("encoder_blocks", "decoder_blocks")
                if f"{side_name}.0.mlp.fc1.weight" in state_dict), None)
    return {
        "img_size": side * 16, "vae_stride": 16, "patch_size": 1, "vae_embed_dim": token_dim,
        "encoder_embed_dim": encoder_width, "encoder_depth": depths["encoder_blocks"],
        "encoder_num_heads": _num_heads_for_width(encoder_width), "decoder_embed_dim": decoder_width,
        "decoder_depth": depths["decoder_blocks"], "decoder_num_heads": _num_heads_for_width(decoder_width),
        "mlp_ratio": 4.0 if fc1 is None else fc1.shape[0] / fc1.shape[1],
        "class_num": state_dict["class_emb.weight"].shape[0],
        "buffer_size": state_dict["encoder_pos_embed_learned"].shape[1] - seq_len,
        "diffloss_d": depths["diffloss.net.res_blocks"],
        "diffloss_w": state_dict["diffloss.net.input_proj.weight"].shape[0],
    }


def _block_counts(state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Blocks per list (encoder, decoder, head), refusing numbering with gaps."""
    indices: dict[str, set[int]] = {"encoder_blocks": set(), "decoder_blocks": set(), "diffloss.net.res_blocks": set()}
    for key in state_dict:
        if match := _BLOCK_KEY.match(key):
            indices[match.group(1)].add(int(match.group(2)))
    for name, found in indices.items():
        if sorted(found) != list(range(len(found))):
            raise ValueError(f"{name} indices {_preview(sorted(found), limit=30)} are not 0..{len(found) - 1}: blocks "
                             "were removed without renumbering. Renumber the kept blocks 0..K-1 (prune_blocks does).")
    return {name: len(found) for name, found in indices.items()}


def _num_heads_for_width(width: int) -> int:
    for factory in MAR_models.values():
        entry = _entry_shape(factory)
        if entry["encoder_embed_dim"] == width:
            return entry["encoder_num_heads"]
    return width // 64 if width % 64 == 0 else max(heads for heads in range(1, 17) if width % heads == 0)


@functools.cache
def _entry_shape(factory: Callable[..., MAR]) -> dict[str, Any]:
    """A registry entry's architecture, read once from a meta model."""
    with torch.device("meta"):
        return factory().architecture()


def describe_mar_size(state_dict: Mapping[str, torch.Tensor]) -> str:
    """'encoder 16 + decoder 16 blocks at width 1024, head 8 x 1280 (MAR-L)': the size a state dict holds."""
    config = infer_mar_config(state_dict)
    size = (f"encoder {config['encoder_depth']} + decoder {config['decoder_depth']} blocks at width "
            f"{config['encoder_embed_dim']}, head {config['diffloss_d']} x {config['diffloss_w']}")
    names = [name for name, factory in MAR_models.items()
             if all(_entry_shape(factory)[key] == config[key] for key in
                    ("encoder_embed_dim", "encoder_depth", "decoder_embed_dim", "decoder_depth", "diffloss_d",
                     "diffloss_w"))]
    return f"{size} ({' / '.join(names)})" if names else size


def load_mar_state_dict(model: MAR, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load strictly, or raise CheckpointMismatchError naming what differs and the size the checkpoint holds.

    A model on the meta device takes the tensors themselves (assign=True).
    """
    expected = model.state_dict()
    missing = _natural_sorted(set(expected) - set(state_dict))
    unexpected = _natural_sorted(set(state_dict) - set(expected))
    mismatched = [f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
                  for key in _natural_sorted(set(expected) & set(state_dict))
                  if tuple(state_dict[key].shape) != tuple(expected[key].shape)]
    if missing or unexpected or mismatched:
        lines = [f"the checkpoint does not fit this MAR ({describe_mar_size(expected)}):"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched)):
            if items:
                lines.append(f"  {title} ({len(items)}): {_preview(items)}")
        try:
            lines.append(f"The checkpoint holds {describe_mar_size(state_dict)}: mar_from_checkpoint(checkpoint) "
                         "builds the model it fits.")
        except ValueError as error:
            lines.append(f"It does not look like a MAR state dict: {error}")
        raise CheckpointMismatchError("\n".join(lines))
    on_meta = any(tensor.is_meta for tensor in expected.values())
    model.load_state_dict(state_dict, strict=True, assign=on_meta)


def mar_from_checkpoint(
    path: str | os.PathLike | Mapping[str, Any], name: str | None = None, ema: bool = True, **overrides: Any
) -> MAR:
    """A MAR holding a checkpoint's weights (the EMA ones unless ema=False), loaded strictly.

    Reads the reference's checkpoint-last.pth and our own files. name picks a registry entry (its data
    keywords taken from the checkpoint); without it the model is the one our file's config records, or the
    one the shapes imply (infer_mar_config). overrides go to the constructor (e.g. vae_stride, patch_size).
    """
    state_dict, config = read_mar_checkpoint(path, prefer="ema" if ema else "model")
    if config is None:
        config = infer_mar_config(state_dict)
    with torch.device("meta"):
        if name is None:
            model = MAR(**{**config, **overrides})
        else:
            data = {key: config[key] for key in (*_PUBLIC_DATA, "mlp_ratio") if key in config}
            model = build_mar(name, **{**data, **overrides})
    model.to_empty(device="cpu")  # copies, not the checkpoint's tensors
    load_mar_state_dict(model, state_dict)
    return model
