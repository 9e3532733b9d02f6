"""diffusers transformers behind the project's call convention, `net(x, t, **condition) -> prediction`.

A diffusers transformer is called its own way (`model(hidden_states=x, timestep=t, class_labels=y).sample`).
A DiffusersDenoiser holds it, unchanged, as its `model` submodule and maps the project's call onto it, so
objectives, stages and distillation use it like our DiT; its family (tinyfusion_pl.families.diffusers) finds the
blocks under `model.` and saves the diffusers model in its own format (a save_pretrained folder).
diffusers is an optional extra, imported only when a model is built.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import os
from collections.abc import Sequence
from types import ModuleType
from typing import Any, ClassVar

import torch
import torch.nn as nn

from tinyfusion_pl.errors import MissingInputError, UsageError

EXTRA_HINT = 'install the diffusers extra: pip install -e ".[diffusers]"'


def import_diffusers() -> ModuleType:
    """The diffusers package, or an ImportError that names the extra to install."""
    try:
        import diffusers
    except ImportError as error:
        raise ImportError(f"diffusers models need the diffusers package; {EXTRA_HINT}") from error
    return diffusers


def from_pretrained(model_class: type[nn.Module], folder: str | os.PathLike) -> nn.Module:
    """`model_class.from_pretrained(folder)`, loaded strictly: a missing, unexpected or misshapen weight raises.

    diffusers itself only warns and initialises missing weights at random (a folder whose config says more
    blocks than it holds weights for loads "successfully").
    """
    from tinyfusion_pl.models.checkpoints import CheckpointMismatchError

    # Low-memory loading needs accelerate; without it diffusers falls back, but logs a notice on every load.
    low_cpu_mem_usage = importlib.util.find_spec("accelerate") is not None
    model, info = model_class.from_pretrained(folder, output_loading_info=True, low_cpu_mem_usage=low_cpu_mem_usage)
    problems = {kind: info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[kind]}
    if problems:
        listing = "; ".join(f"{kind.replace('_', ' ')}: {keys[:5]}" for kind, keys in problems.items())
        raise CheckpointMismatchError(
            f"{folder} does not fit the {model_class.__name__} its config.json describes ({listing}). "
            "Was the folder written by save_pretrained after the config's depth was updated?"
        )
    return model


#################################################################################
#                                  Adapters                                     #
#################################################################################


class DiffusersDenoiser(nn.Module):
    """A diffusers transformer, held as `model`, called as `net(x, t, **condition)`; one subclass per model class."""

    kind: ClassVar[str]  # the `kind` of build_diffusers
    diffusers_class: ClassVar[str]  # the diffusers class it adapts, by name

    def __init__(self, model: nn.Module):
        super().__init__()
        if type(model).__name__ != self.diffusers_class:
            raise TypeError(f"{type(self).__name__} adapts a diffusers {self.diffusers_class}, got a {type(model).__name__}.")
        self.model = model

    @classmethod
    def model_class(cls) -> type[nn.Module]:
        return getattr(import_diffusers(), cls.diffusers_class)

    @classmethod
    def random_model(cls, config: dict[str, Any]) -> nn.Module:
        """A freshly initialised diffusers model from its config keywords."""
        return cls.model_class()(**config)

    def options(self) -> dict[str, Any]:
        """The adapter's own constructor keywords (besides the model), as build_diffusers takes them."""
        return {}

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample x, (C, H, W)."""
        config = self.model.config
        return (config.in_channels, config.sample_size, config.sample_size)

    @classmethod
    def depth_config(cls, model_class: type[nn.Module], config: dict[str, Any], depth: int) -> dict[str, Any]:
        """The config keywords that give the model `depth` blocks in all: diffusers' `num_layers`."""
        if "num_layers" in config and config["num_layers"] != depth:
            raise UsageError(f"depth={depth} and num_layers={config['num_layers']} disagree; give one of them.")
        return {"num_layers": depth}

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write the diffusers model (not the adapter) as its own `save_pretrained` does; from_pretrained reads it."""
        self.model.save_pretrained(folder)


class DiffusersDiT(DiffusersDenoiser):
    """diffusers' DiTTransformer2DModel called like our DiT: `net(x, t, y, force_drop_ids=None)`.

    DiT has one timestep/label embedder; diffusers keeps a copy in every block (`norm1.emb`) and conditions its
    output layer on block 0's. When all copies are equal (checkpoints converted from facebookresearch/DiT, and
    build_diffusers' random models), the adapter makes them one shared module, so training keeps them equal and
    export may drop block 0; unequal copies stay as they are (the family then keeps block 0).
    Label dropout is drawn here, once per sample as DiT does; diffusers would draw it again in every block.
    """

    kind = "dit"
    diffusers_class = "DiTTransformer2DModel"

    def __init__(self, model: nn.Module, class_dropout_prob: float = 0.1):
        super().__init__(model)
        self.class_dropout_prob = check_class_dropout(class_dropout_prob)
        for block in self.model.transformer_blocks:
            block.norm1.emb.class_embedder.dropout_prob = 0.0  # the drops are drawn in forward
        self.share_embedders()

    @classmethod
    def random_model(cls, config: dict[str, Any]) -> nn.Module:
        model = super().random_model(config)
        shared = model.transformer_blocks[0].norm1.emb.state_dict()  # one embedder, copied into every block
        with torch.no_grad():
            for block in model.transformer_blocks[1:]:
                for name, tensor in block.norm1.emb.state_dict().items():
                    tensor.copy_(shared[name])
        return model

    @property
    def num_classes(self) -> int:
        return int(self.model.config.num_embeds_ada_norm)

    def options(self) -> dict[str, Any]:
        return {"class_dropout_prob": self.class_dropout_prob}

    def share_embedders(self) -> bool:
        """Make every block use block 0's embedder when all hold the same weights; whether they now share it."""
        return share_block_embedders(self.model)

    def unshare_embedders(self) -> None:
        """Give every block its own copy of a shared embedder (the layout diffusers saves and loads)."""
        unshare_block_embedders(self.model)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        self.unshare_embedders()  # safetensors refuses tensors that several names share
        try:
            super().save_pretrained(folder)
        finally:
            self.share_embedders()

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Prediction (N, C_out, H, W) for x (N, C, H, W) at timesteps t (N,) with labels y (N,).

        Labels flagged 1 in force_drop_ids (also in eval mode), or drawn with class_dropout_prob in training,
        become the null label `num_classes` (the embedding table's last row).
        """
        y = drop_labels(y, self.num_classes, force_drop_ids, self.training, self.class_dropout_prob)
        return self.model(hidden_states=x, timestep=t, class_labels=y, return_dict=False)[0]  # (N, C_out, H, W)


def check_class_dropout(class_dropout_prob: float) -> float:
    if isinstance(class_dropout_prob, bool) or not isinstance(class_dropout_prob, (int, float)) \
            or not 0 <= class_dropout_prob < 1:
        raise UsageError(f"class_dropout_prob={class_dropout_prob!r} must be a number in [0, 1), the probability "
                         "of training a sample without its label (classifier-free guidance; DiT uses 0.1).")
    return float(class_dropout_prob)


def drop_labels(y: torch.Tensor, null_label: int, force_drop_ids: torch.Tensor | None, training: bool,
                class_dropout_prob: float) -> torch.Tensor:
    """y with the null label where force_drop_ids is 1 (also in eval mode), or drawn with class_dropout_prob in training.

    Drawn once per sample, as DiT does, so a teacher given the same force_drop_ids sees the same labels.
    """
    if force_drop_ids is not None:
        if force_drop_ids.shape != y.shape:
            raise ValueError(f"force_drop_ids has shape {tuple(force_drop_ids.shape)} but the labels have shape "
                             f"{tuple(y.shape)}; pass one 0/1 flag per label.")
        return torch.where(force_drop_ids == 1, null_label, y)  # (N,)
    if training and class_dropout_prob > 0:
        drop = torch.rand(y.shape[0], device=y.device) < class_dropout_prob
        return torch.where(drop, null_label, y)  # (N,)
    return y


#################################################################################
#                      Text-conditioned models on class labels                   #
#################################################################################

CAPTIONS_FORMAT = (
    "a file written by torch.save of a dict: 'encoder_hidden_states' (num_classes + 1, tokens, dim), the text "
    "encoder's output for one prompt per class and, in the last row, for the empty prompt (classifier-free "
    "guidance's unconditional branch); 'pooled_projections' (num_classes + 1, pooled dim) for SD3 and Flux; "
    "optionally 'encoder_attention_mask' (num_classes + 1, tokens), 1 for a token and 0 for padding (PixArt's T5)"
)


class CaptionTable(nn.Module):
    """One caption embedding per class label, and one for the null label (the empty prompt), looked up by label.

    Text-conditioned transformers (PixArt, SD3, Flux) take a text encoder's output, not a label. On a labelled
    dataset each class stands for one prompt: the table holds the text encoder's output for it, precomputed
    (`load`), or a fixed seeded random stand-in for a text encoder (`random`) where no encoder is at hand (the
    digits). Its tensors are buffers outside the state dict: the table is rebuilt from the adapter's options.
    """

    def __init__(self, encoder_hidden_states: torch.Tensor, pooled_projections: torch.Tensor | None = None,
                 encoder_attention_mask: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("encoder_hidden_states", encoder_hidden_states, persistent=False)  # (K + 1, L, D)
        self.register_buffer("pooled_projections", pooled_projections, persistent=False)  # (K + 1, P)
        self.register_buffer("encoder_attention_mask", encoder_attention_mask, persistent=False)  # (K + 1, L)

    @property
    def num_classes(self) -> int:
        return self.encoder_hidden_states.shape[0] - 1

    @classmethod
    def random(cls, num_classes: int, tokens: int, dim: int, pooled_dim: int | None, seed: int) -> CaptionTable:
        """A seeded Gaussian table, the same for the same arguments on every machine: a stand-in for a text encoder."""
        generator = torch.Generator().manual_seed(seed)
        hidden = torch.randn(num_classes + 1, tokens, dim, generator=generator)
        pooled = None if pooled_dim is None else torch.randn(num_classes + 1, pooled_dim, generator=generator)
        return cls(hidden, pooled)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CaptionTable:
        """A table of precomputed text embeddings from `path` (CAPTIONS_FORMAT)."""
        if not os.path.isfile(path):
            raise MissingInputError(f"captions={path} is not a file; give {CAPTIONS_FORMAT}.")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(saved, dict) or not torch.is_tensor(saved.get("encoder_hidden_states")):
            raise UsageError(f"captions={path} holds no 'encoder_hidden_states' tensor; give {CAPTIONS_FORMAT}.")
        hidden = saved["encoder_hidden_states"]
        pooled, mask = saved.get("pooled_projections"), saved.get("encoder_attention_mask")
        rows = hidden.shape[0]
        problems = []
        if hidden.ndim != 3 or rows < 2:
            problems.append(f"'encoder_hidden_states' has shape {tuple(hidden.shape)}, not (num_classes + 1, tokens, dim)")
        if pooled is not None and (pooled.ndim != 2 or pooled.shape[0] != rows):
            problems.append(f"'pooled_projections' has shape {tuple(pooled.shape)}, not ({rows}, pooled dim)")
        if mask is not None and tuple(mask.shape) != tuple(hidden.shape[:2]):
            problems.append(f"'encoder_attention_mask' has shape {tuple(mask.shape)}, not {tuple(hidden.shape[:2])}")
        if problems:
            raise UsageError(f"captions={path}: {'; '.join(problems)}. Give {CAPTIONS_FORMAT}.")
        return cls(hidden, pooled, mask)

    def forward(self, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """The caption tensors of labels y (N,): encoder_hidden_states (N, L, D) and, where the table has them,
        pooled_projections (N, P) and encoder_attention_mask (N, L)."""
        tensors = {"encoder_hidden_states": self.encoder_hidden_states[y]}
        if self.pooled_projections is not None:
            tensors["pooled_projections"] = self.pooled_projections[y]
        if self.encoder_attention_mask is not None:
            tensors["encoder_attention_mask"] = self.encoder_attention_mask[y]
        return tensors


class TextConditionedDenoiser(DiffusersDenoiser):
    """A text-conditioned diffusers transformer called as a class-conditional one: `net(x, t, y, force_drop_ids)`.

    Each label reads its caption embedding from a CaptionTable; the null label `num_classes` reads the empty
    prompt's, so classifier-free guidance and distillation use labels as with DiT. `captions` is a file of
    precomputed text embeddings (CAPTIONS_FORMAT), or "random": a seeded stand-in table of `caption_tokens` tokens
    (`caption_seed`) for `num_classes` classes at the model's text widths.
    """

    text_width_key: ClassVar[str]  # the config key of the text encoder's width
    pooled_width_key: ClassVar[str | None] = None  # the config key of the pooled text width, if the model takes one

    def __init__(self, model: nn.Module, captions: str | os.PathLike | None = None, num_classes: int | None = None,
                 caption_tokens: int = 4, caption_seed: int = 0, class_dropout_prob: float = 0.1):
        super().__init__(model)
        self.class_dropout_prob = check_class_dropout(class_dropout_prob)
        self.captions, self.caption_tokens, self.caption_seed = captions, int(caption_tokens), int(caption_seed)
        text_width = model.config[self.text_width_key]
        pooled_width = None if self.pooled_width_key is None else model.config[self.pooled_width_key]
        if captions is None:
            raise UsageError(
                f"{self.diffusers_class} is text-conditioned: give model.captions=<file> with the text embeddings of "
                f"one prompt per class ({CAPTIONS_FORMAT}; width {text_width}"
                + (f", pooled width {pooled_width}" if pooled_width else "")
                + "), or model.captions=random for a seeded stand-in (a model trained from scratch, e.g. on the digits)."
            )
        if str(captions) == "random":
            if num_classes is None:
                raise UsageError("captions=random needs num_classes, the number of labels to draw captions for.")
            self.table = CaptionTable.random(num_classes, self.caption_tokens, text_width, pooled_width,
                                             self.caption_seed)
        else:
            self.table = CaptionTable.load(captions)
            self._check_table(captions, num_classes, text_width, pooled_width)

    def _check_table(self, path: str | os.PathLike, num_classes: int | None, text_width: int,
                     pooled_width: int | None) -> None:
        table, problems = self.table, []
        if num_classes is not None and table.num_classes != num_classes:
            problems.append(f"it has captions for {table.num_classes} classes (and the empty prompt), the model "
                            f"config says num_classes={num_classes}")
        if table.encoder_hidden_states.shape[-1] != text_width:
            problems.append(f"its embeddings are {table.encoder_hidden_states.shape[-1]} wide, the model's "
                            f"{self.text_width_key} is {text_width}")
        if pooled_width is not None and table.pooled_projections is None:
            problems.append(f"it has no 'pooled_projections', which {self.diffusers_class} takes")
        elif pooled_width is not None and table.pooled_projections.shape[-1] != pooled_width:
            problems.append(f"its pooled projections are {table.pooled_projections.shape[-1]} wide, the model's "
                            f"{self.pooled_width_key} is {pooled_width}")
        if problems:
            raise UsageError(f"captions={path} does not fit this {self.diffusers_class}: {'; '.join(problems)}.")

    @property
    def num_classes(self) -> int:
        return self.table.num_classes

    def options(self) -> dict[str, Any]:
        return {"captions": self.captions, "num_classes": self.num_classes, "caption_tokens": self.caption_tokens,
                "caption_seed": self.caption_seed, "class_dropout_prob": self.class_dropout_prob}

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Prediction (N, C_out, H, W) for x (N, C, H, W) at times t (N,), conditioned on the captions of labels y (N,).

        Labels flagged 1 in force_drop_ids (also in eval mode), or drawn with class_dropout_prob in training, read
        the empty prompt's caption (the null label `num_classes`).
        """
        y = drop_labels(y, self.num_classes, force_drop_ids, self.training, self.class_dropout_prob)
        caption = {name: tensor.to(x.dtype) if tensor.is_floating_point() else tensor
                   for name, tensor in self.table(y).items()}
        return self.predict(x, t, caption)

    def predict(self, x: torch.Tensor, t: torch.Tensor, caption: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's prediction in the project's convention, given the caption tensors of every sample."""
        raise NotImplementedError


class DiffusersPixArt(TextConditionedDenoiser):
    """PixArtTransformer2DModel (PixArt-alpha/sigma) on class captions: Gaussian diffusion, integer timesteps,
    epsilon and a learned variance, as DiT."""

    kind = "pixart"
    diffusers_class = "PixArtTransformer2DModel"
    text_width_key = "caption_channels"
    vae_scale_factor = 8  # pixels per latent: the resolution and aspect-ratio conditions of PixArt-alpha 1024

    def predict(self, x: torch.Tensor, t: torch.Tensor, caption: dict[str, torch.Tensor]) -> torch.Tensor:
        added = {"resolution": None, "aspect_ratio": None}
        if self.model.use_additional_conditions:
            height, width = x.shape[-2:]
            added = {"resolution": x.new_tensor([[height * self.vae_scale_factor, width * self.vae_scale_factor]])
                     .expand(x.shape[0], 2),
                     "aspect_ratio": x.new_tensor([[height / width]]).expand(x.shape[0], 1)}
        return self.model(hidden_states=x, timestep=t, added_cond_kwargs=added, return_dict=False,
                          **caption)[0]  # (N, C_out, H, W)


class DiffusersSD3(TextConditionedDenoiser):
    """SD3Transformer2DModel (MMDiT) on class captions, with the project's flow matching convention.

    SD3 is trained as a rectified flow from data (sigma = 0) to noise (sigma = 1), called at timestep 1000 sigma,
    and predicts noise - data. FlowMatching goes from noise (t = 0) to data (t = 1) and predicts data - noise: the
    adapter calls the model at sigma = 1 - t and negates its prediction, so real SD3 weights sample correctly.
    """

    kind = "sd3"
    diffusers_class = "SD3Transformer2DModel"
    text_width_key = "joint_attention_dim"
    pooled_width_key = "pooled_projection_dim"

    def predict(self, x: torch.Tensor, t: torch.Tensor, caption: dict[str, torch.Tensor]) -> torch.Tensor:
        caption.pop("encoder_attention_mask", None)  # SD3 attends to every token
        sigma = 1 - t  # (N,)
        velocity = self.model(hidden_states=x, timestep=1000 * sigma, return_dict=False, **caption)[0]
        return -velocity  # (N, C, H, W)


class DiffusersFlux(TextConditionedDenoiser):
    """FluxTransformer2DModel on class captions, with the project's flow matching convention (see DiffusersSD3).

    Flux takes its latents packed: every 2x2 patch of a (C, H, W) latent becomes one token of 4 C channels
    (config in_channels), with its row and column as rotary positions. The adapter packs x, calls the model at
    sigma = 1 - t (Flux scales it by 1000 itself), negates and unpacks the prediction. `sample_size` is the latent's
    height and width (Flux's config does not record it); `guidance` is the distilled guidance scale a
    guidance-embedding model (FLUX.1-dev) is called with.
    """

    kind = "flux"
    diffusers_class = "FluxTransformer2DModel"
    text_width_key = "joint_attention_dim"
    pooled_width_key = "pooled_projection_dim"

    def __init__(self, model: nn.Module, sample_size: int = 64, guidance: float = 3.5, **options: Any):
        super().__init__(model, **options)
        if model.config.in_channels % 4 or sample_size % 2:
            raise UsageError(f"Flux packs 2x2 patches of the latent into tokens: in_channels="
                             f"{model.config.in_channels} must be 4 x the latent channels and sample_size="
                             f"{sample_size} even.")
        self.sample_size, self.guidance = int(sample_size), float(guidance)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.model.config.in_channels // 4, self.sample_size, self.sample_size)  # before packing

    def options(self) -> dict[str, Any]:
        return {**super().options(), "sample_size": self.sample_size, "guidance": self.guidance}

    @classmethod
    def depth_config(cls, model_class: type[nn.Module], config: dict[str, Any], depth: int) -> dict[str, Any]:
        """`depth` blocks in all, split between the double- and single-stream lists in their configured proportion."""
        defaults = inspect.signature(model_class.__init__).parameters
        double = config.get("num_layers", defaults["num_layers"].default)
        single = config.get("num_single_layers", defaults["num_single_layers"].default)
        if depth < 2:
            raise UsageError(f"depth={depth}: Flux has two block lists; give at least 2 blocks.")
        share = min(max(round(depth * double / (double + single)), 1), depth - 1)
        return {"num_layers": share, "num_single_layers": depth - share}

    def predict(self, x: torch.Tensor, t: torch.Tensor, caption: dict[str, torch.Tensor]) -> torch.Tensor:
        caption.pop("encoder_attention_mask", None)
        batch, channels, height, width = x.shape
        tokens = x.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
        tokens = tokens.reshape(batch, (height // 2) * (width // 2), channels * 4)  # (N, HW / 4, 4 C)
        image_ids = torch.zeros(height // 2, width // 2, 3, device=x.device, dtype=x.dtype)
        image_ids[..., 1] = torch.arange(height // 2, device=x.device, dtype=x.dtype)[:, None]  # row
        image_ids[..., 2] = torch.arange(width // 2, device=x.device, dtype=x.dtype)[None, :]  # column
        text_ids = torch.zeros(caption["encoder_hidden_states"].shape[1], 3, device=x.device, dtype=x.dtype)
        guidance = x.new_full((batch,), self.guidance) if self.model.config.guidance_embeds else None
        velocity = self.model(hidden_states=tokens, timestep=1 - t, img_ids=image_ids.reshape(-1, 3),
                              txt_ids=text_ids, guidance=guidance, return_dict=False, **caption)[0]  # (N, HW / 4, 4 C)
        velocity = velocity.view(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return -velocity.reshape(batch, channels, height, width)  # (N, C, H, W)


def share_block_embedders(model: nn.Module) -> bool:
    """Make every block of a DiTTransformer2DModel use block 0's embedder if all are equal; whether they share it."""
    blocks = model.transformer_blocks
    if not all(same_weights(blocks[0].norm1.emb, block.norm1.emb) for block in blocks[1:]):
        return False
    for block in blocks[1:]:
        block.norm1.emb = blocks[0].norm1.emb
    return True


def unshare_block_embedders(model: nn.Module) -> None:
    """Give every block of a DiTTransformer2DModel its own copy of an embedder it shares with an earlier block."""
    seen: set[int] = set()
    for block in model.transformer_blocks:
        if id(block.norm1.emb) in seen:
            block.norm1.emb = copy.deepcopy(block.norm1.emb)
        seen.add(id(block.norm1.emb))


def same_weights(first: nn.Module, second: nn.Module) -> bool:
    """Whether two modules are one, or hold equal tensors under the same names (never for tensors on the meta device)."""
    if first is second:
        return True
    first_state, second_state = first.state_dict(), second.state_dict()
    if any(tensor.is_meta for tensor in [*first_state.values(), *second_state.values()]):
        return False
    return first_state.keys() == second_state.keys() and all(
        first_state[key].shape == second_state[key].shape and torch.equal(first_state[key], second_state[key])
        for key in first_state
    )


#################################################################################
#                                  Builder                                      #
#################################################################################

DIFFUSERS_DENOISERS: dict[str, type[DiffusersDenoiser]] = {
    adapter.kind: adapter for adapter in (DiffusersDiT, DiffusersPixArt, DiffusersSD3, DiffusersFlux)
}


def build_diffusers(kind: str, pretrained: str | os.PathLike | None = None, depth: int | None = None,
                    learn_sigma: bool | None = None, **options: Any) -> DiffusersDenoiser:
    """A diffusers transformer of `kind` as a denoiser: a save_pretrained folder's (`pretrained`), or random weights.

    `options` are the adapter's keywords (DiT: class_dropout_prob; PixArt, SD3, Flux: captions, num_classes, ...,
    see TextConditionedDenoiser) and the diffusers config (num_layers, num_attention_heads, ...): a random model is
    built from them; a folder must agree with every one given (its config.json fixes the architecture; prune to
    change the depth). `depth` is the block count under the name every model config shares (experiment=smoke sets
    it): diffusers' `num_layers`, for Flux both lists together in their configured proportion. `learn_sigma`, when given, says
    whether the output has twice the input channels (a learned variance), checked against the config; for a random
    model without `out_channels` it sets them. On the meta device (a blueprint) a folder's config suffices and no
    weights are read.
    """
    if kind not in DIFFUSERS_DENOISERS:
        raise UsageError(f"kind={kind!r} is not one of {sorted(DIFFUSERS_DENOISERS)}: the diffusers transformers that "
                         "have an adapter to the project's call convention (tinyfusion_pl.models.diffusers).")
    adapter = DIFFUSERS_DENOISERS[kind]
    adapter_keywords = [name for cls in adapter.__mro__ if "__init__" in vars(cls) and issubclass(cls, DiffusersDenoiser)
                        for name, parameter in inspect.signature(cls.__init__).parameters.items()
                        if name not in ("self", "model") and parameter.kind is not parameter.VAR_KEYWORD]
    adapter_options = {name: options.pop(name) for name in adapter_keywords if name in options}
    model_class = adapter.model_class()
    config = _config_keywords(model_class, options)
    if depth is not None:
        config.update(adapter.depth_config(model_class, config, depth))
    if pretrained is None:
        if learn_sigma is not None and config.get("out_channels") is None:
            default_in_channels = inspect.signature(model_class.__init__).parameters["in_channels"].default
            in_channels = config.get("in_channels", default_in_channels)
            config["out_channels"] = 2 * in_channels if learn_sigma else in_channels
        model = adapter.random_model(config)
    else:
        if not os.path.isdir(pretrained):
            raise MissingInputError(f"pretrained={pretrained} is not a folder; pass a folder written by "
                                    f"{model_class.__name__}.save_pretrained (config.json and its weights).")
        _check_folder_config(model_class, pretrained, config)
        if torch.empty(0).is_meta:
            model = model_class.from_config(model_class.load_config(pretrained))
        else:
            model = from_pretrained(model_class, pretrained)
    _check_learn_sigma(model, learn_sigma)
    return adapter(model, **adapter_options)


def _config_keywords(model_class: type[nn.Module], options: dict[str, Any]) -> dict[str, Any]:
    """The diffusers config keywords of `options`, checked against the class."""
    parameters = inspect.signature(model_class.__init__).parameters
    valid = [name for name in parameters if name != "self"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise UsageError(f"{unknown} are not config keywords of {model_class.__name__}; valid ones: {valid}.")
    # Plain lists: diffusers writes the config as JSON (Hydra hands over its own list type).
    return {name: list(value) if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) else value
            for name, value in options.items()}


def _check_folder_config(model_class: type[nn.Module], folder: str | os.PathLike, config: dict[str, Any]) -> None:
    """Refuse a folder whose config.json disagrees with config keywords the model config gives."""
    saved = model_class.load_config(folder)

    def comparable(value: Any) -> Any:
        return tuple(value) if isinstance(value, (list, tuple)) else value

    differing = [f"{key}: config.json {saved.get(key)!r}, model config {value!r}" for key, value in config.items()
                 if comparable(saved.get(key)) != comparable(value)]
    if differing:
        raise UsageError(f"pretrained={folder} is not the model the config describes ({'; '.join(differing)}). "
                         "Set those keys to the folder's values, or leave them out of the model config.")


def _check_learn_sigma(model: nn.Module, learn_sigma: bool | None) -> None:
    if learn_sigma is None:
        return
    in_channels = model.config.in_channels
    out_channels = model.config.out_channels or in_channels
    if (out_channels == 2 * in_channels) != learn_sigma:
        raise UsageError(
            f"learn_sigma={learn_sigma} but the {type(model).__name__} has in_channels={in_channels} and "
            f"out_channels={out_channels}: a learned variance doubles the channels. Set model.learn_sigma="
            f"{out_channels == 2 * in_channels} (the objective reads it)."
        )
