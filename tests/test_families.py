"""Model families: what generic code learns about a model, and the depth-aware save/load built on it."""

import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from tests.conftest import tiny_dit
from tinyfusion_pl.families import DiTFamily, SiTFamily, family_of, find_family
from tinyfusion_pl.models import build_sit
from tinyfusion_pl.models.checkpoints import CheckpointMismatchError
from tinyfusion_pl.pruning import prune_blocks


def tiny_sit(depth: int = 4) -> nn.Module:
    return build_sit("SiT-Tiny/2", input_size=8, in_channels=1, num_classes=10, learn_sigma=False, depth=depth)


def test_the_family_is_found_by_class_most_specific_first():
    assert isinstance(family_of(tiny_dit()), DiTFamily) and not isinstance(family_of(tiny_dit()), SiTFamily)
    assert isinstance(family_of(tiny_sit()), SiTFamily)  # SiT subclasses DiT; its own family wins
    assert find_family(nn.Linear(2, 2)) is None
    with pytest.raises(ValueError, match=r"no model family describes Linear; known families: dit \(DiT\), sit \(SiT\)"):
        family_of(nn.Linear(2, 2))


@pytest.mark.parametrize("build", [tiny_dit, tiny_sit])
def test_the_description_reads_the_models_structure_and_conditioning(build):
    net = build(depth=3)
    family = family_of(net)
    assert family.block_argument() == "blocks" and family.block_counts(net) == [3]
    assert family.sample_shape(net) == (1, 8, 8)
    assert family.num_classes(net) == 10 and family.null_label(net) == 10
    assert family.label_dropout(net) == pytest.approx(0.1)
    labels, drop = torch.tensor([1, 2]), torch.tensor([0, 1])
    assert family.condition(labels) == {"y": labels}
    condition = family.condition(labels, drop)
    assert condition["force_drop_ids"] is drop
    # The condition really drives the net: a dropped label gives the null label's output.
    net.eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.3])
    with torch.no_grad():
        dropped = net(x, t, **condition)
        null = net(x, t, y=torch.tensor([1, 10]))
    torch.testing.assert_close(dropped, null)


@pytest.mark.parametrize("build", [tiny_dit, tiny_sit])
def test_at_depth_rebuilds_the_same_architecture_with_another_depth(build):
    net = build(depth=4)
    family = family_of(net)
    shallow = family.at_depth(net, [2])
    assert type(shallow) is type(net) and family.block_counts(shallow) == [2]
    assert {key: value for key, value in family.architecture(shallow).items() if key != "depth"} == \
        {key: value for key, value in family.architecture(net).items() if key != "depth"}
    with pytest.raises(ValueError, match=r"block_counts=\[2, 2\] gives 2 lengths for the 1 block containers"):
        family.at_depth(net, [2, 2])


@pytest.mark.parametrize("build", [tiny_dit, tiny_sit])
def test_an_exported_model_saves_and_loads_back_at_its_own_depth(build, tmp_path):
    teacher = build(depth=4)
    family = family_of(teacher)
    shallow = prune_blocks(teacher, blocks=family.block_argument(), keep=[0, 3])
    path = family.save(shallow, tmp_path / "pruned.pt")
    assert family.checkpoint_block_counts(torch.load(path, weights_only=True)) == [2]
    loaded = family.load(path, like=teacher)  # the teacher gives the architecture, the file the depth
    assert family.block_counts(loaded) == [2] and family.block_counts(teacher) == [4]
    shallow.eval(), loaded.eval()
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0, 4, 9])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), shallow(x, t, y), rtol=0, atol=0)


def test_load_prefers_the_ema_weights_and_explains_a_mismatch(tmp_path):
    net = tiny_dit(depth=2)
    family = family_of(net)
    ema = {key: value + 1.0 for key, value in net.state_dict().items()}
    torch.save({"model": net.state_dict(), "ema": ema}, tmp_path / "model.pt")
    loaded = family.load(tmp_path / "model.pt", like=net)
    torch.testing.assert_close(loaded.state_dict()["final_layer.linear.weight"], ema["final_layer.linear.weight"])
    state = net.state_dict()
    state["final_layer.linear.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointMismatchError, match="shape mismatches"):
        family.load(state, like=net)


def test_importing_models_objectives_and_families_does_not_import_lightning():
    code = ("import sys; import tinyfusion_pl.models, tinyfusion_pl.objectives, tinyfusion_pl.families; "
            "loaded = [name for name in sys.modules if name.split('.')[0] in ('lightning', 'pytorch_lightning')]; "
            "print(loaded); assert not loaded")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
