"""Diffusion Transformer (DiT) with the parameter names of facebookresearch/DiT, and its size registry.

The names match the public checkpoints (DiT-XL-2-256x256.pt) and the TinyFusion pruned checkpoints
(TinyDiT-D14, ...), so their state dicts load with strict=True. Patch embedding, attention and MLP are
written here with timm's parameter names, so timm is not needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyfusion_pl.errors import UsageError
from tinyfusion_pl.objectives.base import mix_guided_halves


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Apply adaLN's per-sample affine map x * (1 + scale) + shift to every token."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                  Patch embedding, attention and MLP (timm names)              #
#################################################################################


class PatchEmbed(nn.Module):
    """Cut an image into non-overlapping patches and project each to a token (timm's `proj` conv)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (N, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (N, T, D), tokens in row-major patch order


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm's `qkv`, `proj`).

    attn_drop and proj_drop are timm's dropout on the attention weights and after the projection (MAR's
    ViT blocks use 0.1; DiT uses none). They act in train mode only.
    """

    def __init__(self, hidden_size: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=True)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)  # (N, T, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (N, H, T, Dh)
        dropout = self.attn_drop if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)  # (N, H, T, Dh)
        x = x.transpose(1, 2).reshape(batch, tokens, width)  # (N, T, D)
        return self.proj_drop(self.proj(x))  # (N, T, D)


class Mlp(nn.Module):
    """Two-layer feed-forward network with GELU (timm's `fc1`, `fc2`): tanh-approximated as DiT's by default.

    approximate="none" is timm's default exact GELU (MAR's ViT blocks); drop is timm's dropout after the
    activation and after fc2, in train mode only.
    """

    def __init__(self, hidden_size: int, mlp_hidden_size: int, approximate: str = "tanh", drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden_size)
        self.act = nn.GELU(approximate=approximate)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(mlp_hidden_size, hidden_size)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))  # (N, T, D)


#################################################################################
#               Embedding layers for timesteps and class labels                 #
#################################################################################


class TimestepEmbedder(nn.Module):
    """Embed scalar (possibly fractional) timesteps as sinusoidal features followed by an MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(
        t: torch.Tensor, dim: int, max_period: float = 10000.0, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Return (N, dim) features [cos(t * f_k), sin(t * f_k)] with f_k = max_period^(-k / (dim // 2))."""
        half = dim // 2
        exponents = torch.arange(half, dtype=dtype, device=t.device) / half
        freqs = torch.exp(-math.log(max_period) * exponents)  # (dim // 2,)
        args = t[:, None].to(dtype) * freqs[None]  # (N, dim // 2)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2 * (dim // 2))
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)  # (N, dim)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        weight_dtype = self.mlp[0].weight.dtype
        # At least float32, as DiT (t * f reaches ~1000, too coarse in half precision); float64 models keep float64.
        feature_dtype = torch.promote_types(weight_dtype, torch.float32)
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size, dtype=feature_dtype)  # (N, 256)
        return self.mlp(t_freq.to(weight_dtype))  # (N, D)


class LabelEmbedder(nn.Module):
    """Embed class labels; with dropout > 0 the table has an extra last row, the null label for CFG."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        has_null_row = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(has_null_row), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace dropped labels by the null label `num_classes` (random, or where force_drop_ids == 1)."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            if force_drop_ids.shape != labels.shape:
                raise ValueError(
                    f"force_drop_ids has shape {tuple(force_drop_ids.shape)} but the labels have shape "
                    f"{tuple(labels.shape)}; pass one 0/1 flag per label (1 = replace by the null label)."
                )
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, torch.full_like(labels, self.num_classes), labels)

    def forward(
        self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            if self.dropout_prob <= 0:
                raise ValueError(
                    "force_drop_ids was given but this model has class_dropout_prob=0, so its label table "
                    "has no null row; build the model with class_dropout_prob > 0 to drop labels."
                )
            labels = self.token_drop(labels, force_drop_ids)  # (N,)
        return self.embedding_table(labels)  # (N, D)


#################################################################################
#                                 Core DiT model                                #
#################################################################################


class DiTBlock(nn.Module):
    """Transformer block whose norms are modulated by the conditioning vector (adaLN-Zero)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        modulation = self.adaLN_modulation(c)  # (N, 6 * D)
        # 6 x (N, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (N, T, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, T, D)
        return x


class FinalLayer(nn.Module):
    """Modulated LayerNorm and a linear map from each token to its patch of output channels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 x (N, D)
        x = modulate(self.norm_final(x), shift, scale)  # (N, T, D)
        return self.linear(x)  # (N, T, p * p * C_out)


class DiT(nn.Module):
    """Class-conditional diffusion transformer; parameter names match facebookresearch/DiT."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
    ):
        super().__init__()
        _validate_dit_arguments(
            input_size=input_size,
            patch_size=patch_size,
            in_channels=in_channels,
            hidden_size=hidden_size,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            class_dropout_prob=class_dropout_prob,
            num_classes=num_classes,
        )
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        grid_size = input_size // patch_size
        # Fixed sin-cos embedding; a Parameter (not a buffer) because the public state dicts carry it.
        self.pos_embed = nn.Parameter(torch.zeros(1, grid_size * grid_size, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @property
    def depth(self) -> int:
        """Number of transformer blocks."""
        return len(self.blocks)

    def initialize_weights(self) -> None:
        """Initialise every parameter as DiT does (adaLN-Zero: each block starts as the identity)."""

        # Xavier-uniform weights and zero biases for every Linear layer.
        def init_linear(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(init_linear)

        # Fixed 2-D sin-cos position embedding.
        grid_size = self.input_size // self.patch_size
        pos_embed = sincos_position_embedding_2d(self.hidden_size, grid_size, device=self.pos_embed.device)
        with torch.no_grad():
            self.pos_embed.copy_(pos_embed.unsqueeze(0))

        # Patch embedding conv as a Linear over flattened patches: xavier on the (D, C * p * p) view.
        proj_weight = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(proj_weight.view(proj_weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)

        # Label table and timestep MLP: small normal weights.
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: zero modulation makes every gate 0, so each block starts as the identity.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)

        # Zero final modulation and output projection: the untrained model predicts 0.
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Reassemble per-token patches (N, T, p * p * C) into images (N, C, H, W)."""
        channels, patch = self.out_channels, self.patch_size
        grid = int(round(x.shape[1] ** 0.5))
        x = x.reshape(x.shape[0], grid, grid, patch, patch, channels)  # (N, h, w, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)  # (N, C, h, p, w, p)
        return x.reshape(x.shape[0], channels, grid * patch, grid * patch)  # (N, C, H, W)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        force_drop_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict (N, out_channels, H, W) from noisy input x (N, C, H, W), timesteps t (N,), labels y (N,).

        force_drop_ids (N,) of 0/1 replaces the labels flagged 1 by the null label, also in eval mode,
        so a distillation teacher can see exactly the label drops its student saw.
        """
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D), T = H * W / p^2
        t = self.t_embedder(t)  # (N, D)
        y = self.y_embedder(y, self.training, force_drop_ids)  # (N, D)
        c = t + y  # (N, D)
        for block in self.blocks:
            x = block(x, c)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, p * p * C_out)
        return self.unpatchify(x)  # (N, C_out, H, W)

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float,
        guidance_channels: int | None = 3,
    ) -> torch.Tensor:
        """Classifier-free guided prediction for a batch laid out as [conditional half; unconditional half].

        The caller doubles the batch and gives the second half the null label `num_classes`. Guidance
        eps_uncond + cfg_scale * (eps_cond - eps_uncond) is applied to the first `guidance_channels`
        output channels: 3 reproduces DiT's published numbers exactly, None guides all noise channels
        (in_channels), the standard form. Other channels are returned unguided.
        """
        if guidance_channels is None:
            guidance_channels = self.in_channels
        if (
            isinstance(guidance_channels, bool)
            or not isinstance(guidance_channels, int)
            or not 1 <= guidance_channels <= self.in_channels
        ):
            raise ValueError(
                f"guidance_channels={guidance_channels!r} is not allowed: use an int from 1 to in_channels="
                f"{self.in_channels} (3 = DiT's published setting) or None to guide all noise channels."
            )
        if x.shape[0] % 2:
            raise ValueError(
                f"forward_with_cfg needs an even batch [conditional; unconditional] but got {x.shape[0]} "
                "samples; concatenate the inputs with themselves and give the second half the null label."
            )
        # Both halves see the same input (DiT's convention), so they stay identical across sampling steps.
        half = x[: x.shape[0] // 2]  # (N/2, C, H, W)
        model_out = self.forward(torch.cat([half, half], dim=0), t, y)  # (N, C_out, H, W)
        cond_out, uncond_out = model_out.chunk(2, dim=0)  # 2 x (N/2, C_out, H, W)
        guided = mix_guided_halves(cond_out, uncond_out, cfg_scale, self.in_channels, guidance_channels)
        # Both halves carry the guided channels; each keeps its own unguided rest, as DiT returns them.
        uncond_guided = torch.cat([guided[:, :guidance_channels], uncond_out[:, guidance_channels:]], dim=1)
        return torch.cat([guided, uncond_guided], dim=0)  # (N, C_out, H, W)


def _validate_dit_arguments(**arguments: Any) -> None:
    """Check every DiT constructor argument at once and raise one ValueError listing all problems."""
    problems = []
    positive_ints = (
        "input_size",
        "patch_size",
        "in_channels",
        "hidden_size",
        "depth",
        "num_heads",
        "num_classes",
    )
    for name in positive_ints:
        value = arguments[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{name}={value!r} must be a positive int")
    if problems:
        raise UsageError("invalid DiT arguments: " + "; ".join(problems) + ".")
    if arguments["input_size"] % arguments["patch_size"]:
        problems.append(
            f"input_size={arguments['input_size']} must be divisible by patch_size={arguments['patch_size']}"
        )
    if arguments["hidden_size"] % arguments["num_heads"]:
        problems.append(
            f"hidden_size={arguments['hidden_size']} must be divisible by num_heads={arguments['num_heads']}"
        )
    if arguments["hidden_size"] % 4:
        problems.append(
            f"hidden_size={arguments['hidden_size']} must be divisible by 4 (the 2-D sin-cos position embedding)"
        )
    if not arguments["mlp_ratio"] > 0:
        problems.append(f"mlp_ratio={arguments['mlp_ratio']!r} must be > 0")
    if not 0 <= arguments["class_dropout_prob"] < 1:
        problems.append(f"class_dropout_prob={arguments['class_dropout_prob']!r} must be in [0, 1)")
    if problems:
        raise UsageError("invalid DiT arguments: " + "; ".join(problems) + ".")


#################################################################################
#                         Sine/cosine position embedding                        #
#################################################################################


def sincos_position_embedding_2d(
    hidden_size: int, grid_size: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Return the (grid_size^2, hidden_size) fixed sin-cos embedding of a square patch grid, DiT's layout.

    Tokens are in row-major order. The first half of the channels encodes the column of the token,
    the second half its row; each half is [sin(pos * w_k), cos(pos * w_k)] with w_k = 10000^(-k / (D / 4)).
    """
    quarter = hidden_size // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)  # (D/4,)
    positions = torch.arange(grid_size, dtype=torch.float64, device=device)
    rows, cols = torch.meshgrid(positions, positions, indexing="ij")  # 2 x (G, G)

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega  # (G * G, D/4)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (G * G, D/2)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()  # (G * G, D)


#################################################################################
#                                   DiT configs                                 #
#################################################################################

# Architecture keywords a registry entry fixes; the rest (input_size, in_channels, ...) and depth may be set.
_FIXED_BY_ENTRY = ("hidden_size", "num_heads", "patch_size")

# DiT or a model built on its backbone (SiT), so a registry of that class returns that class.
ModelT = TypeVar("ModelT", bound=DiT)


def registry_entry(
    model_class: type[ModelT], name: str, overrides: dict[str, Any], **architecture: int
) -> ModelT:
    """Build a registry entry; overrides may set depth and the data keywords, not width, heads or patch."""
    clashes = sorted(set(_FIXED_BY_ENTRY) & set(overrides))
    if clashes:
        fixed = ", ".join(f"{key}={architecture[key]}" for key in _FIXED_BY_ENTRY)
        raise UsageError(
            f"{name} fixes {', '.join(clashes)} ({fixed}); got "
            f"{', '.join(f'{key}={overrides[key]!r}' for key in clashes)}. "
            f"Build {model_class.__name__}(...) directly for another width, head count or patch size."
        )
    return model_class(**{**architecture, **overrides})


def build_from_registry(
    registry: Mapping[str, Callable[..., ModelT]],
    model_class: type[ModelT],
    name: str,
    kwargs: dict[str, Any],
) -> ModelT:
    """Build the entry `name` of a registry of model_class, or name the valid entries."""
    if name not in registry:
        raise UsageError(
            f"unknown {model_class.__name__} model name={name!r}; valid names: {', '.join(registry)}. "
            f"Pick one of these, or build {model_class.__name__}(...) directly for a custom size."
        )
    return registry[name](**kwargs)


# Each factory builds one public size; kwargs set the data keywords (input_size, in_channels, num_classes,
# learn_sigma, class_dropout_prob) and may override depth.
def DiT_XL_2(**kwargs: Any) -> DiT:
    return registry_entry(DiT, "DiT-XL/2", kwargs, depth=28, hidden_size=1152, num_heads=16, patch_size=2)


def DiT_XL_4(**kwargs: Any) -> DiT:
    return registry_entry(DiT, "DiT-XL/4", kwargs, depth=28, hidden_size=1152, num_heads=16, patch_size=4)


def DiT_XL_8(**kwargs: Any) -> DiT:
    return registry_entry(DiT, "DiT-XL/8", kwargs, depth=28, hidden_size=1152, num_heads=16, patch_size=8)


def DiT_L_2(**kwargs: Any) -> DiT:
    return registry_entry(DiT, "DiT-L/2", kwargs, depth=24, hidden_size=1024, num_heads=16, patch_size=2)


def DiT_L_4(**kwargs: Any) -> DiT:
    return registry_entry(DiT, "DiT-L/4", kwargs, depth=24, hidden_size=1024, num_heads=16, patch_size=4)


def DiT_L_8(**kwargs: Any) -> DiT:
    return registry_entry(DiT, "DiT-L/8", kwargs, depth=24, hidden_size=1024, num_heads=16, patch_size=8)


def DiT_B_2(**kwargs: Any) -> DiT:
    return registry_entry(DiT, "DiT-B/2", kwargs, depth=12, hidden_size=768, num_heads=12, patch_size=2)


def DiT_B_4(**kwargs: Any) -> DiT:
    return registry_entry(DiT, "DiT-B/4", kwargs, depth=12, hidden_size=768, num_heads=12, patch_size=4)


def DiT_B_8(**kwargs: Any) -> DiT:
    return registry_entry(DiT, "DiT-B/8", kwargs, depth=12, hidden_size=768, num_heads=12, patch_size=8)


def DiT_S_2(**kwargs: Any) -> DiT:
    return registry_entry(DiT, "DiT-S/2", kwargs, depth=12, hidden_size=384, num_heads=6, patch_size=2)


def DiT_S_4(**kwargs: Any) -> DiT:
    return registry_entry(DiT, "DiT-S/4", kwargs, depth=12, hidden_size=384, num_heads=6, patch_size=4)


def DiT_S_8(**kwargs: Any) -> DiT:
    return registry_entry(DiT, "DiT-S/8", kwargs, depth=12, hidden_size=384, num_heads=6, patch_size=8)


# TinyFusion's shallow results: DiT-XL/2 width with 19, 14 or 7 of its blocks kept.
def DiT_D19_2(**kwargs: Any) -> DiT:
    return registry_entry(DiT, "DiT-D19/2", kwargs, depth=19, hidden_size=1152, num_heads=16, patch_size=2)


def DiT_D14_2(**kwargs: Any) -> DiT:
    return registry_entry(DiT, "DiT-D14/2", kwargs, depth=14, hidden_size=1152, num_heads=16, patch_size=2)


def DiT_D7_2(**kwargs: Any) -> DiT:
    return registry_entry(DiT, "DiT-D7/2", kwargs, depth=7, hidden_size=1152, num_heads=16, patch_size=2)


# Small sizes for CPU work (e.g. 8x8 or 16x16 digits): Tiny has 8 blocks of width 128, Mini 12 of width 256.
def DiT_Tiny_1(**kwargs: Any) -> DiT:
    return registry_entry(DiT, "DiT-Tiny/1", kwargs, depth=8, hidden_size=128, num_heads=4, patch_size=1)


def DiT_Tiny_2(**kwargs: Any) -> DiT:
    return registry_entry(DiT, "DiT-Tiny/2", kwargs, depth=8, hidden_size=128, num_heads=4, patch_size=2)


def DiT_Tiny_4(**kwargs: Any) -> DiT:
    return registry_entry(DiT, "DiT-Tiny/4", kwargs, depth=8, hidden_size=128, num_heads=4, patch_size=4)


def DiT_Mini_1(**kwargs: Any) -> DiT:
    return registry_entry(DiT, "DiT-Mini/1", kwargs, depth=12, hidden_size=256, num_heads=4, patch_size=1)


def DiT_Mini_2(**kwargs: Any) -> DiT:
    return registry_entry(DiT, "DiT-Mini/2", kwargs, depth=12, hidden_size=256, num_heads=4, patch_size=2)


def DiT_Mini_4(**kwargs: Any) -> DiT:
    return registry_entry(DiT, "DiT-Mini/4", kwargs, depth=12, hidden_size=256, num_heads=4, patch_size=4)


DiT_models: dict[str, Callable[..., DiT]] = {
    "DiT-XL/2": DiT_XL_2, "DiT-XL/4": DiT_XL_4, "DiT-XL/8": DiT_XL_8,
    "DiT-L/2": DiT_L_2, "DiT-L/4": DiT_L_4, "DiT-L/8": DiT_L_8,
    "DiT-B/2": DiT_B_2, "DiT-B/4": DiT_B_4, "DiT-B/8": DiT_B_8,
    "DiT-S/2": DiT_S_2, "DiT-S/4": DiT_S_4, "DiT-S/8": DiT_S_8,
    "DiT-D19/2": DiT_D19_2, "DiT-D14/2": DiT_D14_2, "DiT-D7/2": DiT_D7_2,
    "DiT-Tiny/1": DiT_Tiny_1, "DiT-Tiny/2": DiT_Tiny_2, "DiT-Tiny/4": DiT_Tiny_4,
    "DiT-Mini/1": DiT_Mini_1, "DiT-Mini/2": DiT_Mini_2, "DiT-Mini/4": DiT_Mini_4,
}  # fmt: skip


def build_dit(name: str, **kwargs: Any) -> DiT:
    """Build the registry entry `name` (e.g. 'DiT-XL/2'); kwargs go to the DiT constructor."""
    return build_from_registry(DiT_models, DiT, name, kwargs)
