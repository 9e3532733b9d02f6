"""prune_blocks: a shallower deep copy that loads into the registry entry of its depth and skips dropped blocks."""

import pytest
import torch
import torch.nn as nn

from tinyfusion_pl.models import DiT, DiT_models
from tinyfusion_pl.pruning.export import prune_blocks
from tinyfusion_pl.pruning.lora import LoRALinear, inject_lora


def tiny_dit() -> DiT:
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=6, num_heads=4, num_classes=10)
    # DiT starts every block as the identity (adaLN-Zero); random weights make each block matter.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(0.2 * torch.randn_like(parameter))
    return model.eval()


def dit_inputs(batch: int = 3):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 8, 8, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    y = torch.randint(0, 10, (batch,), generator=generator)
    return x, t, y


def forward_skipping_blocks(model: DiT, x, t, y, kept):
    """DiT's forward written out by hand, running only the kept blocks of the original model."""
    tokens = model.x_embedder(x) + model.pos_embed
    condition = model.t_embedder(t) + model.y_embedder(y, False)
    for index in kept:
        tokens = model.blocks[index](tokens, condition)
    return model.unpatchify(model.final_layer(tokens, condition))


class Holder(nn.Module):
    """A user model whose blocks sit at a nested path and that stores its depth."""

    def __init__(self, depth: int = 5, container=nn.ModuleList):
        super().__init__()
        self.depth = depth
        self.net = nn.Module()
        self.net.layers = container(*[nn.Linear(4, 4) for _ in range(depth)]) if container is nn.Sequential else (
            container(nn.Linear(4, 4) for _ in range(depth))
        )
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        for layer in self.net.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


def test_half_depth_dit_xl_loads_strictly_into_dit_d14():
    with torch.device("meta"):
        full = DiT_models["DiT-XL/2"]()
        d14 = DiT_models["DiT-D14/2"]()
        d19 = DiT_models["DiT-D19/2"]()
    shallow = prune_blocks(full, blocks="blocks", keep=range(1, 28, 2))
    assert type(shallow) is DiT and shallow.depth == 14 and full.depth == 28
    d14.load_state_dict(shallow.state_dict(), strict=True)
    with pytest.raises(RuntimeError, match="Missing key"):
        d19.load_state_dict(shallow.state_dict(), strict=True)


def test_output_equals_the_original_with_dropped_blocks_skipped():
    model = tiny_dit()
    kept = [0, 2, 3, 5]
    x, t, y = dit_inputs()
    shallow = prune_blocks(model, blocks="blocks", keep=kept)
    with torch.no_grad():
        expected = forward_skipping_blocks(model, x, t, y, kept)
        assert not torch.allclose(expected, model(x, t, y), atol=1e-3), "dropping blocks must change the output"
        torch.testing.assert_close(shallow(x, t, y), expected, rtol=0, atol=0)
    for new_index, old_index in enumerate(kept):
        for name, parameter in shallow.blocks[new_index].named_parameters():
            assert torch.equal(parameter, model.blocks[old_index].get_parameter(name))


def test_the_original_is_untouched_and_the_copy_independent():
    model = tiny_dit()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    shallow = prune_blocks(model, blocks="blocks", keep=[1, 4])
    with torch.no_grad():
        for parameter in shallow.parameters():
            parameter.add_(1.0)
    assert len(model.blocks) == 6
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)
    assert [name for name in shallow.state_dict() if name.startswith("blocks.")][-1].startswith("blocks.1.")


def test_hooks_stay_on_the_original_and_do_not_reach_the_copy():
    model = tiny_dit()
    x, t, y = dit_inputs()
    with torch.no_grad():
        expected = forward_skipping_blocks(model, x, t, y, [0, 2, 4])
    calls = []
    model.blocks[2].register_forward_hook(lambda module, args, output: calls.append("block") or output * 0)
    model.register_forward_pre_hook(lambda module, args: calls.append("model"))
    shallow = prune_blocks(model, blocks="blocks", keep=[0, 2, 4])
    with torch.no_grad():
        torch.testing.assert_close(shallow(x, t, y), expected)
        assert calls == []
        model(x, t, y)
    assert calls == ["model", "block"]


def test_lora_is_removed_and_its_update_discarded_by_default():
    model = tiny_dit()
    originals = {name: p.detach().clone() for name, p in model.named_parameters()}
    inject_lora(model.blocks, rank=2, alpha=4)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_()

    shallow = prune_blocks(model, blocks="blocks", keep=[0, 3])

    assert not any(isinstance(module, LoRALinear) for module in shallow.modules())
    assert isinstance(model.blocks[0].attn.qkv, LoRALinear), "the original keeps its adapters"
    shallow_parameters = dict(shallow.named_parameters())
    for old_index, new_index in ((0, 0), (3, 1)):
        for name in ("attn.qkv.weight", "mlp.fc2.bias", "adaLN_modulation.1.weight"):
            assert torch.equal(shallow_parameters[f"blocks.{new_index}.{name}"], originals[f"blocks.{old_index}.{name}"])
    assert all(p.requires_grad for p in shallow.blocks.parameters()), "flags from before the wrapping come back"


def test_lora_update_is_merged_when_asked():
    model = tiny_dit().double()
    inject_lora(model.blocks, rank=2, alpha=4)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_()
    x, t, y = dit_inputs()
    with torch.no_grad():
        expected = forward_skipping_blocks(model, x.double(), t, y, [1, 2])
    wrapped = model.blocks[2].mlp.fc1
    expected_weight = wrapped.base_layer.weight + 2.0 * wrapped.lora_b.weight @ wrapped.lora_a.weight

    shallow = prune_blocks(model, blocks="blocks", keep=[1, 2], merge=True)

    torch.testing.assert_close(shallow.blocks[1].mlp.fc1.weight, expected_weight)
    with torch.no_grad():
        torch.testing.assert_close(shallow(x.double(), t, y), expected)
    assert not model.blocks[2].mlp.fc1.merged, "merging happens on the copy only"


@pytest.mark.parametrize("container", [nn.ModuleList, nn.Sequential])
def test_nested_path_any_order_and_a_stored_depth(container):
    torch.manual_seed(0)
    model = Holder(depth=5, container=container)
    shallow = prune_blocks(model, blocks="net.layers", keep=[4, 0, 2])
    assert type(shallow.net.layers) is container
    assert shallow.depth == 3 and model.depth == 5
    assert list(shallow.state_dict()) == [
        "net.layers.0.weight", "net.layers.0.bias",
        "net.layers.1.weight", "net.layers.1.bias",
        "net.layers.2.weight", "net.layers.2.bias",
        "head.weight", "head.bias",
    ]
    assert torch.equal(shallow.net.layers[1].weight, model.net.layers[2].weight)
    assert torch.equal(shallow.net.layers[2].weight, model.net.layers[4].weight)


@pytest.mark.parametrize(
    ("keep", "error", "message"),
    [
        ([0, 6], ValueError, r"keep=\[0, 6\] holds \[6\], outside the model's 6 blocks in 'blocks' \(valid indices: 0 to 5"),
        ([-1, 2], ValueError, r"holds \[-1\], outside .* negative indices are not accepted\)"),
        ([1, 3, 1], ValueError, r"keep=\[1, 3, 1\] lists \[1\] more than once; list each kept block once"),
        ([], ValueError, r"keep=\[\] keeps nothing; keep at least one of the 6 blocks"),
        ([0.5, 1], TypeError, r"keep=\[0.5, 1\] holds entries that are not integers. Pass keep as .* 0 to 5"),
        ([True, 2], TypeError, r"keep=\[True, 2\] holds entries that are not integers"),
        (None, TypeError, r"keep=None is not a list of block indices"),
    ],
)
def test_bad_keep_is_refused(keep, error, message):
    with pytest.raises(error, match=message):
        prune_blocks(tiny_dit(), blocks="blocks", keep=keep)


def test_integer_tensors_are_accepted_as_keep():
    shallow = prune_blocks(tiny_dit(), blocks="blocks", keep=torch.tensor([5, 1]))
    assert shallow.depth == 2


def test_a_wrong_blocks_path_lists_the_containers_found():
    with pytest.raises(ValueError, match=r"blocks='layers' does not resolve on DiT.*'blocks' \(6 blocks\)"):
        prune_blocks(tiny_dit(), blocks="layers", keep=[0])
