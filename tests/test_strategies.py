"""The FSDP strategy's wrap policy finds the blocks of any described family (the strategy itself needs CUDA)."""

import lightning as L
import pytest
import torch.nn as nn

from tests.conftest import tiny_dit
from tinyfusion_pl.models import build_sit
from tinyfusion_pl.models.dit import DiTBlock
from tinyfusion_pl.strategies import FamilyBlockWrapPolicy, fsdp_strategy


class Holder(L.LightningModule):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net


@pytest.mark.parametrize("net", [tiny_dit(depth=2), build_sit("SiT-Tiny/2", input_size=8, in_channels=1, depth=2)])
def test_the_policy_wraps_exactly_the_blocks_of_the_family(net):
    root = Holder(net)
    policy = FamilyBlockWrapPolicy()
    assert policy(root, recurse=True, nonwrapped_numel=0)  # FSDP asks about the root first, then descends
    wrapped = [name for name, module in root.named_modules() if name and policy(module, False, 0)]
    assert wrapped == ["net.blocks.0", "net.blocks.1"] and policy.block_classes == (DiTBlock,)


def test_a_model_no_family_describes_asks_for_the_block_classes():
    with pytest.raises(ValueError, match=r"pass trainer.strategy.wrap_blocks=\[dotted.path.of.YourBlock\]"):
        FamilyBlockWrapPolicy()(Holder(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))), True, 0)


def test_named_block_classes_still_work():
    strategy = fsdp_strategy(wrap_blocks=["tinyfusion_pl.models.dit.DiTBlock"])
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {DiTBlock}  # Lightning's ModuleWrapPolicy
    assert isinstance(fsdp_strategy().kwargs["auto_wrap_policy"], FamilyBlockWrapPolicy)
