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
from types import ModuleType
from typing import Any, ClassVar

import torch
import torch.nn as nn

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
        if isinstance(class_dropout_prob, bool) or not isinstance(class_dropout_prob, (int, float)) \
                or not 0 <= class_dropout_prob < 1:
            raise ValueError(f"class_dropout_prob={class_dropout_prob!r} must be a number in [0, 1), the probability "
                             "of training a sample without its label (classifier-free guidance; DiT uses 0.1).")
        self.class_dropout_prob = float(class_dropout_prob)
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
        if force_drop_ids is not None:
            if force_drop_ids.shape != y.shape:
                raise ValueError(f"force_drop_ids has shape {tuple(force_drop_ids.shape)} but the labels have shape "
                                 f"{tuple(y.shape)}; pass one 0/1 flag per label.")
            y = torch.where(force_drop_ids == 1, self.num_classes, y)  # (N,)
        elif self.training and self.class_dropout_prob > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.class_dropout_prob
            y = torch.where(drop, self.num_classes, y)  # (N,)
        return self.model(hidden_states=x, timestep=t, class_labels=y, return_dict=False)[0]  # (N, C_out, H, W)


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

DIFFUSERS_DENOISERS: dict[str, type[DiffusersDenoiser]] = {DiffusersDiT.kind: DiffusersDiT}


def build_diffusers(kind: str, pretrained: str | os.PathLike | None = None, depth: int | None = None,
                    learn_sigma: bool | None = None, **options: Any) -> DiffusersDenoiser:
    """A diffusers transformer of `kind` as a denoiser: a save_pretrained folder's (`pretrained`), or random weights.

    `options` are the adapter's keywords (DiT: class_dropout_prob) and the diffusers config (num_layers,
    num_attention_heads, ...): a random model is built from them; a folder must agree with every one given (its
    config.json fixes the architecture; prune to change the depth). `depth` is the block count under the name
    every model config shares (experiment=smoke sets it): diffusers' `num_layers`. `learn_sigma`, when given, says
    whether the output has twice the input channels (a learned variance), checked against the config; for a random
    model without `out_channels` it sets them. On the meta device (a blueprint) a folder's config suffices and no
    weights are read.
    """
    if kind not in DIFFUSERS_DENOISERS:
        raise ValueError(f"kind={kind!r} is not one of {sorted(DIFFUSERS_DENOISERS)}: the diffusers transformers that "
                         "have an adapter to the project's call convention (tinyfusion_pl.models.diffusers).")
    adapter = DIFFUSERS_DENOISERS[kind]
    adapter_keywords = [name for name in inspect.signature(adapter.__init__).parameters if name not in ("self", "model")]
    adapter_options = {name: options.pop(name) for name in adapter_keywords if name in options}
    model_class = adapter.model_class()
    config = _config_keywords(model_class, options, depth)
    if pretrained is None:
        if learn_sigma is not None and config.get("out_channels") is None:
            default_in_channels = inspect.signature(model_class.__init__).parameters["in_channels"].default
            in_channels = config.get("in_channels", default_in_channels)
            config["out_channels"] = 2 * in_channels if learn_sigma else in_channels
        model = adapter.random_model(config)
    else:
        if not os.path.isdir(pretrained):
            raise FileNotFoundError(f"pretrained={pretrained} is not a folder; pass a folder written by "
                                    f"{model_class.__name__}.save_pretrained (config.json and its weights).")
        _check_folder_config(model_class, pretrained, config)
        if torch.empty(0).is_meta:
            model = model_class.from_config(model_class.load_config(pretrained))
        else:
            model = from_pretrained(model_class, pretrained)
    _check_learn_sigma(model, learn_sigma)
    return adapter(model, **adapter_options)


def _config_keywords(model_class: type[nn.Module], options: dict[str, Any], depth: int | None) -> dict[str, Any]:
    """The diffusers config keywords of `options`, checked against the class, with `depth` as num_layers."""
    parameters = inspect.signature(model_class.__init__).parameters
    valid = [name for name in parameters if name != "self"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"{unknown} are not config keywords of {model_class.__name__}; valid ones: {valid}.")
    config = dict(options)
    if depth is not None:
        if "num_layers" in config and config["num_layers"] != depth:
            raise ValueError(f"depth={depth} and num_layers={config['num_layers']} disagree; give one of them.")
        config["num_layers"] = depth
    return config


def _check_folder_config(model_class: type[nn.Module], folder: str | os.PathLike, config: dict[str, Any]) -> None:
    """Refuse a folder whose config.json disagrees with config keywords the model config gives."""
    saved = model_class.load_config(folder)

    def comparable(value: Any) -> Any:
        return tuple(value) if isinstance(value, (list, tuple)) else value

    differing = [f"{key}: config.json {saved.get(key)!r}, model config {value!r}" for key, value in config.items()
                 if comparable(saved.get(key)) != comparable(value)]
    if differing:
        raise ValueError(f"pretrained={folder} is not the model the config describes ({'; '.join(differing)}). "
                         "Set those keys to the folder's values, or leave them out of the model config.")


def _check_learn_sigma(model: nn.Module, learn_sigma: bool | None) -> None:
    if learn_sigma is None:
        return
    in_channels = model.config.in_channels
    out_channels = model.config.out_channels or in_channels
    if (out_channels == 2 * in_channels) != learn_sigma:
        raise ValueError(
            f"learn_sigma={learn_sigma} but the {type(model).__name__} has in_channels={in_channels} and "
            f"out_channels={out_channels}: a learned variance doubles the channels. Set model.learn_sigma="
            f"{out_channels == 2 * in_channels} (the objective reads it)."
        )
