"""The FSDP strategy's wrap policy finds the blocks of any described family (the strategy itself needs CUDA); the
FSDP2 strategy's checkpoints pass over optimizer groups outside the model (their 2-rank runs: test_resume.py)."""

import copy

import lightning as L
import pytest
import torch
import torch.nn as nn

from tests.conftest import tiny_dit
from tinyfusion_pl.models import build_sit
from tinyfusion_pl.models.dit import DiTBlock
from tinyfusion_pl.strategies import FamilyBlockWrapPolicy, fsdp_strategy, model_groups_only


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


def test_groups_outside_the_model_are_hidden_from_a_save_and_survive_a_load():
    model, gates = nn.Linear(3, 2), nn.Parameter(torch.zeros(4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    optimizer.add_param_group({"params": [gates], "lr": 1.0})
    (model(torch.ones(1, 3)).sum() + (gates * torch.arange(4.0)).sum()).backward()
    optimizer.step()
    gate_state = {key: value.clone() for key, value in optimizer.state[gates].items()}
    with model_groups_only(optimizer, model):
        saved = copy.deepcopy(optimizer.state_dict())  # what torch's optimizer state of the model sees
    assert [group["params"] for group in saved["param_groups"]] == [[0, 1]] and sorted(saved["state"]) == [0, 1]
    model_state = {key: value.clone() for key, value in optimizer.state[model.weight].items()}
    optimizer.step()  # the states move on; loading puts the model's back and leaves the gates' alone
    moved_gates = {key: value.clone() for key, value in optimizer.state[gates].items()}
    with model_groups_only(optimizer, model):
        optimizer.load_state_dict(saved)
    assert [len(group["params"]) for group in optimizer.param_groups] == [2, 1]
    assert optimizer.param_groups[1]["params"][0] is gates and optimizer.param_groups[1]["lr"] == 1.0
    assert all(torch.equal(optimizer.state[model.weight][key], value) for key, value in model_state.items())
    assert all(torch.equal(optimizer.state[gates][key], value) for key, value in moved_gates.items())
    assert not torch.equal(moved_gates["exp_avg"], gate_state["exp_avg"])
