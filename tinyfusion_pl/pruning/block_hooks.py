"""Forward hooks that turn a block into x_out = m * block(x, ...) + (1 - m) * x, removable without a trace.

A block carries one hidden state (DiT, PixArt) or several streams (SD3, Flux: image and text tokens). Every
stream the block returns is mixed with the same mask, so a dropped block passes all of them through.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from tinyfusion_pl.families import BlockStreams
from tinyfusion_pl.pruning.containers import BlockSequence, find_owner

# What a mask provider returns for one block call: a (B,) 0/1 tensor mixes per sample; True keeps the
# block's output untouched; False skips the block (every stream it returns becomes its input).
BlockMask = torch.Tensor | bool
# The provider sees the block's global index, its input hidden state (the first stream) and the block.
MaskProvider = Callable[[int, torch.Tensor, nn.Module], BlockMask]
# What a user passes as `streams`: one description for every block, one per container, or None.
StreamsArgument = BlockStreams | Sequence[BlockStreams | None] | None

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_STREAMS_EXAMPLE = (
    "e.g. BlockStreams(inputs=('hidden_states', 'encoder_hidden_states'), "
    "outputs=('encoder_hidden_states', 'hidden_states'))"
)


class HiddenStateArgument:
    """Where a block receives its hidden state (or one stream): a positional index, a keyword name, or both.

    `option` is what the user set to name it (hidden_state, streams.inputs), so messages point at it.
    """

    def __init__(self, block: nn.Module, hidden_state: int | str, option: str = "hidden_state") -> None:
        self.block_name = type(block).__name__
        self.hidden_state = hidden_state
        self.option = option
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
                    f"{option}={hidden_state} is past the positional arguments of "
                    f"{self.block_name}.forward({self.signature}). Pass the index or the name of the argument "
                    "that carries the hidden state."
                )
            return
        names = [p.name for p in parameters if p.kind is not inspect.Parameter.VAR_POSITIONAL]
        if hidden_state not in names and not takes_var_kwargs:
            raise ValueError(
                f"{option}={hidden_state!r} is not an argument of {self.block_name}.forward({self.signature}). "
                f"Pass one of {names}" + (" (or its positional index)." if option == "hidden_state" else ".")
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
            what = "the hidden state" if self.option == "hidden_state" else "the stream"
            raise ValueError(
                f"{self.block_name} was called with {len(args)} positional argument(s) and keywords "
                f"{sorted(kwargs)}, none of which is {what} {self.option}={self.hidden_state!r}. "
                f"Set {self.option} to the index or name of the argument that carries it."
            )
        if not isinstance(hidden, torch.Tensor):
            raise ValueError(
                f"{self.option}={self.hidden_state!r} of {self.block_name} is a {type(hidden).__name__}, "
                f"not a tensor. Set {self.option} to the argument that carries the hidden state."
            )
        return hidden


# ---------------------------------------------------------------------------------------- streams


def streams_problem(streams: object, container_count: int) -> str | None:
    """Why `streams` is not None, a BlockStreams, or one BlockStreams/None per container (None when it is fine)."""
    if streams is None:
        return None
    if isinstance(streams, BlockStreams):
        return _block_streams_problem(streams, "streams")
    if isinstance(streams, (str, bytes)) or not isinstance(streams, Sequence):
        return (f"streams={streams!r} must be None (one hidden state, or the model family's streams), a "
                f"BlockStreams ({_STREAMS_EXAMPLE}), or a list of them, one per block container")
    if len(streams) != container_count:
        return (f"streams lists {len(streams)} descriptions for {container_count} block container(s); give one "
                "BlockStreams (or None) per container, or one BlockStreams for all")
    problems = [_block_streams_problem(entry, f"streams[{index}]") for index, entry in enumerate(streams)
                if entry is not None]
    return next((problem for problem in problems if problem), None)


def _block_streams_problem(streams: object, name: str) -> str | None:
    if not isinstance(streams, BlockStreams):
        return f"{name}={streams!r} must be a BlockStreams or None ({_STREAMS_EXAMPLE})"
    inputs, outputs = streams.inputs, streams.outputs
    for field, names in (("inputs", inputs), ("outputs", outputs)):
        if isinstance(names, str) or not isinstance(names, Sequence) or not names or not all(
            isinstance(entry, str) and entry for entry in names
        ):
            return f"{name}.{field}={names!r} must be a non-empty list of argument names ({_STREAMS_EXAMPLE})"
    if len(set(inputs)) != len(inputs):
        return f"{name}.inputs={list(inputs)} names a stream more than once"
    strangers = [entry for entry in outputs if entry not in inputs]
    if strangers:
        return (f"{name}.outputs={list(outputs)} names {strangers}, not among the input streams {list(inputs)}: "
                "each returned position must be one of the streams the block takes")
    if len(set(outputs)) != len(outputs) or inputs[0] not in outputs:
        return (f"{name}.outputs={list(outputs)} must name each returned stream once, the hidden state "
                f"{inputs[0]!r} (the first input) among them")
    return None


def sequence_streams(root: nn.Module, sequence: BlockSequence, streams: StreamsArgument) -> list[BlockStreams | None]:
    """The streams of every block of `sequence`, one entry per block: the user's `streams` (one for all, or one per
    container), else those the model family of the module owning its container gives (SD3, Flux), else None."""
    if isinstance(streams, BlockStreams):
        per_container = [streams] * len(sequence.paths)
    elif streams is not None:
        per_container = list(streams)
    else:
        per_container = [family_streams(root, path) for path in sequence.paths]
    return [entry for entry, count in zip(per_container, sequence.counts, strict=True) for _ in range(count)]


def family_streams(root: nn.Module, path: str) -> BlockStreams | None:
    """The streams the model family of the module owning the container at `path` gives its blocks; None without one."""
    found = find_owner(root, path)
    if found is None:
        return None
    _, family, relative = found
    return family.block_streams(family.blocks.index(relative))


class BlockCall:
    """How one block is called: where each of its streams enters, and which stream each returned position carries.

    Without `streams` the block has one hidden state (`hidden_state`: its positional index or keyword name)
    and returns it as a tensor, or as the first element of a tuple/list whose other elements pass through.
    With `streams` (a BlockStreams), its tuple's first len(streams.outputs) positions are the streams named
    there, and the first input stream is the hidden state that selectors and distillation compare.
    """

    def __init__(self, block: nn.Module, streams: BlockStreams | None = None, hidden_state: int | str = 0) -> None:
        if streams is None:
            self.inputs = [HiddenStateArgument(block, hidden_state)]
            self.outputs: tuple[int, ...] = (0,)
        else:
            problem = _block_streams_problem(streams, "streams")
            if problem:
                raise ValueError(f"{type(block).__name__}: {problem}.")
            self.inputs = [HiddenStateArgument(block, name, option="streams.inputs") for name in streams.inputs]
            self.outputs = tuple(list(streams.inputs).index(name) for name in streams.outputs)
        self.streams = streams

    def find_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
        """The input stream tensors of one call, in the order of the description (the hidden state first)."""
        return [argument.find(args, kwargs) for argument in self.inputs]

    def hidden_output(self, output: Any) -> torch.Tensor:
        """The returned hidden state (the output position that carries the first input stream)."""
        values, _ = split_stream_outputs(output, len(self.outputs), self.streams is not None)
        return values[self.outputs.index(0)]

    def masked_output(self, output: Any, inputs: Sequence[torch.Tensor], mask: BlockMask) -> Any:
        """The block output with every returned stream mixed with its input: m * out + (1 - m) * x."""
        return masked_block_output(output, inputs if self.streams is not None else inputs[0], mask, self.outputs)


def split_stream_outputs(
    output: Any, count: int = 1, multi_stream: bool = False
) -> tuple[list[torch.Tensor | None], Callable[[Sequence[torch.Tensor | None]], Any]]:
    """The first `count` returned streams of a block's output (a tensor, or a tuple/list) and a rebuild function.

    A multi-stream block may return None for a stream it ends (SD3's last, context-pre-only block).
    """
    if isinstance(output, torch.Tensor) and count == 1:
        return [output], lambda values: values[0]
    allowed = (torch.Tensor, type(None)) if multi_stream else torch.Tensor
    if (
        isinstance(output, (tuple, list))
        and len(output) >= count
        and all(isinstance(value, allowed) for value in output[:count])
    ):
        rest = list(output[count:])
        if isinstance(output, list):
            return list(output[:count]), lambda values: [*values, *rest]
        if hasattr(output, "_fields"):  # a namedtuple is rebuilt from its fields
            return list(output[:count]), lambda values: type(output)(*values, *rest)
        return list(output[:count]), lambda values: (*values, *rest)
    if not multi_stream:
        raise ValueError(
            f"A masked block returned {type(output).__name__}; it must return the hidden state as a tensor or as "
            "the first element of a tuple/list."
        )
    raise ValueError(
        f"A masked block returned {type(output).__name__}"
        + (f" of length {len(output)}" if isinstance(output, (tuple, list)) else "")
        + f"; its streams description says it returns {count} streams as a tuple of tensors. "
        "Set streams.outputs to the streams the block returns, in order."
    )


def masked_block_output(
    output: Any, inputs: torch.Tensor | Sequence[torch.Tensor], mask: BlockMask, outputs: Sequence[int] = (0,)
) -> Any:
    """The block output with every returned stream replaced by m * out + (1 - m) * x (per sample when m is (B,)).

    inputs: the block's input hidden state, or its input streams; outputs: for every returned position, the
    index in `inputs` of the stream it carries. A stream the block ends (None) stays None under a per-sample mask.
    """
    if mask is True:
        return output
    multi_stream = not isinstance(inputs, torch.Tensor)
    streams_in = list(inputs) if multi_stream else [inputs]
    values, rebuild = split_stream_outputs(output, len(outputs), multi_stream)
    for position, (value, source) in enumerate(zip(values, outputs, strict=True)):
        if value is not None and value.shape != streams_in[source].shape:
            where = f"stream at output position {position}" if multi_stream else "hidden state"
            what = f"its input stream {source}" if multi_stream else "an input hidden state"
            raise ValueError(
                f"A masked block returned a {where} of shape {tuple(value.shape)} for {what} of shape "
                f"{tuple(streams_in[source].shape)}; a block that can be skipped keeps the shape. "
                + ("Check that streams.outputs lists the returned streams in order." if multi_stream else
                   "If the hidden state is another argument, set hidden_state to it.")
            )
    if mask is False:
        return rebuild([streams_in[source] for source in outputs])
    for stream in streams_in:
        if mask.shape != (stream.shape[0],):
            raise ValueError(
                f"A per-sample block mask of shape {tuple(mask.shape)} does not match the batch size "
                f"{stream.shape[0]} of the hidden state (the batch must be the first dimension)."
            )
    mixed = []
    for value, source in zip(values, outputs, strict=True):
        if value is None:
            mixed.append(None)
            continue
        drop = 1 - mask.to(value.dtype).view(-1, *([1] * (value.dim() - 1)))  # (B, 1, ...)
        # m * value + (1 - m) * x in one kernel (exactly value at m = 1, exactly x at m = 0), the same gradients.
        # The block output comes first so the result takes its memory layout: an input that is a transposed view
        # (a patch embedding's) would otherwise pass its strides on to every later block, and each LayerNorm
        # would copy it to a contiguous tensor, forward and backward.
        mixed.append(torch.lerp(value, streams_in[source].to(value.dtype), drop))
    return rebuild(mixed)


def block_calls(
    blocks: Sequence[nn.Module], streams: BlockStreams | Sequence[BlockStreams | None] | None, hidden_state: int | str
) -> list[BlockCall]:
    """One BlockCall per block: `streams` is one description for all blocks, or one (or None) per block."""
    per_block = [streams] * len(blocks) if streams is None or isinstance(streams, BlockStreams) else list(streams)
    if len(per_block) != len(blocks):
        raise ValueError(f"streams gives {len(per_block)} descriptions for {len(blocks)} blocks; give one per block.")
    return [BlockCall(block, entry, hidden_state) for block, entry in zip(blocks, per_block, strict=True)]


class BlockMaskHooks:
    """Forward hooks on every block of a sequence that apply the mask a provider gives for each call.

    `streams` describes multi-stream blocks: one BlockStreams for all, one (or None) per block, or None.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        mask_for_block: MaskProvider,
        hidden_state: int | str = 0,
        streams: BlockStreams | Sequence[BlockStreams | None] | None = None,
    ) -> None:
        self.calls = block_calls(blocks, streams, hidden_state)
        self.handles = [
            block.register_forward_hook(self._hook(index, block), with_kwargs=True)
            for index, block in enumerate(blocks)
        ]
        self.mask_for_block = mask_for_block

    def _hook(self, index: int, block: nn.Module) -> Callable[..., Any]:
        def apply_mask(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
            call = self.calls[index]
            inputs = call.find_inputs(args, kwargs)
            return call.masked_output(output, inputs, self.mask_for_block(index, inputs[0], block))

        return apply_mask

    def remove(self) -> None:
        """Remove every hook; the blocks behave exactly as before the hooks were added."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
