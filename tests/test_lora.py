"""LoRALinear and inject_lora/remove_lora: identity at start, the maths of forward, merge, in-place wrapping."""

import contextlib
import copy

import pytest
import torch
import torch.nn as nn

from tinyfusion_pl.pruning.lora import (
    LoRALinear,
    LoRALinearFunction,
    SharedInputLoRA,
    SharedInputLoRAFunction,
    inject_lora,
    merges_update,
    remove_lora,
    share_lora_inputs,
)


class ToyBlock(nn.Module):
    """Two Linears and a non-Linear layer, nested like an attention block."""

    def __init__(self, width: int = 6):
        super().__init__()
        self.attn = nn.ModuleDict({"qkv": nn.Linear(width, 3 * width), "proj": nn.Linear(3 * width, width)})
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        return x + self.attn["proj"](self.attn["qkv"](self.norm(x)))


class ToyNet(nn.Module):
    def __init__(self, width: int = 6):
        super().__init__()
        self.embed = nn.Linear(4, width)
        self.blocks = nn.ModuleList([ToyBlock(width) for _ in range(3)])
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def randomize_adapters(module: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))


def test_starts_as_exact_identity_of_the_wrapped_linear():
    torch.manual_seed(0)
    linear = nn.Linear(5, 7)
    wrapper = LoRALinear(linear, rank=3, alpha=6)
    x = torch.randn(2, 4, 5)
    assert torch.equal(wrapper(x), linear(x))
    assert wrapper.base_layer is linear
    assert torch.count_nonzero(wrapper.lora_b.weight) == 0
    assert torch.count_nonzero(wrapper.lora_a.weight) == wrapper.lora_a.weight.numel()
    assert wrapper.scaling == 2.0


def test_forward_is_base_plus_scaled_low_rank_update_in_float64():
    torch.manual_seed(0)
    linear = nn.Linear(5, 7).double()
    wrapper = LoRALinear(linear, rank=2, alpha=3)
    randomize_adapters(wrapper)
    x = torch.randn(3, 5, dtype=torch.float64)
    weight = linear.weight + (3 / 2) * wrapper.lora_b.weight @ wrapper.lora_a.weight
    expected = torch.einsum("ni,oi->no", x, weight) + linear.bias
    torch.testing.assert_close(wrapper(x), expected)


def test_the_update_is_merged_into_the_weight_when_there_are_more_rows_than_it_saves():
    # Adding s (x A^T) B^T costs a pass over the (rows, out) output and the (rows, in) input gradient; merging costs
    # two passes over the (out, in) weight.
    weight = torch.zeros(7, 5)
    assert not merges_update(5, weight) and merges_update(6, weight)  # 5 * 12 = 60 < 70 < 6 * 12 = 72
    assert not merges_update(10_000, weight.bfloat16()) and not merges_update(10_000, weight.half())
    assert merges_update(6, weight.double())


@pytest.mark.parametrize("rows", [1, 6], ids=["update-added", "update-merged"])
@pytest.mark.parametrize("shared_input", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_function_gradients_match_finite_differences(rows, shared_input, with_bias):
    generator = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_()

    x, weight, lora_a, lora_b = leaf(rows, 1, 5), leaf(7, 5), leaf(2, 5), leaf(7, 2)
    assert merges_update(rows, weight) == (rows == 6)
    bias = leaf(7) if with_bias else None
    lora_input = leaf(rows, 1, 5)

    def function(x, lora_input, weight, bias, lora_a, lora_b):
        return LoRALinearFunction.apply(x, x if shared_input else lora_input, weight, bias, lora_a, lora_b, 1.5)

    assert torch.autograd.gradcheck(function, (x, lora_input, weight, bias, lora_a, lora_b))


def test_a_layer_that_overrides_forward_is_refused():
    class ScaledLinear(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(TypeError, match=r"ScaledLinear overrides nn.Linear.forward. Wrap plain nn.Linear layers only"):
        LoRALinear(ScaledLinear(2, 2))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradients_equal_those_of_the_composed_formula(dropout):
    torch.manual_seed(0)
    wrapper = LoRALinear(nn.Linear(5, 6).double(), rank=3, alpha=4, dropout=dropout)
    randomize_adapters(wrapper)
    x = torch.randn(4, 2, 5, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(4, 2, 6, dtype=torch.float64)
    torch.manual_seed(1)
    (wrapper(x) * weights).sum().backward()

    # The same maths with plain tensor operations and autograd's own derivatives.
    x_ref = x.detach().clone().requires_grad_()
    a_ref = wrapper.lora_a.weight.detach().clone().requires_grad_()
    b_ref = wrapper.lora_b.weight.detach().clone().requires_grad_()
    torch.manual_seed(1)
    dropped = nn.functional.dropout(x_ref, p=dropout, training=True)
    output = x_ref @ wrapper.base_layer.weight.T + wrapper.base_layer.bias + (4 / 3) * (dropped @ a_ref.T) @ b_ref.T
    (output * weights).sum().backward()

    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(wrapper.lora_a.weight.grad, a_ref.grad)
    torch.testing.assert_close(wrapper.lora_b.weight.grad, b_ref.grad)


def test_under_bfloat16_autocast_the_update_follows_the_base_output():
    torch.manual_seed(0)
    wrapper = LoRALinear(nn.Linear(16, 8), rank=4)
    randomize_adapters(wrapper)
    x = torch.randn(3, 16)
    expected = wrapper(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = wrapper(x)
    assert output.dtype == torch.bfloat16
    # bfloat16 keeps 8 significant bits: errors of a few per mille of the output's scale.
    torch.testing.assert_close(output.float(), expected, rtol=0, atol=0.02 * expected.abs().max().item())
    output.float().sum().backward()
    assert wrapper.lora_a.weight.grad.dtype == wrapper.lora_b.weight.grad.dtype == torch.float32


def test_adapters_follow_the_base_weight_dtype_and_device():
    wrapper = LoRALinear(nn.Linear(4, 4, dtype=torch.bfloat16), rank=2)
    assert wrapper.lora_a.weight.dtype == wrapper.lora_b.weight.dtype == torch.bfloat16
    on_meta = LoRALinear(nn.Linear(4, 4, device="meta"), rank=2)
    assert on_meta.lora_a.weight.is_meta and on_meta.lora_b.weight.is_meta


def test_only_the_adapters_receive_gradients():
    torch.manual_seed(0)
    wrapper = LoRALinear(nn.Linear(5, 3), rank=2)
    randomize_adapters(wrapper)
    wrapper(torch.randn(4, 5)).square().sum().backward()
    assert wrapper.base_layer.weight.grad is None and wrapper.base_layer.bias.grad is None
    assert wrapper.lora_a.weight.grad is not None and wrapper.lora_b.weight.grad is not None
    assert [name for name, p in wrapper.named_parameters() if p.requires_grad] == ["lora_a.weight", "lora_b.weight"]


def test_merge_moves_the_update_into_the_weight_and_unmerge_takes_it_out():
    torch.manual_seed(0)
    linear = nn.Linear(6, 4).double()
    original = linear.weight.detach().clone()
    wrapper = LoRALinear(linear, rank=2, alpha=4)
    randomize_adapters(wrapper)
    x = torch.randn(3, 6, dtype=torch.float64)
    unmerged_output = wrapper(x)

    wrapper.merge()
    assert wrapper.merged
    torch.testing.assert_close(linear.weight, original + 2.0 * wrapper.lora_b.weight @ wrapper.lora_a.weight)
    # Merged forward must not add the update a second time.
    torch.testing.assert_close(wrapper(x), unmerged_output)
    with pytest.raises(RuntimeError, match="already merged; call unmerge"):
        wrapper.merge()

    wrapper.unmerge()
    assert not wrapper.merged
    torch.testing.assert_close(linear.weight, original)
    torch.testing.assert_close(wrapper(x), unmerged_output)
    with pytest.raises(RuntimeError, match="not merged; there is no update to unmerge"):
        wrapper.unmerge()


def test_dropout_only_touches_the_adapter_path_in_training():
    torch.manual_seed(0)
    linear = nn.Linear(8, 8)
    wrapper = LoRALinear(linear, rank=4, dropout=0.5)
    randomize_adapters(wrapper)
    x = torch.randn(16, 8)
    wrapper.eval()
    reference = LoRALinear(nn.Linear(8, 8), rank=4)
    reference.load_state_dict(wrapper.state_dict())
    torch.testing.assert_close(wrapper(x), reference(x))
    wrapper.train()
    assert not torch.allclose(wrapper(x), reference(x))
    # With the adapters at zero, dropout cannot change anything.
    nn.init.zeros_(wrapper.lora_b.weight)
    assert torch.equal(wrapper(x), linear(x))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, r"rank=0 must be an integer >= 1"),
        ({"rank": 2.5}, r"rank=2.5 must be an integer >= 1"),
        ({"alpha": 0}, r"alpha=0 must be a number > 0"),
        ({"dropout": 1.0}, r"dropout=1.0 must be a probability in \[0, 1\)"),
        ({"dropout": -0.1}, r"dropout=-0.1 must be a probability in \[0, 1\)"),
    ],
)
def test_bad_lora_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRALinear(nn.Linear(2, 2), **kwargs)
    with pytest.raises(ValueError, match=message):
        inject_lora(ToyNet(), **kwargs)


def test_all_bad_arguments_are_reported_at_once():
    with pytest.raises(ValueError, match=r"rank=-1 .*; alpha=-2 .*; dropout=2"):
        LoRALinear(nn.Linear(2, 2), rank=-1, alpha=-2, dropout=2)


def test_wrapping_something_else_than_a_linear_is_refused():
    with pytest.raises(TypeError, match="wraps an nn.Linear, got base_layer of type Conv1d"):
        LoRALinear(nn.Conv1d(2, 2, 1))
    with pytest.raises(TypeError, match=r"root is itself a Linear. Wrap a single layer directly with LoRALinear"):
        inject_lora(nn.Linear(2, 2))


def test_inject_wraps_every_linear_in_place_without_copying():
    torch.manual_seed(0)
    net = ToyNet()
    linears_before = {name: module for name, module in net.named_modules() if isinstance(module, nn.Linear)}
    x = torch.randn(2, 5, 4)
    expected = net(x)

    names = inject_lora(net, rank=2, alpha=4)

    assert names == list(linears_before)
    for name, linear in linears_before.items():
        wrapper = net.get_submodule(name)
        assert isinstance(wrapper, LoRALinear) and wrapper.base_layer is linear
    assert torch.equal(net(x), expected)
    frozen_linear_parameters = [p for name, p in net.named_parameters() if ".base_layer." in name]
    assert len(frozen_linear_parameters) == 2 * len(linears_before)
    assert not any(p.requires_grad for p in frozen_linear_parameters)


def test_inject_leaves_non_linear_parameters_alone():
    net = ToyNet()
    inject_lora(net, rank=2)
    assert net.blocks[0].norm.weight.requires_grad


def test_target_selects_linears_by_name_ending():
    net = ToyNet()
    names = inject_lora(net.blocks, rank=2, target=["qkv"])
    assert names == ["0.attn.qkv", "1.attn.qkv", "2.attn.qkv"]
    assert isinstance(net.blocks[1].attn["proj"], nn.Linear)
    assert not isinstance(net.blocks[1].attn["proj"], LoRALinear)


def test_unknown_target_lists_the_linears_that_exist():
    with pytest.raises(ValueError, match=r"names no Linear layer for \['fc9'\].*'0.attn.qkv'.*target=None"):
        inject_lora(ToyNet().blocks, target=["qkv", "fc9"])


def test_injecting_twice_is_refused():
    net = ToyNet()
    inject_lora(net.blocks, rank=2)
    with pytest.raises(ValueError, match=r"already holds LoRA adapters .* Call remove_lora\(root\)"):
        inject_lora(net, rank=2)


def test_a_shared_linear_gets_one_shared_wrapper():
    shared = nn.Linear(3, 3)
    net = nn.Sequential(shared, nn.ReLU(), shared)
    names = inject_lora(net, rank=1)
    assert names == ["0", "2"]
    assert net[0] is net[2] and isinstance(net[0], LoRALinear)
    remove_lora(net)
    assert net[0] is shared and net[2] is shared


def test_remove_without_merge_brings_back_the_original_linears_and_flags():
    torch.manual_seed(0)
    net = ToyNet()
    net.head.bias.requires_grad_(False)
    originals = {name: p.detach().clone() for name, p in net.named_parameters()}
    flags = {name: p.requires_grad for name, p in net.named_parameters()}
    linears = {name: m for name, m in net.named_modules() if isinstance(m, nn.Linear)}
    inject_lora(net, rank=2)
    randomize_adapters(net)
    net.get_submodule("blocks.1.attn.qkv").merge()

    names = remove_lora(net)

    assert names == list(linears)
    assert all(net.get_submodule(name) is linear for name, linear in linears.items())
    assert not any(isinstance(m, LoRALinear) for m in net.modules())
    assert {name: p.requires_grad for name, p in net.named_parameters()} == flags
    for name, parameter in net.named_parameters():
        # The merged layer went through merge/unmerge: equal up to rounding; the others bit for bit.
        if name.startswith("blocks.1.attn.qkv"):
            torch.testing.assert_close(parameter, originals[name])
        else:
            assert torch.equal(parameter, originals[name]), name


def test_remove_with_merge_keeps_the_learned_update():
    torch.manual_seed(0)
    net = ToyNet().double()
    inject_lora(net, rank=2, alpha=8)
    randomize_adapters(net)
    x = torch.randn(3, 4, dtype=torch.float64)
    adapted_output = net(x)
    qkv = net.blocks[0].attn["qkv"]
    expected_weight = qkv.base_layer.weight + 4.0 * qkv.lora_b.weight @ qkv.lora_a.weight

    remove_lora(net, merge=True)

    assert type(net.blocks[0].attn["qkv"]) is nn.Linear
    torch.testing.assert_close(net.blocks[0].attn["qkv"].weight, expected_weight)
    torch.testing.assert_close(net(x), adapted_output)


def test_state_dict_names_follow_the_wrapper_layout():
    wrapper = LoRALinear(nn.Linear(3, 2), rank=1)
    assert list(wrapper.state_dict()) == ["base_layer.weight", "base_layer.bias", "lora_a.weight", "lora_b.weight"]


def test_inject_lora_leaves_multihead_attention_projections_alone():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    x = torch.randn(3, 5, 16)
    expected = layer(x)
    names = inject_lora(layer, rank=2)
    # MultiheadAttention reads out_proj.weight itself; only the feed-forward Linears get adapters
    assert sorted(names) == ["linear1", "linear2"]
    assert isinstance(layer.self_attn.out_proj, nn.Linear)
    torch.testing.assert_close(layer(x), expected)
    with torch.no_grad():
        layer.linear2.lora_b.weight.normal_()  # not a constant: LayerNorm would remove a per-token shift
    assert not torch.allclose(layer(x), expected)  # the adapters take part in the forward


# ---------------------------------------------------------------------------- layers that read one input


class Projections(nn.Module):
    """q, k and v of an attention: k and v read `context` (x when None), as self- or cross-attention."""

    def __init__(self, width=5, out=(4, 4, 6), bias=True):
        super().__init__()
        self.to_q, self.to_k, self.to_v = (nn.Linear(width, size, bias=bias).double() for size in out)

    def forward(self, x, context=None):
        context = x if context is None else context
        return self.to_q(x), self.to_k(context), self.to_v(context)


def separate_and_shared(ranks=(2, 2, 2), dropout=0.0, **kwargs):
    """The same randomised q/k/v LoRA layers twice: computed separately, and joined in a SharedInputLoRA."""
    torch.manual_seed(0)
    separate = Projections(**kwargs)
    for name, rank in zip(("to_q", "to_k", "to_v"), ranks, strict=True):
        setattr(separate, name, LoRALinear(getattr(separate, name), rank=rank, alpha=4, dropout=dropout))
    randomize_adapters(separate)
    shared = copy.deepcopy(separate)
    share_lora_inputs(shared, [("to_q", "to_k", "to_v")])
    assert separate.to_q.shared_input is None and shared.to_q.shared_input is shared.to_k.shared_input
    return separate, shared


def outputs_and_gradients(module, *inputs):
    """The outputs, and the gradients of a weighted sum of them for the inputs and every trainable parameter."""
    leaves = [tensor.detach().clone().requires_grad_() for tensor in inputs]
    outputs = module(*leaves)
    generator = torch.Generator().manual_seed(5)
    loss = sum((output * torch.randn(output.shape, generator=generator, dtype=output.dtype)).sum() for output in outputs)
    trainable = [parameter for parameter in module.parameters() if parameter.requires_grad]
    gradients = torch.autograd.grad(loss, [*leaves, *trainable])
    return [output.detach() for output in outputs], gradients


@pytest.mark.parametrize("rows", [1, 5, 6], ids=["none-merged", "first-merged", "both-merged"])
def test_shared_input_function_gradients_match_finite_differences(rows):
    generator = torch.Generator().manual_seed(0)

    def leaf(*shape, requires_grad=True):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_(requires_grad)

    x = leaf(rows, 1, 5)
    weights = [leaf(4, 5, requires_grad=False), leaf(6, 5, requires_grad=False)]
    assert [merges_update(rows, weight) for weight in weights] == [rows >= 5, rows >= 6]
    biases = [leaf(4, requires_grad=False), leaf(6, requires_grad=False)]
    lora_as, lora_bs = [leaf(2, 5), leaf(3, 5)], [leaf(4, 2), leaf(6, 3)]  # ranks 2 and 3

    def function(x, a_1, a_2, b_1, b_2):
        return SharedInputLoRAFunction.apply(x, (1.5, 0.5), *weights, *biases, a_1, a_2, b_1, b_2)

    assert torch.autograd.gradcheck(function, (x, *lora_as, *lora_bs))


def product_nodes(outputs):
    """The autograd nodes that computed `outputs`, by name: one SharedInputLoRAFunction for a shared product."""
    return [(type(output.grad_fn).__name__, id(output.grad_fn)) for output in outputs]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("ranks", [(2, 2, 2), (1, 2, 3)])
def test_shared_input_layers_compute_the_outputs_and_gradients_of_the_separate_layers(bias, ranks):
    separate, shared = separate_and_shared(ranks=ranks, bias=bias)
    x = torch.randn(3, 7, 5, dtype=torch.float64, requires_grad=True)
    nodes = product_nodes(shared(x))
    assert {name for name, _ in nodes} == {"SharedInputLoRAFunctionBackward"} and len(set(nodes)) == 1, \
        "one product for the three layers"
    expected, got = outputs_and_gradients(separate, x), outputs_and_gradients(shared, x)
    for expected_tensor, got_tensor in zip([*expected[0], *expected[1]], [*got[0], *got[1]], strict=True):
        torch.testing.assert_close(got_tensor, expected_tensor, rtol=1e-12, atol=1e-12)


def test_shared_input_layers_called_on_other_tensors_compute_each_layer_alone():
    separate, shared = separate_and_shared()
    x, context = torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(2, 4, 5, dtype=torch.float64)
    # Cross-attention: q reads x, k and v the context (k's pending output on x is not taken).
    expected, got = outputs_and_gradients(separate, x, context), outputs_and_gradients(shared, x, context)
    for expected_tensor, got_tensor in zip([*expected[0], *expected[1]], [*got[0], *got[1]], strict=True):
        torch.testing.assert_close(got_tensor, expected_tensor, rtol=1e-12, atol=1e-12)
    # The same tensor modified in place between two calls is another input.
    y = x.clone()
    query = shared.to_q(y)
    y.mul_(2)
    torch.testing.assert_close(shared.to_k(y), separate.to_k(y), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(query, separate.to_q(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("state", ["merged", "dropout", "trainable base", "inference"])
def test_shared_input_layers_fall_back_to_separate_layers_where_one_product_would_differ(state):
    separate, shared = separate_and_shared(dropout=0.3 if state == "dropout" else 0.0)
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    if state == "merged":
        shared.to_k.merge()
        separate.to_k.merge()
    if state == "trainable base":
        shared.to_v.base_layer.weight.requires_grad_(True)
    context = torch.inference_mode() if state == "inference" else contextlib.nullcontext()
    with context:
        torch.manual_seed(3)
        got = shared(x)
        torch.manual_seed(3)
        expected = separate(x)
    for expected_tensor, got_tensor in zip(expected, got, strict=True):
        torch.testing.assert_close(got_tensor, expected_tensor, rtol=1e-12, atol=1e-12)
    if state != "inference":
        assert "SharedInputLoRAFunctionBackward" not in {name for name, _ in product_nodes(got)}


def test_share_lora_inputs_skips_layers_without_adapters_and_refuses_mixed_widths():
    torch.manual_seed(0)
    module = Projections()
    module.to_q = LoRALinear(module.to_q, rank=2)
    module.to_k = LoRALinear(module.to_k, rank=2)  # to_v left out (a target without it)
    groups = share_lora_inputs(module, [("to_q", "to_k", "to_v"), ("to_v", "missing")])
    assert len(groups) == 1 and groups[0].layers == [module.to_q, module.to_k]
    with pytest.raises(ValueError, match=r"layers that read one input have one input width"):
        SharedInputLoRA([LoRALinear(nn.Linear(3, 2)), LoRALinear(nn.Linear(4, 2))])


def test_a_model_with_shared_input_layers_deep_copies_and_unwraps_to_plain_linears():
    _, shared = separate_and_shared()
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    shared.to_q(x)  # k and v now hold pending outputs
    copied = copy.deepcopy(shared)
    assert copied.to_q.shared_input.layers == [copied.to_q, copied.to_k, copied.to_v]
    torch.testing.assert_close(copied(x), shared(x))
    remove_lora(shared)
    assert all(type(layer) is nn.Linear for layer in (shared.to_q, shared.to_k, shared.to_v))
