"""Masked blocks: x_out = m * block(x, ...) + (1 - m) * x per sample, for every block call convention."""

from collections import namedtuple

import pytest
import torch
import torch.nn as nn

from tinyfusion_pl.families import BlockStreams
from tinyfusion_pl.pruning.block_hooks import (
    BlockCall,
    BlockMaskHooks,
    HiddenStateArgument,
    masked_block_output,
)

DIM = 8
BlockOutput = namedtuple("BlockOutput", ["hidden", "aux"])


class ConditionedBlock(nn.Module):
    """DiT convention: block(x, c)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(DIM, DIM)
        self.modulation = nn.Linear(DIM, DIM)

    def forward(self, x, c):
        return x + torch.tanh(self.fc(x) * self.modulation(c)[:, None])


class PlainBlock(nn.Module):
    """ViT convention: block(x)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(DIM, DIM)

    def forward(self, x):
        return x + torch.sin(self.fc(x))


class TupleBlock(PlainBlock):
    """Returns (hidden, attention-like extra)."""

    def forward(self, x, scale=1.0):
        hidden = super().forward(x) * scale
        return hidden, hidden.mean(dim=-1)


class NamedTupleBlock(PlainBlock):
    def forward(self, x):
        hidden = super().forward(x)
        return BlockOutput(hidden, hidden.sum())


class ListBlock(PlainBlock):
    def forward(self, x):
        hidden = super().forward(x)
        return [hidden, "extra"]


class HiddenSecondBlock(nn.Module):
    """The hidden state is not the first argument: block(context, hidden)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(DIM, DIM)

    def forward(self, context, hidden):
        return hidden + self.fc(context)[:, None]


def hidden_of(output):
    return output if isinstance(output, torch.Tensor) else output[0]


def conventions():
    """(block, hidden_state option, call(block, x, c))."""
    return [
        ("block(x, c)", ConditionedBlock(), 0, lambda block, x, c: block(x, c)),
        ("block(x=x, c=c)", ConditionedBlock(), 0, lambda block, x, c: block(x=x, c=c)),
        ("block(x, c=c) by name", ConditionedBlock(), "x", lambda block, x, c: block(x, c=c)),
        ("block(x)", PlainBlock(), 0, lambda block, x, c: block(x)),
        ("tuple output", TupleBlock(), 0, lambda block, x, c: block(x, scale=0.5)),
        ("namedtuple output", NamedTupleBlock(), 0, lambda block, x, c: block(x)),
        ("list output", ListBlock(), 0, lambda block, x, c: block(x)),
        ("hidden second, by index", HiddenSecondBlock(), 1, lambda block, x, c: block(c, x)),
        ("hidden second, by name", HiddenSecondBlock(), "hidden", lambda block, x, c: block(c, hidden=x)),
    ]


@pytest.mark.parametrize("name, block, hidden_state, call", conventions(), ids=[c[0] for c in conventions()])
def test_per_sample_mask_gives_the_block_output_where_kept_and_the_input_where_dropped(
    name, block, hidden_state, call
):
    torch.manual_seed(0)
    x, c = torch.randn(4, 3, DIM), torch.randn(4, DIM)
    plain = call(block, x, c)
    mask = torch.tensor([1.0, 0.0, 0.0, 1.0])
    hooks = BlockMaskHooks([block], lambda index, hidden, module: mask, hidden_state=hidden_state)
    masked = call(block, x, c)
    assert type(masked) is type(plain)
    assert torch.equal(hidden_of(masked)[mask == 1], hidden_of(plain)[mask == 1])
    assert torch.equal(hidden_of(masked)[mask == 0], x[mask == 0])
    if not isinstance(plain, torch.Tensor):
        assert len(masked) == len(plain) and all(
            torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
            for a, b in zip(masked[1:], plain[1:], strict=True)
        ), "the rest of a tuple output passes through untouched"
    hooks.remove()
    assert not block._forward_hooks
    assert torch.equal(hidden_of(call(block, x, c)), hidden_of(plain))


@pytest.mark.parametrize("name, block, hidden_state, call", conventions(), ids=[c[0] for c in conventions()])
def test_hard_decisions_keep_or_skip_the_block(name, block, hidden_state, call):
    x, c = torch.randn(2, 3, DIM), torch.randn(2, DIM)
    plain = call(block, x, c)
    decision = {"keep": True}
    hooks = BlockMaskHooks([block], lambda index, hidden, module: decision["keep"], hidden_state=hidden_state)
    assert torch.equal(hidden_of(call(block, x, c)), hidden_of(plain))
    decision["keep"] = False
    assert torch.equal(hidden_of(call(block, x, c)), x)
    hooks.remove()


def test_the_mask_gradient_is_the_block_residual():
    torch.manual_seed(1)
    block = ConditionedBlock()
    x, c = torch.randn(3, 5, DIM), torch.randn(3, DIM)
    weights = torch.randn(3, 5, DIM)
    mask = torch.tensor([1.0, 0.0, 1.0], requires_grad=True)
    with torch.no_grad():
        residual = block(x, c) - x  # (B, T, D)
    BlockMaskHooks([block], lambda index, hidden, module: mask)
    (block(x, c) * weights).sum().backward()
    assert torch.allclose(mask.grad, (weights * residual).sum(dim=(1, 2)), atol=1e-5)


def test_the_mixed_output_takes_the_block_outputs_memory_layout_not_a_transposed_inputs():
    # A patch embedding hands the first block a transposed view; if the mixture kept that layout, every later
    # block would get it too, and each LayerNorm would copy its input (forward and backward).
    torch.manual_seed(2)
    block = ConditionedBlock()
    block.forward = lambda x, c: torch.tanh(block.fc(x) * block.modulation(c)[:, None]) + x  # the sum takes fc's layout
    x = torch.randn(3, DIM, 5).transpose(1, 2)  # (B, T, D), not contiguous
    c = torch.randn(3, DIM)
    plain = block(x, c)
    assert plain.is_contiguous() and not x.is_contiguous()
    mask = torch.tensor([1.0, 0.0, 1.0])
    BlockMaskHooks([block], lambda index, hidden, module: mask)
    masked = block(x, c)
    assert masked.is_contiguous()
    assert torch.equal(masked[mask == 1], plain[mask == 1]) and torch.equal(masked[mask == 0], x[mask == 0])


def test_every_block_of_a_container_gets_its_own_mask_column():
    torch.manual_seed(2)
    blocks = nn.ModuleList(ConditionedBlock() for _ in range(3))
    x, c = torch.randn(2, 4, DIM), torch.randn(2, DIM)
    masks = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])  # (B, L)
    BlockMaskHooks(list(blocks), lambda index, hidden, module: masks[:, index])
    out = x
    for block in blocks:
        out = block(out, c)
    with torch.no_grad():
        expected = []
        for sample in range(2):
            h = x[sample : sample + 1]
            for index in (i for i in range(3) if masks[sample, i] == 1):
                h = blocks[index].forward(h, c[sample : sample + 1])  # .forward bypasses the hooks
            expected.append(h)
    assert torch.allclose(out, torch.cat(expected), atol=1e-6)


def test_unknown_hidden_state_names_the_arguments_the_block_has():
    with pytest.raises(ValueError, match=r"hidden_state='h' is not an argument of ConditionedBlock.forward\(x, c\)"):
        HiddenStateArgument(ConditionedBlock(), "h")
    with pytest.raises(ValueError, match=r"hidden_state=2 is past the positional arguments of .*forward\(x, c\)"):
        HiddenStateArgument(ConditionedBlock(), 2)


class OptionalHiddenBlock(HiddenSecondBlock):
    def forward(self, context, hidden=None):
        hidden = torch.zeros(context.shape[0], 1, DIM) if hidden is None else hidden
        return super().forward(context, hidden)


def test_a_call_without_the_hidden_state_is_refused_with_what_to_set():
    block = OptionalHiddenBlock()
    BlockMaskHooks([block], lambda index, hidden, module: True, hidden_state="hidden")
    with pytest.raises(ValueError, match=r"1 positional argument\(s\) .* none of which is the hidden state hidden_state='hidden'"):
        block(torch.randn(2, DIM))


def test_shape_changing_blocks_and_odd_outputs_are_refused():
    hidden = torch.randn(2, 3, DIM)
    with pytest.raises(ValueError, match=r"shape \(2, 3, 4\) for an input hidden state of shape \(2, 3, 8\)"):
        masked_block_output(hidden[..., :4], hidden, torch.ones(2))
    with pytest.raises(ValueError, match=r"returned dict; it must return the hidden state as a tensor"):
        masked_block_output({"x": hidden}, hidden, torch.ones(2))
    with pytest.raises(ValueError, match=r"mask of shape \(3,\) does not match the batch size 2"):
        masked_block_output(hidden, hidden, torch.ones(3))


# ---------------------------------------------------------------------------- multi-stream blocks


class JointBlock(nn.Module):
    """An SD3/Flux-style block: takes image and text streams and returns both, text first (diffusers' order)."""

    def __init__(self, reverse_outputs: bool = True):
        super().__init__()
        self.image = nn.Linear(DIM, DIM)
        self.text = nn.Linear(DIM, DIM)
        self.modulation = nn.Linear(DIM, DIM)
        self.reverse_outputs = reverse_outputs

    def forward(self, hidden_states, encoder_hidden_states, temb):
        context = encoder_hidden_states.mean(dim=1, keepdim=True)  # (B, 1, D)
        hidden = hidden_states + torch.tanh(self.image(hidden_states) + context) * self.modulation(temb)[:, None]
        encoder = encoder_hidden_states + torch.sin(self.text(encoder_hidden_states))
        return (encoder, hidden) if self.reverse_outputs else (hidden, encoder)


JOINT = BlockStreams(inputs=("hidden_states", "encoder_hidden_states"), outputs=("encoder_hidden_states", "hidden_states"))
IN_ORDER = BlockStreams(inputs=("hidden_states", "encoder_hidden_states"), outputs=("hidden_states", "encoder_hidden_states"))


def stream_conventions():
    """(name, block, streams, call(block, h, e, temb) -> (hidden, encoder))."""
    reversed_call = lambda outputs: (outputs[1], outputs[0])  # noqa: E731
    return [
        ("keywords, text returned first", JointBlock(), JOINT,
         lambda b, h, e, t: reversed_call(b(hidden_states=h, encoder_hidden_states=e, temb=t))),
        ("positional, text returned first", JointBlock(), JOINT, lambda b, h, e, t: reversed_call(b(h, e, t))),
        ("mixed, text returned first", JointBlock(), JOINT,
         lambda b, h, e, t: reversed_call(b(h, encoder_hidden_states=e, temb=t))),
        ("positional, in input order", JointBlock(reverse_outputs=False), IN_ORDER, lambda b, h, e, t: b(h, e, t)),
    ]


@pytest.mark.parametrize("name, block, streams, call", stream_conventions(), ids=[c[0] for c in stream_conventions()])
def test_a_dropped_multi_stream_block_passes_every_stream_through_per_sample(name, block, streams, call):
    torch.manual_seed(3)
    h, e, temb = torch.randn(4, 5, DIM), torch.randn(4, 2, DIM), torch.randn(4, DIM)
    plain_hidden, plain_encoder = call(block, h, e, temb)
    mask = torch.tensor([1.0, 0.0, 0.0, 1.0])
    seen = []
    hooks = BlockMaskHooks([block], lambda index, hidden, module: seen.append(hidden) or mask, streams=streams)
    hidden, encoder = call(block, h, e, temb)
    assert seen[0] is h, "the provider sees the hidden state, the first input stream"
    kept, dropped = mask == 1, mask == 0
    assert torch.equal(hidden[kept], plain_hidden[kept]) and torch.equal(encoder[kept], plain_encoder[kept])
    assert torch.equal(hidden[dropped], h[dropped]) and torch.equal(encoder[dropped], e[dropped])
    hooks.remove()
    assert not block._forward_hooks


@pytest.mark.parametrize("name, block, streams, call", stream_conventions(), ids=[c[0] for c in stream_conventions()])
def test_a_skipped_multi_stream_block_returns_its_inputs_in_its_own_output_order(name, block, streams, call):
    h, e, temb = torch.randn(2, 5, DIM), torch.randn(2, 2, DIM), torch.randn(2, DIM)
    plain = call(block, h, e, temb)
    decision = {"keep": False}
    hooks = BlockMaskHooks([block], lambda index, hidden, module: decision["keep"], streams=streams)
    hidden, encoder = call(block, h, e, temb)
    assert hidden is h and encoder is e
    decision["keep"] = True
    assert all(torch.equal(a, b) for a, b in zip(call(block, h, e, temb), plain, strict=True))
    hooks.remove()


class ContextPreOnlyBlock(JointBlock):
    """SD3's last block: it ends the text stream and returns None in its place."""

    def forward(self, hidden_states, encoder_hidden_states, temb):
        return None, super().forward(hidden_states, encoder_hidden_states, temb)[1]


def test_a_stream_the_block_ends_stays_ended_under_a_per_sample_mask():
    block = ContextPreOnlyBlock()
    h, e, temb = torch.randn(2, 5, DIM), torch.randn(2, 2, DIM), torch.randn(2, DIM)
    plain_hidden = block(h, e, temb)[1]
    hooks = BlockMaskHooks([block], lambda index, hidden, module: torch.tensor([0.0, 1.0]), streams=JOINT)
    encoder, hidden = block(h, e, temb)
    assert encoder is None
    assert torch.equal(hidden[0], h[0]) and torch.equal(hidden[1], plain_hidden[1])
    hooks.remove()


def test_multi_stream_descriptions_that_do_not_fit_the_block_are_refused():
    with pytest.raises(ValueError, match=r"streams.inputs='context' is not an argument of JointBlock.forward"):
        BlockCall(JointBlock(), BlockStreams(inputs=("hidden_states", "context"), outputs=("hidden_states",)))
    with pytest.raises(ValueError, match=r"outputs=\['encoder_hidden_states'\] must name .* the hidden state 'hidden_states'"):
        BlockCall(JointBlock(), BlockStreams(inputs=("hidden_states", "encoder_hidden_states"),
                                             outputs=("encoder_hidden_states",)))
    block = JointBlock()
    BlockMaskHooks([block], lambda index, hidden, module: False,
                   streams=IN_ORDER)  # but the block returns the text stream first
    with pytest.raises(ValueError, match=r"stream at output position 0 of shape \(2, 2, 8\) for its input stream 0"):
        block(torch.randn(2, 5, DIM), torch.randn(2, 2, DIM), torch.randn(2, DIM))
    with pytest.raises(ValueError, match=r"returned Tensor; its streams description says it returns 2 streams"):
        masked_block_output(torch.randn(2, 3, DIM), [torch.randn(2, 3, DIM)] * 2, False, outputs=(0, 1))
