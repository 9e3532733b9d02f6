"""Read DiT and SiT checkpoints in the layouts found in practice and load them strictly, with readable errors.

Layouts: a plain state dict (the public DiT-XL-2-256x256.pt and SiT-XL-2-256x256.pt, TinyDiT-D14), the
reference training code's {'model', 'ema', 'opt', 'args'} dict, and a Lightning checkpoint of our
DiffusionModule (denoiser under 'net.', its AveragedModel EMA under 'ema.module.'), each possibly with
DDP 'module.' or torch.compile '_orig_mod.' prefixes.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from tinyfusion_pl.errors import CheckpointError, MissingInputError
from tinyfusion_pl.models.dit import DiT, DiT_models, build_dit
from tinyfusion_pl.models.sit import SiT, SiT_models, build_sit

# Prefixes added by wrappers around the model: DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Keys infer_dit_config reads; a state dict without them is not a DiT.
_REQUIRED_DIT_KEYS = (
    "x_embedder.proj.weight",
    "pos_embed",
    "y_embedder.embedding_table.weight",
    "final_layer.linear.weight",
    "blocks.0.mlp.fc1.weight",
)
# Constructor keywords that describe the data rather than the architecture of a registry entry.
_DATA_KWARGS = ("input_size", "in_channels", "num_classes", "learn_sigma")
_SHOWN_KEYS = 5


class CheckpointMismatchError(CheckpointError):
    """A state dict does not fit a model: lists missing/unexpected keys, shape mismatches and a fitting entry."""


@dataclasses.dataclass(frozen=True)
class _ModelKind:
    """A model class on DiT's backbone, its size registry, and the public functions that build and load it."""

    model_class: type[DiT]
    registry: Mapping[str, Callable[..., DiT]]
    build: Callable[..., DiT]
    loader_name: str


_DIT_KIND = _ModelKind(DiT, DiT_models, build_dit, "dit_from_checkpoint")
_SIT_KIND = _ModelKind(SiT, SiT_models, build_sit, "sit_from_checkpoint")


def _kind_of(model: nn.Module) -> _ModelKind:
    """SiT's kind for a SiT, DiT's for anything else (a DiT, or another module loaded with DiT keys)."""
    return _SIT_KIND if isinstance(model, SiT) else _DIT_KIND


#################################################################################
#                              Reading checkpoints                              #
#################################################################################


def load_checkpoint_file(path: str | os.PathLike, weights_only: bool = True) -> Any:
    """Load a checkpoint file onto the CPU; tensors and plain containers only unless weights_only=False.

    argparse.Namespace (the reference code stores its 'args' so) is allowed in weights-only mode.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(
            f"checkpoint path={str(path)!r} does not exist or is not a file; pass the path of a .pt/.ckpt file."
        )
    with path.open("rb") as file:
        is_pickle = file.read(1) == b"\x80"  # torch's legacy format; torch.save writes a zip archive
    if not zipfile.is_zipfile(path) and not is_pickle:
        raise CheckpointError(
            f"could not read checkpoint {str(path)!r}: it is not a torch checkpoint or it is damaged (neither the zip "
            "archive torch.save writes nor a legacy pickle; e.g. a download cut short). Write or download it again."
        )
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as error:
        if weights_only and "weights only" in str(error).lower():
            first_line = str(error).strip().splitlines()[0]
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds objects other than tensors and plain containers, which "
                f"weights-only loading refuses ({first_line}). If you trust the file, load it with "
                "load_checkpoint_file(path, weights_only=False) and pass the result on."
            ) from error
        raise CheckpointError(
            f"could not read checkpoint {str(path)!r}: it is not a torch checkpoint or it is damaged ({error})."
        ) from error
    except Exception as error:  # a damaged file fails deep inside the unpickler with many error types
        raise CheckpointError(
            f"could not read checkpoint {str(path)!r}: it is not a torch checkpoint or it is damaged ({error})."
        ) from error


def extract_state_dict(obj: Any, prefer: str = "ema") -> dict[str, torch.Tensor]:
    """Return the plain model state dict inside a loaded checkpoint, with wrapper prefixes removed.

    prefer='ema' takes the EMA weights where the checkpoint has both, prefer='model' the trained ones;
    when only the other is present it is used, with a warning.
    """
    if prefer not in ("ema", "model"):
        raise ValueError(
            f"prefer={prefer!r} is not allowed: use 'ema' (EMA weights) or 'model' (raw weights)."
        )
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"expected a state dict or a checkpoint dict but got {_describe(obj)}; pass what torch.load "
            "returned for a DiT checkpoint (a state dict, {'model', 'ema', ...}, or a Lightning checkpoint)."
        )
    if all(isinstance(value, torch.Tensor) for value in obj.values()):
        return _strip_wrapper_prefixes(obj)
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        return _from_lightning_state_dict(obj["state_dict"], prefer)
    if any(isinstance(obj.get(key), Mapping) for key in ("model", "ema")):
        return _from_reference_dict(obj, prefer)
    raise CheckpointError(
        f"unknown checkpoint layout with top-level keys {_preview(list(obj))}; expected a plain state dict, "
        "the reference code's {'model': ..., 'ema': ...}, or a Lightning checkpoint with 'state_dict'."
    )


def _from_reference_dict(checkpoint: Mapping[str, Any], prefer: str) -> dict[str, torch.Tensor]:
    """Pick 'ema' or 'model' from the reference training code's checkpoint dict (MAR's calls its EMA 'model_ema')."""
    if not isinstance(checkpoint.get("ema"), Mapping) and isinstance(checkpoint.get("model_ema"), Mapping):
        checkpoint = {**checkpoint, "ema": checkpoint["model_ema"]}
    other = "model" if prefer == "ema" else "ema"
    chosen = prefer if isinstance(checkpoint.get(prefer), Mapping) else other
    if chosen != prefer:
        warnings.warn(
            f"checkpoint has no {prefer!r} weights; using its {chosen!r} weights instead.", stacklevel=3
        )
    return _strip_wrapper_prefixes(checkpoint[chosen])


def _from_lightning_state_dict(state_dict: Mapping[str, Any], prefer: str) -> dict[str, torch.Tensor]:
    """Pick the denoiser ('net.') or its AveragedModel EMA ('ema.module.') from a Lightning state_dict."""
    # 'ema.n_averaged', the AveragedModel's update counter, lies outside 'ema.module.' and is dropped.
    ema = {
        key[len("ema.module.") :]: value for key, value in state_dict.items() if key.startswith("ema.module.")
    }
    net = {key[len("net.") :]: value for key, value in state_dict.items() if key.startswith("net.")}
    candidates = {"ema": ema, "model": net}
    other = "model" if prefer == "ema" else "ema"
    chosen = prefer if candidates[prefer] else other
    if not candidates[chosen]:
        prefixes = sorted({key.split(".", 1)[0] + "." for key in state_dict})
        raise CheckpointError(
            "Lightning checkpoint has no denoiser weights: expected keys starting with 'net.' or "
            f"'ema.module.' in its state_dict, found the prefixes {_preview(prefixes)}."
        )
    if chosen != prefer:
        names = {"ema": "EMA ('ema.module.')", "model": "raw ('net.')"}
        warnings.warn(
            f"Lightning checkpoint has no {names[prefer]} weights; using its {names[chosen]} weights.",
            stacklevel=3,
        )
    return _strip_wrapper_prefixes(candidates[chosen])


def _strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove leading DDP 'module.' and torch.compile '_orig_mod.' prefixes from every key."""
    stripped = {}
    for key, value in state_dict.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        stripped[key] = value
    return stripped


#################################################################################
#                    Reading the architecture from the shapes                   #
#################################################################################


def infer_dit_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Return the DiT constructor kwargs that the tensor shapes of a DiT state dict imply.

    The label table is assumed to have DiT's null row (class_dropout_prob > 0), so num_classes is its
    row count minus one. The head count leaves no trace in the shapes: it is the registry's count for
    that width (16 for 1152, ...); for another width it is hidden_size // 64 when that divides evenly
    (64-wide heads, as DiT-L/B/S), else the largest count up to 16 that divides hidden_size. Pass
    num_heads yourself when you know it.
    """
    missing = [key for key in _REQUIRED_DIT_KEYS if key not in state_dict]
    if missing:
        raise CheckpointError(
            f"cannot read a DiT config: the state dict lacks {', '.join(missing)}; its keys start with "
            f"{_preview(_natural_sorted(state_dict))}. Is it a DiT state dict (see extract_state_dict)?"
        )
    hidden_size, in_channels, patch_size, _ = state_dict["x_embedder.proj.weight"].shape  # (D, C, p, p)
    num_tokens = state_dict["pos_embed"].shape[1]  # (1, T, D)
    grid_size = math.isqrt(num_tokens)
    if grid_size * grid_size != num_tokens:
        raise CheckpointError(
            f"pos_embed has {num_tokens} tokens, not a square patch grid; a DiT has a square grid."
        )

    block_indices = sorted({int(key.split(".")[1]) for key in state_dict if re.match(r"blocks\.\d+\.", key)})
    if block_indices != list(range(len(block_indices))):
        raise CheckpointError(
            f"block indices {_preview(block_indices, limit=30)} are not 0..{len(block_indices) - 1}: the "
            "blocks were removed without renumbering. Renumber the kept blocks 0..K-1 (prune_blocks does)."
        )

    out_channels = state_dict["final_layer.linear.weight"].shape[0] // (patch_size * patch_size)
    if out_channels not in (in_channels, 2 * in_channels):
        raise CheckpointError(
            f"final_layer.linear predicts {out_channels} channels per pixel for {in_channels} input channels; "
            "a DiT predicts in_channels (learn_sigma=False) or 2 * in_channels (learn_sigma=True)."
        )
    return {
        "input_size": grid_size * patch_size,
        "patch_size": patch_size,
        "in_channels": in_channels,
        "hidden_size": hidden_size,
        "depth": len(block_indices),
        "num_heads": _num_heads_for_width(hidden_size),
        "mlp_ratio": state_dict["blocks.0.mlp.fc1.weight"].shape[0] / hidden_size,
        "num_classes": state_dict["y_embedder.embedding_table.weight"].shape[0] - 1,
        "learn_sigma": out_channels == 2 * in_channels,
    }


def match_registry(
    state_dict: Mapping[str, torch.Tensor], registry: Mapping[str, Callable[..., DiT]] | None = None
) -> list[str] | None:
    """Return the registry names whose architecture has exactly this state dict's keys and shapes, or None.

    The data keywords (input_size, in_channels, num_classes, learn_sigma) are taken from the state dict,
    so a DiT-Tiny/2 trained on 8x8 digits still matches DiT-Tiny/2. registry is DiT_models unless given
    (SiT_models names the SiT sizes of the same shapes).
    """
    if registry is None:
        registry = DiT_models
    try:
        config = infer_dit_config(state_dict)
    except ValueError:
        return None
    data_kwargs = {key: config[key] for key in _DATA_KWARGS}
    wanted_architecture = (config["depth"], config["hidden_size"], config["patch_size"], config["mlp_ratio"])
    wanted_shapes = {key: tuple(value.shape) for key, value in state_dict.items()}
    names = []
    for name, factory in registry.items():
        if _entry_architecture(factory)[:4] != wanted_architecture:
            continue
        with torch.device("meta"):
            candidate = factory(**data_kwargs)
        if {key: tuple(value.shape) for key, value in candidate.state_dict().items()} == wanted_shapes:
            names.append(name)
    return names or None


@functools.cache
def _entry_architecture(factory: Callable[..., DiT]) -> tuple[int, int, int, float, int]:
    """(depth, hidden_size, patch_size, mlp_ratio, num_heads) of a registry factory, read from a meta model."""
    with torch.device("meta"):
        model = factory()
    mlp_ratio = model.blocks[0].mlp.fc1.out_features / model.hidden_size
    return model.depth, model.hidden_size, model.patch_size, mlp_ratio, model.num_heads


def _num_heads_for_width(hidden_size: int) -> int:
    """Head count for a width: the registry's, else 64-wide heads, else the largest divisor up to 16."""
    for factory in DiT_models.values():
        _, width, _, _, num_heads = _entry_architecture(factory)
        if width == hidden_size:
            return num_heads
    if hidden_size % 64 == 0:
        return hidden_size // 64
    return max(heads for heads in range(1, 17) if hidden_size % heads == 0)


#################################################################################
#                                 Strict loading                                #
#################################################################################


def load_dit_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load state_dict into model with strict=True, or raise CheckpointMismatchError explaining the mismatch.

    A model on the meta device takes the tensors themselves (assign=True) instead of copies.
    """
    expected = model.state_dict()
    missing = _natural_sorted(set(expected) - set(state_dict))
    unexpected = _natural_sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in _natural_sorted(set(expected) & set(state_dict))
        if tuple(state_dict[key].shape) != tuple(expected[key].shape)
    ]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(_mismatch_message(model, state_dict, missing, unexpected, mismatched))
    on_meta = any(tensor.is_meta for tensor in expected.values())
    model.load_state_dict(state_dict, strict=True, assign=on_meta)


def _mismatch_message(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    missing: list[str],
    unexpected: list[str],
    mismatched: list[str],
) -> str:
    """Compose the CheckpointMismatchError text: what differs, then which registry entry would fit."""
    lines = [f"the checkpoint does not fit this {type(model).__name__}:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {_preview(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {_preview(unexpected)}")
    if mismatched:
        lines.append(f"  shape mismatches ({len(mismatched)}): {_preview(mismatched)}")
    if any(".lora_" in key or ".base_layer." in key for key in unexpected):
        lines.append("It holds LoRA adapters: it is a checkpoint saved during a pruning run (stage=prune), not a "
                     "model. Load the model that run exported instead: prune/pruned.pt (decision.json names it).")
        return "\n".join(lines)
    try:
        config = infer_dit_config(state_dict)
    except ValueError as error:
        lines.append(f"It does not look like a DiT state dict: {error}")
        return "\n".join(lines)
    shape_summary = (
        f"depth {config['depth']}, hidden_size {config['hidden_size']}, patch_size {config['patch_size']}"
    )
    kind = _kind_of(model)
    fitting = match_registry(state_dict, kind.registry)
    if fitting:
        lines.append(
            f"This checkpoint fits {' / '.join(fitting)} ({shape_summary}): "
            f"{kind.build.__name__}({fitting[0]!r}, ...) or {kind.loader_name}(checkpoint) loads it."
        )
    else:
        lines.append(
            f"No registry entry fits this checkpoint ({shape_summary}); "
            f"{kind.loader_name}(checkpoint) builds a {kind.model_class.__name__} from its shapes."
        )
    return "\n".join(lines)


def dit_from_checkpoint(
    path_or_state_dict: str | os.PathLike | Mapping[str, Any],
    name: str | None = None,
    *,
    prefer: str = "ema",
    **kwargs: Any,
) -> DiT:
    """Build a DiT for a checkpoint (file path, loaded checkpoint or state dict) and load it strictly.

    name picks a registry entry; without it the architecture is read from the shapes (infer_dit_config).
    kwargs override constructor arguments (e.g. num_heads, which shapes cannot reveal).
    """
    return _model_from_checkpoint(_DIT_KIND, path_or_state_dict, name, prefer, kwargs)


def sit_from_checkpoint(
    path_or_state_dict: str | os.PathLike | Mapping[str, Any],
    name: str | None = None,
    *,
    prefer: str = "ema",
    **kwargs: Any,
) -> SiT:
    """Build a SiT for a checkpoint (e.g. SiT-XL-2-256x256.pt) and load it strictly, as dit_from_checkpoint.

    name picks a SiT registry entry ('SiT-XL/2', ...); without it the architecture is read from the shapes.
    """
    return _model_from_checkpoint(_SIT_KIND, path_or_state_dict, name, prefer, kwargs)


def _model_from_checkpoint(
    kind: _ModelKind,
    path_or_state_dict: str | os.PathLike | Mapping[str, Any],
    name: str | None,
    prefer: str,
    kwargs: dict[str, Any],
) -> DiT:
    """Read the checkpoint, build kind's model from its registry or the shapes, and load it strictly."""
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        checkpoint = load_checkpoint_file(path_or_state_dict)
    else:
        checkpoint = path_or_state_dict
    state_dict = extract_state_dict(checkpoint, prefer=prefer)
    # Build on meta (no initialisation cost), then allocate; the strict load below fills every tensor.
    if name is None:
        with torch.device("meta"):
            model = kind.model_class(**{**infer_dit_config(state_dict), **kwargs})
    else:
        try:
            config = infer_dit_config(state_dict)
            data_kwargs = {key: config[key] for key in _DATA_KWARGS}
        except ValueError:
            data_kwargs = {}  # not DiT-shaped: the strict load below explains the mismatch
        with torch.device("meta"):
            model = kind.build(name, **{**data_kwargs, **kwargs})
    # Copies, not the checkpoint's tensors: a model built from another model's state dict must not share them.
    model.to_empty(device="cpu")
    load_dit_state_dict(model, state_dict)
    return model


#################################################################################
#                                 Message helpers                               #
#################################################################################


def _natural_sorted(keys: Any) -> list[Any]:
    """Sort keys so that 'blocks.2' comes before 'blocks.10'."""
    return sorted(
        keys, key=lambda key: [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(key))]
    )


def _preview(items: list[Any], limit: int = _SHOWN_KEYS) -> str:
    """Show the first `limit` items and how many more there are."""
    shown = ", ".join(str(item) for item in items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _describe(obj: Any) -> str:
    """Name an unexpected object's type, and say when a mapping is empty."""
    if isinstance(obj, Mapping):
        return "an empty dict"
    return f"an object of type {type(obj).__name__}"
