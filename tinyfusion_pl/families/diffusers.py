"""Families of diffusers transformers: DiT, PixArt-alpha/sigma, Stable Diffusion 3 (MMDiT) and Flux.

Each model has two descriptions. The diffusers class itself, found by its name so that describing it imports
nothing: what prune_blocks, the callbacks and export read when a user prunes their own diffusers model. And its
DiffusersDenoiser adapter (tinyfusion_pl.models.diffusers), the same blocks under `model.`, called the project's
way: what the stages train, sample and save. The depth lives in the diffusers config (`num_layers`,
`num_single_layers`): export records it there, so save_pretrained / from_pretrained round-trip at the new depth,
and the saved format is diffusers' own, a save_pretrained folder.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn

from tinyfusion_pl.errors import UsageError
from tinyfusion_pl.families.base import BlockStreams, ModelFamily
from tinyfusion_pl.io import atomic_folder
from tinyfusion_pl.models.checkpoints import load_dit_state_dict
from tinyfusion_pl.models.diffusers import (
    DiffusersDiT,
    DiffusersFlux,
    DiffusersPixArt,
    DiffusersSD3,
    build_diffusers,
    from_pretrained,
    import_diffusers,
    same_weights,
)

# MMDiT blocks (SD3's JointTransformerBlock, Flux's double- and single-stream blocks) take the image tokens and the
# text tokens and return them the other way round: `encoder_hidden_states, hidden_states = block(...)`.
JOINT_STREAMS = BlockStreams(inputs=("hidden_states", "encoder_hidden_states"),
                             outputs=("encoder_hidden_states", "hidden_states"))


def attention_projection_groups(block: nn.Module) -> list[tuple[str, ...]]:
    """The projections of every diffusers attention in `block` that read one tensor: q, k and v of a self-attention
    (k and v of a cross-attention, whose q reads the image tokens), and the text-token q, k and v of a joint one."""
    groups = []
    for name, module in block.named_modules():
        prefix = f"{name}." if name else ""
        if all(isinstance(getattr(module, projection, None), nn.Module) for projection in ("to_q", "to_k", "to_v")):
            projections = ("to_k", "to_v") if getattr(module, "is_cross_attention", False) else ("to_q", "to_k", "to_v")
            groups.append(tuple(prefix + projection for projection in projections))
        added = ("add_q_proj", "add_k_proj", "add_v_proj")
        if all(isinstance(getattr(module, projection, None), nn.Module) for projection in added):
            groups.append(tuple(prefix + projection for projection in added))
    return groups


def save_pretrained_folder(model: nn.Module, path: str | os.PathLike) -> Path:
    """`model.save_pretrained` into a folder beside `path`, then moved onto `path`: never a half-written folder."""
    with atomic_folder(path) as temporary:
        model.save_pretrained(temporary)
    return Path(path)


def is_folder(checkpoint: str | os.PathLike | Mapping[str, Any]) -> bool:
    return isinstance(checkpoint, (str, os.PathLike)) and Path(checkpoint).is_dir()


class SavedAsFolder(ModelFamily):
    """A family whose checkpoints are save_pretrained folders: config.json with the depth, and the weights.

    An adapter's `save_pretrained` writes the diffusers model it holds, so both kinds of family save alike.
    """

    def checkpoint_name(self, stem: str) -> str:
        return stem  # a folder

    def save(self, net: nn.Module, path: str | os.PathLike) -> Path:
        return save_pretrained_folder(net, path)


#################################################################################
#                       The diffusers classes themselves                         #
#################################################################################


class DiffusersTransformerFamily(SavedAsFolder):
    """A diffusers transformer class: its blocks, their streams, its depth in the config, save_pretrained folders.

    It is called the diffusers way (`model(hidden_states=..., timestep=..., ...).sample`), not `net(x, t, **c)`:
    generic code that calls a net (objectives, sampling, selectors) takes it wrapped in its DiffusersDenoiser.
    """

    class_name: ClassVar[str]  # the diffusers class, matched by name: describing it imports nothing
    blocks = ("transformer_blocks",)
    depth_arguments = ("num_layers",)
    label_argument = None
    label_drop_argument = None

    @property
    def model_class(self) -> type[nn.Module]:  # type: ignore[override]
        return getattr(import_diffusers(), self.class_name)

    def describes(self, cls: type) -> bool:
        """Whether instances of exactly `cls` are this family's models (by name and package: nothing imported)."""
        return cls.__name__ == self.class_name and cls.__module__.partition(".")[0] == "diffusers"

    def shared_input_linears(self, block: nn.Module) -> list[tuple[str, ...]]:
        return attention_projection_groups(block)

    # ---------------------------------------------------------------- structure
    def architecture(self, net: nn.Module) -> dict[str, Any]:
        return {key: value for key, value in net.config.items() if not key.startswith("_")}

    def after_depth_change(self, net: nn.Module, block_counts: Sequence[int]) -> None:
        net.register_to_config(**dict(zip(self.depth_arguments, (int(count) for count in block_counts), strict=True)))

    # ---------------------------------------------------------------- not a denoiser
    def _called_the_diffusers_way(self, net: nn.Module | None = None) -> TypeError:
        name = type(net).__name__ if net is not None else self.class_name
        return TypeError(
            f"a {name} is called the diffusers way (model(hidden_states=..., timestep=..., ...).sample), not as "
            "net(x, t, **condition): call it in your own LightningModule, or use its adapter from "
            "tinyfusion_pl.models.diffusers (build_diffusers) where the project calls the net."
        )

    def sample_shape(self, net: nn.Module) -> tuple[int, ...]:
        raise self._called_the_diffusers_way(net)

    def num_classes(self, net: nn.Module) -> int | None:
        raise self._called_the_diffusers_way(net)

    def null_label(self, net: nn.Module) -> int:
        raise self._called_the_diffusers_way(net)

    def label_dropout(self, net: nn.Module) -> float:
        raise self._called_the_diffusers_way(net)

    def condition(self, labels: torch.Tensor | None, drop: torch.Tensor | None = None) -> dict[str, Any]:
        raise self._called_the_diffusers_way()

    # ---------------------------------------------------------------- saving and loading
    def load(self, checkpoint: str | os.PathLike | Mapping[str, Any], like: nn.Module, prefer: str = "ema") -> nn.Module:
        """A save_pretrained folder through from_pretrained (strictly), else any state-dict layout like the base."""
        if is_folder(checkpoint):
            return from_pretrained(self.model_class, checkpoint)
        return super().load(checkpoint, like, prefer)


class DiTTransformerFamily(DiffusersTransformerFamily):
    """DiTTransformer2DModel: one list of DiT blocks; its output layer reads block 0's timestep/label embedder."""

    name = "dit_transformer_2d"
    class_name = "DiTTransformer2DModel"
    # The Linears of facebookresearch/DiT's block (qkv split in three): every block also holds a copy of the
    # timestep/label embedder, which DiT keeps outside its blocks, so "every Linear" would adapt it there too.
    lora_target = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "norm1.linear")

    def required_blocks(self, net: nn.Module) -> tuple[int, ...]:
        blocks = net.transformer_blocks
        equal = all(same_weights(blocks[0].norm1.emb, block.norm1.emb) for block in blocks[1:])
        return () if equal else (0,)

    def check_kept_blocks(self, net: nn.Module, kept_blocks: Sequence[int]) -> None:
        if not kept_blocks or 0 in kept_blocks:
            return
        blocks, first = net.transformer_blocks, min(kept_blocks)
        if not same_weights(blocks[0].norm1.emb, blocks[first].norm1.emb):
            raise UsageError(
                f"kept_blocks={sorted(kept_blocks)} drops block 0 of this DiTTransformer2DModel, but its output "
                "layer is conditioned on the timestep/label embedder inside block 0 (transformer_blocks.0.norm1.emb), "
                f"and block {first}, which would become block 0, holds a different one: the exported model would "
                "not compute what the pruned one does. Keep block 0 (e.g. a pattern whose first group is [1, 1]), "
                "or give every block the same embedder (as checkpoints converted from facebookresearch/DiT have)."
            )


class PixArtTransformerFamily(DiffusersTransformerFamily):
    """PixArtTransformer2DModel (PixArt-alpha/sigma): one list of cross-attention blocks, one shared adaLN."""

    name = "pixart_transformer_2d"
    class_name = "PixArtTransformer2DModel"


class SD3TransformerFamily(DiffusersTransformerFamily):
    """SD3Transformer2DModel (MMDiT): two-stream joint blocks; the last one is context-pre-only."""

    name = "sd3_transformer_2d"
    class_name = "SD3Transformer2DModel"

    def block_streams(self, container_index: int) -> BlockStreams | None:
        return JOINT_STREAMS

    def required_blocks(self, net: nn.Module) -> tuple[int, ...]:
        return (len(net.transformer_blocks) - 1,)

    def check_kept_blocks(self, net: nn.Module, kept_blocks: Sequence[int]) -> None:
        last = len(net.transformer_blocks) - 1
        if kept_blocks and last not in kept_blocks:
            raise UsageError(
                f"kept_blocks={sorted(kept_blocks)} drops block {last}, the last block of this SD3Transformer2DModel. "
                "It is context-pre-only (it updates the image tokens only and has no text-token output layers), and "
                "from_pretrained builds the last block of any depth that way: an export ending on another block "
                "would not load strictly. The last block always stays; keep it (e.g. a pattern whose last group "
                "is [1, 1])."
            )

    def after_depth_change(self, net: nn.Module, block_counts: Sequence[int]) -> None:
        super().after_depth_change(net, block_counts)
        # SD3.5 gives some blocks a second image self-attention, listed by index in the config: renumber them.
        dual = [index for index, block in enumerate(net.transformer_blocks) if block.use_dual_attention]
        net.register_to_config(dual_attention_layers=tuple(dual))


class FluxTransformerFamily(DiffusersTransformerFamily):
    """FluxTransformer2DModel: double-stream blocks, then single-stream blocks; both take and return two streams."""

    name = "flux_transformer_2d"
    class_name = "FluxTransformer2DModel"
    blocks = ("transformer_blocks", "single_transformer_blocks")
    depth_arguments = ("num_layers", "num_single_layers")

    def block_streams(self, container_index: int) -> BlockStreams | None:
        return JOINT_STREAMS

    def shared_input_linears(self, block: nn.Module) -> list[tuple[str, ...]]:
        groups = super().shared_input_linears(block)
        if isinstance(getattr(block, "proj_mlp", None), nn.Module):
            # A single-stream block feeds one normalised tensor to its MLP and to its attention's q, k and v.
            groups = [("proj_mlp", *group) if group == ("attn.to_q", "attn.to_k", "attn.to_v") else group
                      for group in groups]
        return groups


#################################################################################
#                  Their adapters to net(x, t, **condition)                      #
#################################################################################


class DiffusersDenoiserFamily(SavedAsFolder):
    """A DiffusersDenoiser: its diffusers model's family with every path under `model.`, called the project's way,
    conditioned on class labels (the text-conditioned ones through a caption per class)."""

    transformer: ClassVar[DiffusersTransformerFamily]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.blocks = tuple(f"model.{path}" for path in cls.transformer.blocks)
        cls.depth_arguments = cls.transformer.depth_arguments
        cls.lora_target = cls.transformer.lora_target

    # ---------------------------------------------------------------- structure
    def architecture(self, net: nn.Module) -> dict[str, Any]:
        return {"kind": net.kind, **self.transformer.architecture(net.model), **net.options()}

    def build(self, **architecture: Any) -> nn.Module:
        return build_diffusers(**architecture)

    def sample_shape(self, net: nn.Module) -> tuple[int, ...]:
        return tuple(net.sample_shape)

    def block_streams(self, container_index: int) -> BlockStreams | None:
        return self.transformer.block_streams(container_index)

    def shared_input_linears(self, block: nn.Module) -> list[tuple[str, ...]]:
        return self.transformer.shared_input_linears(block)

    def required_blocks(self, net: nn.Module) -> tuple[int, ...]:
        return self.transformer.required_blocks(net.model)

    def check_kept_blocks(self, net: nn.Module, kept_blocks: Sequence[int]) -> None:
        self.transformer.check_kept_blocks(net.model, kept_blocks)

    def after_depth_change(self, net: nn.Module, block_counts: Sequence[int]) -> None:
        self.transformer.after_depth_change(net.model, block_counts)

    # ---------------------------------------------------------------- conditioning: class labels, with a null label
    def num_classes(self, net: nn.Module) -> int | None:
        return net.num_classes

    def null_label(self, net: nn.Module) -> int:
        return net.num_classes

    def label_dropout(self, net: nn.Module) -> float:
        return net.class_dropout_prob

    # ---------------------------------------------------------------- saving and loading
    def load(self, checkpoint: str | os.PathLike | Mapping[str, Any], like: nn.Module, prefer: str = "ema") -> nn.Module:
        """A save_pretrained folder adapted like `like`, or a state dict of the adapter (our stages' {'model', 'ema'})."""
        if is_folder(checkpoint):
            return build_diffusers(like.kind, pretrained=checkpoint, **like.options())
        return super().load(checkpoint, like, prefer)


class DiffusersDiTFamily(DiffusersDenoiserFamily):
    """DiffusersDiT: diffusers' DiT as a class-conditional denoiser `net(x, t, y, force_drop_ids)`, like our DiT."""

    name = "diffusers_dit"
    model_class = DiffusersDiT
    transformer = DiTTransformerFamily()

    def load_state_dict(self, net: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
        # Loading into one shared embedder would keep whichever block's copy comes last: unshare, load, reshare.
        net.unshare_embedders()
        load_dit_state_dict(net, state_dict)
        net.share_embedders()


class DiffusersPixArtFamily(DiffusersDenoiserFamily):
    """DiffusersPixArt: PixArt on the caption of each class label, `net(x, t, y, force_drop_ids)`."""

    name = "diffusers_pixart"
    model_class = DiffusersPixArt
    transformer = PixArtTransformerFamily()


class DiffusersSD3Family(DiffusersDenoiserFamily):
    """DiffusersSD3: SD3's MMDiT on the caption of each class label, in the project's flow matching convention."""

    name = "diffusers_sd3"
    model_class = DiffusersSD3
    transformer = SD3TransformerFamily()


class DiffusersFluxFamily(DiffusersDenoiserFamily):
    """DiffusersFlux: Flux on the caption of each class label, latents packed by the adapter, flow matching."""

    name = "diffusers_flux"
    model_class = DiffusersFlux
    transformer = FluxTransformerFamily()


__all__ = [
    "DiTTransformerFamily",
    "DiffusersDenoiserFamily",
    "DiffusersDiTFamily",
    "DiffusersFluxFamily",
    "DiffusersPixArtFamily",
    "DiffusersSD3Family",
    "DiffusersTransformerFamily",
    "FluxTransformerFamily",
    "JOINT_STREAMS",
    "PixArtTransformerFamily",
    "SD3TransformerFamily",
]
