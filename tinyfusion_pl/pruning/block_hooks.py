"""Forward hooks that turn a block into x_out = m * block(x, ...) + (1 - m) * x, removable without a trace."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

# What a mask provider returns for one block call: a (B,) 0/1 tensor mixes per sample; True keeps the
# block's output untouched; False skips the block (its output hidden state becomes its input).
BlockMask = torch.Tensor | bool
MaskProvider = Callable[[int, torch.Tensor, nn.Module], BlockMask]

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


class HiddenStateArgument:
    """Where a block receives its hidden state: a positional index, a keyword name, or both."""

    def __init__(self, block: nn.Module, hidden_state: int | str) -> None:
        self.block_name = type(block).__name__
        self.hidden_state = hidden_state
        parameters = list(inspect.signature(block.forward).parameters.values())
        positional = [p for p in parameters if p.kind in _POSITIONAL]
        takes_var_args = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters)
        takes_var_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
        self.signature = ", ".join(p.name for p in parameters)
        if isinstance(hidden_state, int):
            self.position: int | None = hidden_state
            known = hidden_state < len(positional)
            self.name: str | None = positional[hidden_state].name if known else None
            if not known and not takes_var_args:
                raise ValueError(
                    f"hidden_state={hidden_state} is past the positional arguments of "
                    f"{self.block_name}.forward({self.signature}). Pass the index or the name of the argument "
                    "that carries the hidden state."
                )
            return
        names = [p.name for p in parameters if p.kind is not inspect.Parameter.VAR_POSITIONAL]
        if hidden_state not in names and not takes_var_kwargs:
            raise ValueError(
                f"hidden_state={hidden_state!r} is not an argument of {self.block_name}.forward({self.signature}). "
                f"Pass one of {names} (or its positional index)."
            )
        self.name = hidden_state
        positional_names = [p.name for p in positional]
        self.position = positional_names.index(hidden_state) if hidden_state in positional_names else None

    def find(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        """The hidden-state tensor of one call; raise naming the call when it is missing."""
        if self.name is not None and self.name in kwargs:
            hidden = kwargs[self.name]
        elif self.position is not None and self.position < len(args):
            hidden = args[self.position]
        else:
            raise ValueError(
                f"{self.block_name} was called with {len(args)} positional argument(s) and keywords "
                f"{sorted(kwargs)}, none of which is the hidden state hidden_state={self.hidden_state!r}. "
                "Set hidden_state to the index or name of the argument that carries the hidden state."
            )
        if not isinstance(hidden, torch.Tensor):
            raise ValueError(
                f"hidden_state={self.hidden_state!r} of {self.block_name} is a {type(hidden).__name__}, "
                "not a tensor. Set hidden_state to the argument that carries the hidden state."
            )
        return hidden


def split_hidden_output(output: Any) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    """The hidden state of a block's output (a tensor, or the first element of a tuple/list) and a rebuild function."""
    if isinstance(output, torch.Tensor):
        return output, lambda hidden: hidden
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        if isinstance(output, list):
            return output[0], lambda hidden: [hidden, *output[1:]]
        if hasattr(output, "_fields"):  # a namedtuple is rebuilt from its fields
            return output[0], lambda hidden: type(output)(hidden, *output[1:])
        return output[0], lambda hidden: (hidden, *output[1:])
    raise ValueError(
        f"A masked block returned {type(output).__name__}; it must return the hidden state as a tensor or as "
        "the first element of a tuple/list."
    )


def masked_block_output(output: Any, hidden_in: torch.Tensor, mask: BlockMask) -> Any:
    """The block output with its hidden state replaced by m * out + (1 - m) * x (per sample when m is (B,))."""
    if mask is True:
        return output
    hidden_out, rebuild = split_hidden_output(output)
    if hidden_out.shape != hidden_in.shape:
        raise ValueError(
            f"A masked block returned a hidden state of shape {tuple(hidden_out.shape)} for an input hidden "
            f"state of shape {tuple(hidden_in.shape)}; a block that can be skipped keeps the shape. If the "
            "hidden state is another argument, set hidden_state to it."
        )
    if mask is False:
        return rebuild(hidden_in)
    if mask.shape != (hidden_in.shape[0],):
        raise ValueError(
            f"A per-sample block mask of shape {tuple(mask.shape)} does not match the batch size "
            f"{hidden_in.shape[0]} of the hidden state (the batch must be the first dimension)."
        )
    keep = mask.to(hidden_out.dtype).view(-1, *([1] * (hidden_out.dim() - 1)))  # (B, 1, ...)
    return rebuild(keep * hidden_out + (1 - keep) * hidden_in.to(hidden_out.dtype))


class BlockMaskHooks:
    """Forward hooks on every block of a container that apply the mask a provider gives for each call."""

    def __init__(
        self, blocks: Sequence[nn.Module], mask_for_block: MaskProvider, hidden_state: int | str = 0
    ) -> None:
        self.hidden_arguments = [HiddenStateArgument(block, hidden_state) for block in blocks]
        self.handles = [
            block.register_forward_hook(self._hook(index, block), with_kwargs=True)
            for index, block in enumerate(blocks)
        ]
        self.mask_for_block = mask_for_block

    def _hook(self, index: int, block: nn.Module) -> Callable[..., Any]:
        def apply_mask(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
            hidden_in = self.hidden_arguments[index].find(args, kwargs)
            return masked_block_output(output, hidden_in, self.mask_for_block(index, hidden_in, block))

        return apply_mask

    def remove(self) -> None:
        """Remove every hook; the blocks behave exactly as before the hooks were added."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
