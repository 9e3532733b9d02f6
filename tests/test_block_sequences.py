"""Several block lists as one sequence (global indices) and multi-stream blocks, through every pruning piece."""

import copy
import math

import lightning as L
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from tests.conftest import quick_trainer, tiny_dit
from tests.test_block_mask import ResidualBlock  # block(x, c), one hidden state
from tinyfusion_pl import families
from tinyfusion_pl.callbacks.block_mask import DifferentiableBlockMask
from tinyfusion_pl.callbacks.weight_update import CoOptimizedWeightUpdate
from tinyfusion_pl.distill.module import DistillationModule, FeatureCapture
from tinyfusion_pl.families import BlockStreams, ModelFamily
from tinyfusion_pl.objectives import GaussianDiffusion
from tinyfusion_pl.pruning.block_hooks import BlockMaskHooks
from tinyfusion_pl.pruning.containers import resolve_block_sequence
from tinyfusion_pl.pruning.export import prune_blocks
from tinyfusion_pl.pruning.lora import LoRALinear
from tinyfusion_pl.pruning.selectors import (
    bi_score,
    block_influence,
    by_index,
    oracle,
    random_blocks,
    removal_costs,
    selection_groups,
    sensitivity,
)

DIM = 16
TEXT_TOKENS = 3
JOINT = BlockStreams(inputs=("hidden_states", "encoder_hidden_states"), outputs=("encoder_hidden_states", "hidden_states"))
IN_ORDER = BlockStreams(inputs=("hidden_states", "encoder_hidden_states"), outputs=("hidden_states", "encoder_hidden_states"))


# ---------------------------------------------------------------------------- toy models


class JointBlock(nn.Module):
    """A two-stream block (image tokens, text tokens), returning text first like diffusers' joint blocks."""

    def __init__(self, reverse_outputs: bool = True):
        super().__init__()
        self.image = nn.Linear(DIM, 2 * DIM)
        self.context = nn.Linear(DIM, 2 * DIM)
        self.cond = nn.Linear(DIM, 2 * DIM)
        self.image_out = nn.Linear(2 * DIM, DIM)
        self.text = nn.Linear(DIM, DIM)
        self.reverse_outputs = reverse_outputs

    def forward(self, hidden_states, encoder_hidden_states, temb):
        mixed = self.image(hidden_states) + self.context(encoder_hidden_states.mean(dim=1, keepdim=True))
        hidden = hidden_states + self.image_out(torch.tanh(mixed + self.cond(temb)[:, None]))  # (B, T, D)
        encoder = encoder_hidden_states + torch.tanh(self.text(encoder_hidden_states))  # (B, S, D)
        return (encoder, hidden) if self.reverse_outputs else (hidden, encoder)


class TwoListNet(nn.Module):
    """Blocks in two lists, run one list after the other (Flux: double-stream, then single-stream blocks).

    kind="single": one hidden state, block(x, c). kind="joint": two streams, the first list called by keyword
    and returning text first, the second called positionally and returning the streams in input order.
    """

    def __init__(self, first: int = 3, second: int = 5, kind: str = "single"):
        super().__init__()
        self.kind = kind
        if kind == "single":
            self.first = nn.ModuleList(ResidualBlock() for _ in range(first))
            self.second = nn.ModuleList(ResidualBlock() for _ in range(second))
        else:
            self.first = nn.ModuleList(JointBlock() for _ in range(first))
            self.second = nn.ModuleList(JointBlock(reverse_outputs=False) for _ in range(second))
        self.blocks = nn.ModuleList(nn.Linear(DIM, DIM) for _ in range(2))  # a decoy container nobody gates

    def forward(self, x, c, text=None):
        if self.kind == "single":
            for block in [*self.first, *self.second]:
                x = block(x, c)
            return x
        for block in self.first:
            text, x = block(hidden_states=x, encoder_hidden_states=text, temb=c)
        for block in self.second:
            x, text = block(x, text, c)
        return torch.cat([x, text], dim=1)  # (B, T + S, D)


TWO_LISTS = ["net.first", "net.second"]
STREAMS_PER_LIST = [JOINT, IN_ORDER]


def run_blocks(net, kept, x, c, text=None):
    """The net's computation with only the kept blocks (global indices), calling .forward so that no hook runs."""
    blocks = [*net.first, *net.second]
    with torch.no_grad():
        for index in kept:
            block = blocks[index]
            if net.kind == "single":
                x = block.forward(x, c)
            elif block.reverse_outputs:
                text, x = block.forward(x, text, c)
            else:
                x, text = block.forward(x, text, c)
    return x if net.kind == "single" else torch.cat([x, text], dim=1)


def step_batch(step, batch_size=32):
    generator = torch.Generator().manual_seed(10_000 + step)
    return (torch.randn(batch_size, 4, DIM, generator=generator), torch.randn(batch_size, DIM, generator=generator),
            torch.randn(batch_size, TEXT_TOKENS, DIM, generator=generator))


def index_loader(length):
    return DataLoader(TensorDataset(torch.arange(length)), batch_size=1)


class PlantedTwoListModule(L.LightningModule):
    """Regresses the output of a known subset of its own blocks (global indices over both lists)."""

    def __init__(self, planted, kind="single", lr=3e-3):
        super().__init__()
        self.net = TwoListNet(kind=kind).requires_grad_(False)
        self.teacher = copy.deepcopy(self.net)
        self.planted = planted
        self.bias = nn.Parameter(torch.zeros(DIM))
        self.lr = lr
        self.validation_outputs = []

    def training_step(self, batch, batch_idx):
        x, c, text = step_batch(self.global_step)
        target = run_blocks(self.teacher, self.planted, x, c, text)
        return (self.net(x, c, text) + self.bias - target).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        x, c, text = step_batch(-1 - batch_idx, batch_size=4)
        self.validation_outputs.append((x, c, text, self.net(x, c, text)))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


# ---------------------------------------------------------------------------- it learns


# 3 + 5 blocks in 2:4 groups: the first group spans both lists (blocks 0-2 of the first, block 0 of the second).
PLANTED = [1, 3, 4, 7]  # the initial decision keeps [0, 1] and [4, 5]: finding these must be learned


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "kind, streams",
    [("single", None), ("joint", STREAMS_PER_LIST)],
    ids=["two lists", "two lists of two-stream blocks (keyword + text first, positional + in order)"],
)
def test_the_planted_blocks_are_found_across_lists_and_streams(kind, streams, seed, tmp_path):
    L.seed_everything(seed)
    module = PlantedTwoListModule(PLANTED, kind=kind)
    mask = DifferentiableBlockMask(TWO_LISTS, pattern="2:4", streams=streams, plot=False)
    trainer = quick_trainer(tmp_path, max_steps=80, callbacks=[mask])
    trainer.fit(module, train_dataloaders=index_loader(80))
    assert mask.kept_blocks == PLANTED
    assert min(mask.confidences) > 2 / 6
    assert not any(block._forward_hooks for block in [*module.net.first, *module.net.second])


class OneListJointNet(nn.Module):
    """SD3-like: one list of two-stream blocks, called by keyword, returning text first."""

    def __init__(self, depth=8):
        super().__init__()
        self.blocks = nn.ModuleList(JointBlock() for _ in range(depth))

    def forward(self, x, c, text):
        for block in self.blocks:
            text, x = block(hidden_states=x, encoder_hidden_states=text, temb=c)
        return torch.cat([x, text], dim=1)


class PlantedJointModule(L.LightningModule):
    def __init__(self, planted):
        super().__init__()
        self.net = OneListJointNet().requires_grad_(False)
        self.teacher = copy.deepcopy(self.net)
        self.planted = planted
        self.bias = nn.Parameter(torch.zeros(DIM))

    def training_step(self, batch, batch_idx):
        x, c, text = step_batch(self.global_step)
        with torch.no_grad():
            target_x, target_text = x, text
            for index in self.planted:
                target_text, target_x = self.teacher.blocks[index].forward(target_x, target_text, c)
        return (self.net(x, c, text) + self.bias - torch.cat([target_x, target_text], dim=1)).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_planted_two_stream_blocks_are_found_with_keyword_calls_and_text_returned_first(seed, tmp_path):
    L.seed_everything(seed)
    module = PlantedJointModule([1, 2, 4, 7])
    mask = DifferentiableBlockMask("net.blocks", pattern="2:4", streams=JOINT, plot=False)
    quick_trainer(tmp_path, max_steps=80, callbacks=[mask]).fit(module, train_dataloaders=index_loader(80))
    assert mask.kept_blocks == [1, 2, 4, 7]


# ---------------------------------------------------------------------------- the mask callback


def test_a_decision_over_two_lists_names_them_and_validates_as_the_export(tmp_path):
    L.seed_everything(0)
    module = PlantedTwoListModule(PLANTED, kind="joint")
    mask = DifferentiableBlockMask(TWO_LISTS, pattern="1:2", streams=STREAMS_PER_LIST)
    with pytest.raises(RuntimeError, match=r"depth of \['net.first', 'net.second'\] yet"):
        print(mask.kept_blocks)
    quick_trainer(tmp_path, max_steps=4, callbacks=[mask]).fit(module, train_dataloaders=index_loader(4))
    decision = mask.decision()
    assert decision["blocks"] == TWO_LISTS and decision["depth"] == 8 and len(decision["kept_blocks"]) == 4
    assert (tmp_path / "decision_dynamics.png").is_file()
    # Outside training batches the net follows the decision: exactly the exported model's computation.
    validator = quick_trainer(tmp_path, max_steps=1, limit_val_batches=1, callbacks=[mask])
    validator.validate(module, dataloaders=index_loader(1), verbose=False)
    x, c, text, gated = module.validation_outputs[0]
    shallow = prune_blocks(module.net, ["first", "second"], decision["kept_blocks"])
    torch.testing.assert_close(shallow(x, c, text), gated, rtol=0, atol=0)
    torch.testing.assert_close(gated, run_blocks(module.net, decision["kept_blocks"], x, c, text), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"blocks": []}, r"blocks=\[\] must be the dotted path to the block container"),
        ({"blocks": ["net.first", "net.first"]}, r"lists a container more than once"),
        ({"streams": [JOINT]}, r"streams lists 1 descriptions for 2 block container\(s\)"),
        ({"streams": "hidden_states"}, r"streams='hidden_states' must be None .* or a list of them"),
        ({"streams": BlockStreams(("hidden_states",), ("text",))}, r"outputs=\['text'\] names \['text'\], not among"),
        ({"streams": JOINT, "hidden_state": 1}, r"hidden_state=1 and streams were both given"),
    ],
)
def test_block_lists_and_streams_are_checked_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DifferentiableBlockMask(**{"blocks": TWO_LISTS, "pattern": "1:2", **kwargs})


def test_streams_that_are_not_the_blocks_arguments_are_refused_in_setup(tmp_path):
    mask = DifferentiableBlockMask(TWO_LISTS, pattern="1:2", streams=BlockStreams(("x", "text"), ("x", "text")))
    with pytest.raises(ValueError, match=r"streams.inputs='x' is not an argument of JointBlock.forward\(hidden_states"):
        quick_trainer(tmp_path, max_steps=1, callbacks=[mask]).fit(
            PlantedTwoListModule(PLANTED, kind="joint"), train_dataloaders=index_loader(1))


# ---------------------------------------------------------------------------- a model family describes the streams


class TwoListFamily(ModelFamily):
    """A family for TwoListNet: where its lists are, their streams, and a depth it keeps like a diffusers config."""

    name = "two_list_toy"
    model_class = TwoListNet
    blocks = ("first", "second")
    depth_arguments = ("first", "second")
    label_argument = None

    def block_streams(self, container_index):
        return STREAMS_PER_LIST[container_index]

    def check_kept_blocks(self, net, kept_blocks):
        last = sum(self.block_counts(net)) - 1
        if last not in kept_blocks:
            raise ValueError(f"the last block ({last}) ends the text stream and must stay; kept_blocks={kept_blocks}")

    def after_depth_change(self, net, block_counts):
        net.config = {"first": block_counts[0], "second": block_counts[1]}


@pytest.fixture
def two_list_family(monkeypatch):
    monkeypatch.setattr(families, "FAMILIES", (*families.FAMILIES, TwoListFamily()))


def test_the_mask_takes_the_streams_of_the_family_that_describes_the_owner(two_list_family, tmp_path):
    L.seed_everything(0)
    module = PlantedTwoListModule(PLANTED, kind="joint")
    mask = DifferentiableBlockMask(TWO_LISTS, pattern="2:4", plot=False)  # no streams: the family gives them
    quick_trainer(tmp_path, max_steps=80, callbacks=[mask]).fit(module, train_dataloaders=index_loader(80))
    assert mask.kept_blocks == PLANTED


def test_prune_blocks_asks_the_family_first_and_records_the_new_depths(two_list_family):
    torch.manual_seed(0)
    net = TwoListNet(kind="joint")
    with pytest.raises(ValueError, match=r"the last block \(7\) ends the text stream and must stay"):
        prune_blocks(net, ["first", "second"], [0, 2, 4, 6])
    shallow = prune_blocks(net, ["first", "second"], [0, 2, 4, 7])
    assert shallow.config == {"first": 2, "second": 2} and not hasattr(net, "config")
    # Pruning one list of a described model: the family sees the decision in its own indices, other lists whole.
    assert prune_blocks(net, "first", [0]).config == {"first": 1, "second": 5}
    with pytest.raises(ValueError, match=r"must stay; kept_blocks=\[0, 1, 2, 3\]"):
        prune_blocks(net, "second", [0])

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

    wrapped = prune_blocks(Holder(), ["net.first", "net.second"], [1, 7])
    assert wrapped.net.config == {"first": 1, "second": 1}, "the family of the module owning the lists is asked"


# ---------------------------------------------------------------------------- export


@pytest.mark.parametrize("kind", ["single", "joint"])
def test_prune_blocks_on_two_lists_equals_the_gated_model_with_dropped_blocks_passed_through(kind):
    torch.manual_seed(0)
    net = TwoListNet(kind=kind).eval()
    kept = [0, 2, 3, 6]  # first list keeps 0 and 2, second list keeps its 0 and 3
    x, c, text = step_batch(0, batch_size=3)
    shallow = prune_blocks(net, ["first", "second"], kept)
    assert type(shallow) is TwoListNet
    assert [len(shallow.first), len(shallow.second)] == [2, 2] and [len(net.first), len(net.second)] == [3, 5]
    assert torch.equal(shallow.second[1].image.weight if kind == "joint" else shallow.second[1].fc1.weight,
                       net.second[3].image.weight if kind == "joint" else net.second[3].fc1.weight)
    assert [key for key in shallow.state_dict() if key.startswith("second.")][-1].startswith("second.1.")
    sequence = resolve_block_sequence(net, ["first", "second"])
    with torch.no_grad():
        dense = net(x, c, text)
    hooks = BlockMaskHooks(sequence.blocks, lambda index, hidden, block: index in kept,
                           streams=None if kind == "single" else [JOINT] * 3 + [IN_ORDER] * 5)
    with torch.no_grad():
        gated = net(x, c, text)
        assert not torch.allclose(gated, dense, atol=1e-3), "dropping blocks must change the output"
        torch.testing.assert_close(shallow(x, c, text), gated, rtol=0, atol=0)
    hooks.remove()
    torch.testing.assert_close(gated, run_blocks(net, kept, x, c, text), rtol=0, atol=1e-6)


def test_one_path_in_a_list_is_the_same_as_the_path():
    net = tiny_dit(depth=4)
    assert torch.equal(torch.cat([p.flatten() for p in prune_blocks(net, ["blocks"], [1, 2]).parameters()]),
                       torch.cat([p.flatten() for p in prune_blocks(net, "blocks", [1, 2]).parameters()]))
    with pytest.raises(ValueError, match=r"holds \[8\], outside the model's 8 blocks in \['first', 'second'\]"):
        prune_blocks(TwoListNet(), ["first", "second"], [0, 8])
    with pytest.raises(ValueError, match=r"blocks='third' does not resolve on TwoListNet.*'first' \(3 blocks\)"):
        prune_blocks(TwoListNet(), ["first", "third"], [0])



def test_one_of_several_lists_may_be_empty_after_pruning():
    emptied = prune_blocks(TwoListNet(), ["first", "second"], [3, 4])  # every block of 'first' dropped
    sequence = resolve_block_sequence(emptied, ["first", "second"])
    assert sequence.counts == [0, 2] and len(sequence.blocks) == 2
    emptied.second = nn.ModuleList()
    with pytest.raises(ValueError, match=r"blocks=\['first', 'second'\] are all empty on TwoListNet"):
        resolve_block_sequence(emptied, ["first", "second"])
    with pytest.raises(ValueError, match="blocks='first' is a ModuleList, not a non-empty container"):
        resolve_block_sequence(emptied, "first")


# ---------------------------------------------------------------------------- selectors


class Rotation(nn.Module):
    """Rotates every 2-D token by a fixed angle (cos(h, block(h)) = cos(angle)); the text stream by another."""

    def __init__(self, angle, text_angle=None):
        super().__init__()
        self.angle = nn.Parameter(torch.tensor(angle))
        self.text_angle = text_angle

    @staticmethod
    def rotate(x, angle):
        cos, sin = torch.cos(angle), torch.sin(angle)
        return torch.stack([cos * x[..., 0] - sin * x[..., 1], sin * x[..., 0] + cos * x[..., 1]], dim=-1)

    def forward(self, hidden_states, encoder_hidden_states=None):
        hidden = self.rotate(hidden_states, self.angle)
        if self.text_angle is None:
            return hidden
        return self.rotate(encoder_hidden_states, torch.tensor(self.text_angle)), hidden  # text first


class TwoListRotationNet(nn.Module):
    """An image read as 2-D tokens rotated by the blocks of two lists; with text angles, a two-stream net."""

    def __init__(self, angles, split=3, text_angles=None):
        super().__init__()
        rotations = [Rotation(angle, None if text_angles is None else text_angles[i]) for i, angle in enumerate(angles)]
        self.first = nn.ModuleList(rotations[:split])
        self.second = nn.ModuleList(rotations[split:])
        self.two_streams = text_angles is not None

    def forward(self, x, t, y=None):
        tokens = x.reshape(x.shape[0], -1, 2)  # (N, T, 2)
        text = tokens.flip(1)
        for block in [*self.first, *self.second]:
            if self.two_streams:
                text, tokens = block(hidden_states=tokens, encoder_hidden_states=text)
            else:
                tokens = block(tokens)
        return tokens.reshape(x.shape)


ANGLES = [1.2, 0.1, -0.4, 0.9, -1.5, -0.3]  # sum 0; |angle| order: 4, 0, 3, 2, 5, 1
TEXT_ANGLES = [0.0, 2.5, 0.0, 0.1, 0.0, 3.0]  # large where the image angle is small: the text stream would mislead
PLAIN_EPS = GaussianDiffusion(learn_sigma=False)
ROTATION_LISTS = ["first", "second"]


def image_batches(count=2, batch_size=8):
    generator = torch.Generator().manual_seed(0)
    return [(torch.rand(batch_size, 1, 8, 8, generator=generator) * 2 - 1, {}) for _ in range(count)]


@pytest.mark.parametrize("two_streams", [False, True], ids=["one stream", "two streams, text returned first"])
def test_every_selector_on_a_two_list_model(two_streams):
    net = TwoListRotationNet(ANGLES, text_angles=TEXT_ANGLES if two_streams else None)
    streams = BlockStreams(("hidden_states", "encoder_hidden_states"), ("encoder_hidden_states", "hidden_states"))
    options = {"blocks": ROTATION_LISTS, "streams": streams if two_streams else None}
    depth = len(resolve_block_sequence(net, ROTATION_LISTS))
    assert depth == 6

    influence = block_influence(net, PLAIN_EPS, image_batches(), **options)
    assert influence.tolist() == pytest.approx([1 - math.cos(angle) for angle in ANGLES], abs=1e-6), \
        "block influence compares the hidden stream, not the text stream the block returns first"
    groups = selection_groups(depth, pattern="2:3")  # the groups are the two lists here
    assert bi_score(net, PLAIN_EPS, image_batches(), groups, **options).kept_blocks == [0, 2, 3, 4]
    assert bi_score(net, PLAIN_EPS, image_batches(), selection_groups(depth, keep_ratio=0.5),
                    **options).kept_blocks == [0, 3, 4]

    costs = removal_costs(net, PLAIN_EPS, image_batches(), **options)
    assert sorted(range(6), key=lambda block: costs[block]) == sorted(range(6), key=lambda block: abs(ANGLES[block]))
    assert sensitivity(net, PLAIN_EPS, image_batches(), [(3, 6)], **options).kept_blocks == [0, 3, 4]

    assert by_index(depth, [5, 1]).kept_blocks == [1, 5]
    chosen = random_blocks(depth, groups, seed=0).kept_blocks
    assert len([b for b in chosen if b < 3]) == 2 and len([b for b in chosen if b >= 3]) == 2
    # whatever the selector, its decision exports as global indices over both lists
    shallow = prune_blocks(net, ROTATION_LISTS, chosen)
    assert len(shallow.first) + len(shallow.second) == 4


def test_the_oracle_and_by_index_on_a_two_list_model_of_eight_blocks():
    net = TwoListNet()
    depth = len(resolve_block_sequence(net, ["first", "second"]))
    selection = oracle(depth)
    assert selection.kept_blocks == [0, 2, 5, 7] and selection.groups == [(4, 8)]
    shallow = prune_blocks(net, ["first", "second"], selection.kept_blocks)
    assert [len(shallow.first), len(shallow.second)] == [2, 2]
    with pytest.raises(ValueError, match=r"kept_blocks=\[8\] holds \[8\], outside the model's 8 blocks"):
        by_index(depth, [8])


# ---------------------------------------------------------------------------- weight update


class TwoListModule(L.LightningModule):
    def __init__(self, kind="joint"):
        super().__init__()
        torch.manual_seed(0)
        self.net = TwoListNet(kind=kind)

    def training_step(self, batch, batch_idx):
        x, c, text = step_batch(self.global_step, batch_size=4)
        return self.net(x, c, text).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class AdapterRecord(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.wrapped = sorted(name for name, module in pl_module.named_modules() if isinstance(module, LoRALinear))
        self.trainable = sorted(name for name, p in pl_module.named_parameters() if p.requires_grad)


def test_the_weight_update_adapts_exactly_the_blocks_the_mask_gates(tmp_path):
    module = TwoListModule()
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    mask = DifferentiableBlockMask(TWO_LISTS, pattern="1:2", streams=STREAMS_PER_LIST, plot=False)
    update = CoOptimizedWeightUpdate(method="lora", rank=2)  # no blocks: the mask's
    record = AdapterRecord()
    quick_trainer(tmp_path, max_steps=2, callbacks=[mask, update, record]).fit(module, train_dataloaders=index_loader(2))
    linears = ("image", "context", "cond", "image_out", "text")
    expected = sorted(f"net.{path}.{i}.{name}" for path, depth in (("first", 3), ("second", 5)) for i in range(depth)
                      for name in linears)
    assert record.wrapped == expected, "both lists, and not the decoy net.blocks"
    assert all(".lora_" in name for name in record.trainable) and len(record.trainable) == 2 * len(expected)
    assert update.wrapped_layers[0] == "net.first.0.image" and len(update.wrapped_layers) == len(expected)
    assert not any(isinstance(m, LoRALinear) for m in module.modules())
    assert all(torch.equal(p, before[name]) for name, p in module.named_parameters())


def test_without_a_mask_and_without_blocks_the_weight_update_names_the_candidates(tmp_path):
    module = TwoListModule()
    update = CoOptimizedWeightUpdate(method="lora", rank=2)
    with pytest.raises(ValueError, match=r"(?s)trainer.callbacks has none.*'net.first' \(3 blocks\), 'net.second' "
                                         r"\(5 blocks\), 'net.blocks' \(2 blocks\).*add a DifferentiableBlockMask"):
        quick_trainer(tmp_path, max_steps=1, callbacks=[update]).fit(module, train_dataloaders=index_loader(1))
    assert all(p.requires_grad for p in module.parameters())


def test_explicit_blocks_other_than_the_masks_are_adapted_with_a_warning(tmp_path):
    module = TwoListModule()
    mask = DifferentiableBlockMask(TWO_LISTS, pattern="1:2", streams=STREAMS_PER_LIST, plot=False)
    record = AdapterRecord()
    update = CoOptimizedWeightUpdate(method="lora", rank=2, blocks="net.first")
    with pytest.warns(UserWarning, match=r"adapts blocks='net.first' while the DifferentiableBlockMask gates \["):
        quick_trainer(tmp_path, max_steps=1, callbacks=[mask, update, record]).fit(
            module, train_dataloaders=index_loader(1))
    assert all(name.startswith("net.first.") for name in record.wrapped) and len(record.wrapped) == 15


# ---------------------------------------------------------------------------- distillation


class TwoListDenoiser(nn.Module):
    """net(x, t, y): an image as tokens through two lists of two-stream blocks, text from the label."""

    def __init__(self, first=2, second=2):
        super().__init__()
        self.embed = nn.Linear(4, DIM)
        self.time = nn.Embedding(1000, DIM)
        self.label = nn.Embedding(3, DIM)
        self.first = nn.ModuleList(JointBlock() for _ in range(first))
        self.second = nn.ModuleList(JointBlock(reverse_outputs=False) for _ in range(second))
        self.out = nn.Linear(DIM, 4)

    def forward(self, x, t, y):
        tokens = self.embed(x.reshape(x.shape[0], -1, 4))  # (N, 4, D)
        text = self.label(y)[:, None].expand(-1, TEXT_TOKENS, -1)  # (N, S, D)
        temb = self.time(t)  # (N, D)
        for block in self.first:
            text, tokens = block(hidden_states=tokens, encoder_hidden_states=text, temb=temb)
        for block in self.second:
            tokens, text = block(tokens, text, temb)
        return self.out(tokens).reshape(x.shape)


def test_feature_capture_records_the_hidden_stream_of_two_stream_blocks():
    torch.manual_seed(0)
    net = TwoListDenoiser()
    sequence = resolve_block_sequence(net, ["first", "second"])
    x, t, y = torch.randn(2, 1, 4, 4), torch.tensor([3, 500]), torch.tensor([0, 2])
    outputs = {}
    for index, block in enumerate(sequence.blocks):
        block.register_forward_hook(lambda module, args, output, index=index: outputs.__setitem__(index, output))
    with FeatureCapture(sequence.blocks, [1, 3], [JOINT, JOINT, IN_ORDER, IN_ORDER]) as features:
        net(x, t, y)
    assert torch.equal(features[1], outputs[1][1]), "first list: the hidden stream is returned second"
    assert torch.equal(features[3], outputs[3][0]), "second list: the hidden stream is returned first"
    assert features[1].shape == (2, 4, DIM)


def test_distillation_pairs_global_indices_over_two_lists():
    torch.manual_seed(0)
    teacher = TwoListDenoiser(first=2, second=4)
    student = prune_blocks(teacher, ["first", "second"], [0, 3, 5])  # first keeps 0; second keeps 1 and 3
    batch = (torch.randn(4, 1, 4, 4), torch.randint(0, 3, (4,)))
    options = dict(blocks=["first", "second"], streams=[JOINT, IN_ORDER], objective=PLAIN_EPS, ema_decay=None)
    matched = DistillationModule(student, teacher, feature_pairs=[(0, 0), (1, 3), (2, 5)], **options)
    terms = matched.distillation_losses(batch, feature_weight=1.0, generator=torch.Generator().manual_seed(0))
    # Student block 0 is teacher block 0 on the same input: that pair compares equal hidden states; the later
    # student blocks see inputs without teacher blocks 1, 2 and 4, so theirs differ.
    single = DistillationModule(student, teacher, feature_pairs=[(0, 0)], **options)
    first_pair = single.distillation_losses(batch, feature_weight=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.count_nonzero(first_pair["feat"]) == 0 and (terms["feat"] > 0).all()
    with pytest.raises(ValueError, match=r"feature_pairs pairs \[\(3, 6\)\] do not fit.*student depth 3, teacher depth 6"):
        DistillationModule(student, teacher, feature_pairs=[(3, 6)], **options)


def test_a_lora_target_needs_to_match_in_one_of_the_lists_only(tmp_path):
    module = TwoListModule(kind="single")
    module.net.second[0].extra = nn.Linear(DIM, DIM)  # only one block of the second list has it
    mask = DifferentiableBlockMask(TWO_LISTS, pattern="1:2", plot=False)
    record = AdapterRecord()
    update = CoOptimizedWeightUpdate(method="lora", rank=2, target=["extra", "fc2"])
    quick_trainer(tmp_path, max_steps=1, callbacks=[mask, update, record]).fit(module, train_dataloaders=index_loader(1))
    assert record.wrapped == sorted(["net.second.0.extra"] + [f"net.{path}.{i}.fc2" for path, depth in
                                                               (("first", 3), ("second", 5)) for i in range(depth)])
    assert sorted(update.wrapped_layers) == record.wrapped
