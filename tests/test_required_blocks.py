"""Blocks a model family requires (SD3's context-pre-only last block) are kept while choosing, not only at export:
by the learned mask's gates and by every baseline selector."""

import copy

import lightning as L
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from tests.conftest import quick_trainer
from tinyfusion_pl import families
from tinyfusion_pl.callbacks.block_mask import DifferentiableBlockMask
from tinyfusion_pl.families import BlockStreams, ModelFamily
from tinyfusion_pl.objectives import GaussianDiffusion
from tinyfusion_pl.pruning.export import prune_blocks
from tinyfusion_pl.pruning.gates import BlockGates
from tinyfusion_pl.pruning.selectors import bi_score, by_index, oracle, random_blocks, sensitivity

DIM = 16
JOINT = BlockStreams(inputs=("hidden_states", "encoder_hidden_states"), outputs=("encoder_hidden_states", "hidden_states"))

# ---------------------------------------------------------------------------- a two-stream model and its family


class JointBlock(nn.Module):
    """A two-stream residual block (image tokens, text tokens) returning text first, like diffusers' joint blocks."""

    def __init__(self):
        super().__init__()
        self.image = nn.Linear(DIM, 2 * DIM)
        self.context = nn.Linear(DIM, 2 * DIM)
        self.image_out = nn.Linear(2 * DIM, DIM)
        self.text = nn.Linear(DIM, DIM)

    def forward(self, hidden_states, encoder_hidden_states):
        mixed = self.image(hidden_states) + self.context(encoder_hidden_states.mean(dim=1, keepdim=True))
        hidden = hidden_states + self.image_out(torch.tanh(mixed))  # (B, T, D)
        return encoder_hidden_states + torch.tanh(self.text(encoder_hidden_states)), hidden


class Rotation(nn.Module):
    """Rotates every 2-D image token by `angle` and every text token by 0.3: cos(h, block(h)) = cos(angle)."""

    def __init__(self, angle):
        super().__init__()
        self.angle = nn.Parameter(torch.tensor(angle))

    @staticmethod
    def rotate(x, angle):
        cos, sin = torch.cos(angle), torch.sin(angle)
        return torch.stack([cos * x[..., 0] - sin * x[..., 1], sin * x[..., 0] + cos * x[..., 1]], dim=-1)

    def forward(self, hidden_states, encoder_hidden_states):
        return self.rotate(encoder_hidden_states, torch.tensor(0.3)), self.rotate(hidden_states, self.angle)


class TwoStreamNet(nn.Module):
    """Two-stream blocks called by keyword; the family requires `required_blocks` (by default the last block)."""

    def __init__(self, blocks, required_blocks=None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.required_blocks = (len(self.blocks) - 1,) if required_blocks is None else tuple(required_blocks)

    def run(self, hidden, text):
        for block in self.blocks:
            text, hidden = block(hidden_states=hidden, encoder_hidden_states=text)
        return hidden, text

    def forward(self, x, t, y=None):
        tokens = x.reshape(x.shape[0], -1, 2)  # (N, T, 2)
        hidden, _ = self.run(tokens, tokens.flip(1))
        return hidden.reshape(x.shape)


class RequiredBlocksFamily(ModelFamily):
    """Describes TwoStreamNet: joint streams, and blocks every exportable decision keeps (like SD3's last one)."""

    name = "required_blocks_toy"
    model_class = TwoStreamNet
    blocks = ("blocks",)
    depth_arguments = ("depth",)
    label_argument = None

    def block_streams(self, container_index):
        return JOINT

    def required_blocks(self, net):
        return net.required_blocks

    def check_kept_blocks(self, net, kept_blocks):
        dropped = sorted(set(net.required_blocks) - set(kept_blocks))
        if dropped:
            raise ValueError(f"drops the required blocks {dropped}")


@pytest.fixture
def described(monkeypatch):
    monkeypatch.setattr(families, "FAMILIES", (*families.FAMILIES, RequiredBlocksFamily()))


# ---------------------------------------------------------------------------- the learned mask


def step_batch(step, batch_size=32):
    generator = torch.Generator().manual_seed(10_000 + step)
    return torch.randn(batch_size, 4, DIM, generator=generator), torch.randn(batch_size, 3, DIM, generator=generator)


def index_loader(length):
    return DataLoader(TensorDataset(torch.arange(length)), batch_size=1)


class PlantedModule(L.LightningModule):
    """Regresses both streams of a known subset of its own blocks (the planted answer)."""

    def __init__(self, planted, required_blocks=None):
        super().__init__()
        self.net = TwoStreamNet([JointBlock() for _ in range(8)], required_blocks).requires_grad_(False)
        self.teacher = copy.deepcopy(self.net)
        self.planted = planted
        self.bias = nn.Parameter(torch.zeros(DIM))

    def training_step(self, batch, batch_idx):
        hidden, text = step_batch(self.global_step)
        with torch.no_grad():
            target_hidden, target_text = hidden, text
            for index in self.planted:
                target_text, target_hidden = self.teacher.blocks[index].forward(target_hidden, target_text)
        prediction = torch.cat(self.net.run(hidden, text), dim=1) + self.bias
        return (prediction - torch.cat([target_hidden, target_text], dim=1)).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


PLANTED = [1, 2, 4, 6]  # 2:4 groups [0-3] and [4-7]: the planted answer drops the required last block 7


def fit_planted(folder, mask, seed, required_blocks=None, steps=80):
    L.seed_everything(seed)
    module = PlantedModule(PLANTED, required_blocks)
    quick_trainer(folder, max_steps=steps, callbacks=[mask]).fit(module, train_dataloaders=index_loader(steps))
    return module


def test_without_a_family_the_mask_finds_the_planted_answer_and_drops_the_last_block(tmp_path):
    mask = DifferentiableBlockMask("net.blocks", pattern="2:4", streams=JOINT, plot=False)
    fit_planted(tmp_path, mask, seed=0)
    assert mask.kept_blocks == PLANTED and mask.decision()["required_blocks"] == []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_mask_never_drops_a_block_the_family_requires(described, seed, tmp_path):
    mask = DifferentiableBlockMask("net.blocks", pattern="2:4", plot=False)
    module = fit_planted(tmp_path, mask, seed)
    # The last group's gates only cover {4, 7}, {5, 7}, {6, 7}; the first group still learns its planted blocks.
    assert mask.gates.option_counts == [6, 3]
    assert [len(logits) for logits in mask.gates.gate_logits] == [6, 3]
    assert mask.kept_blocks[:2] == [1, 2] and 7 in mask.kept_blocks
    decision = mask.decision()
    assert decision["required_blocks"] == [7]
    assert all(7 in mask.gates.kept_by_group(record["chosen_options"])[1] for record in decision["history"])
    drawn = mask.gates.sample_masks(mask.gates.draw_noise(256, torch.Generator().manual_seed(seed)), 1.0, 1.0)
    assert drawn[:, 7].eq(1).all() and drawn.sum(dim=1).eq(4).all(), "every per-sample draw keeps block 7"
    prune_blocks(module.net, "blocks", mask.kept_blocks)  # the family accepts the decision


def test_the_state_carries_the_restriction_and_loads_before_and_after_setup(described, tmp_path):
    mask = DifferentiableBlockMask("net.blocks", pattern=[[2, 4], [2, 4]], plot=False)
    assert mask.gates.option_counts == [6, 6]  # the family is unknown before setup
    module = fit_planted(tmp_path, mask, seed=0, steps=20)
    state = mask.state_dict()
    assert state["required_blocks"] == [7] and [len(logits) for logits in state["gate_logits"]] == [6, 6]
    assert torch.isinf(state["gate_logits"][1]).sum() == 3, "options without block 7 are saved as -inf"

    resumed = DifferentiableBlockMask("net.blocks", pattern=[[2, 4], [2, 4]], plot=False)
    resumed.load_state_dict(state)  # before setup: takes the checkpoint's requirement
    assert resumed.gates.option_counts == [6, 3] and resumed.kept_blocks == mask.kept_blocks
    validator = quick_trainer(tmp_path, max_steps=1, limit_val_batches=1, callbacks=[resumed])
    validator.validate(module, dataloaders=index_loader(1), verbose=False)
    assert resumed.kept_blocks == mask.kept_blocks
    for a, b in zip(resumed.gates.ema_logits, mask.gates.ema_logits, strict=True):
        assert torch.equal(a, b)
    resumed.load_state_dict(state)  # after setup: the same
    assert resumed.decision()["chosen_options"] == mask.decision()["chosen_options"]
    assert mask.plot_dynamics(tmp_path / "dynamics.png").is_file()


def test_a_group_that_cannot_keep_its_required_blocks_stops_setup(described, tmp_path):
    mask = DifferentiableBlockMask("net.blocks", pattern="1:2", plot=False)
    L.seed_everything(0)
    module = PlantedModule(PLANTED, required_blocks=(6, 7))
    with pytest.raises(
        ValueError,
        match=r"the TwoStreamNet family \(of 'net'\) requires blocks \[6, 7\].*but group 3 \(blocks 6-7, \[1, 2\]\) "
              r"keeps 1 of its 2 blocks, fewer than its required blocks \[6, 7\]\. Let that group keep at least 2, e\.g\. "
              r"pattern=\[\[1, 2\], \[1, 2\], \[1, 2\], \[2, 2\]\]",
    ):
        quick_trainer(tmp_path, max_steps=1, callbacks=[mask]).fit(module, train_dataloaders=index_loader(1))
    assert not any(block._forward_hooks for block in module.net.blocks)


def test_gates_admit_only_the_options_that_keep_the_required_blocks():
    gates = BlockGates([(2, 4), (1, 2)], required_blocks=[1, 4])
    assert gates.option_counts == [3, 1]
    assert gates.option_ids[0].tolist() == [0, 3, 4]  # (0, 1), (1, 2), (1, 3) among the 6 lexicographic options
    with torch.no_grad():
        gates.ema_logits[0].copy_(torch.tensor([0.0, 0.0, 1.0]))
    assert gates.chosen_options().tolist() == [4, 0] and gates.kept_blocks() == [1, 3, 4]
    with pytest.raises(ValueError, match=r"required_blocks=\[6\]: blocks \[6\] are outside the 6 blocks"):
        BlockGates([(2, 4), (1, 2)], required_blocks=[6])


# ---------------------------------------------------------------------------- the baseline selectors

# The image angles sum to 0, so every removal costs; block 7 turns least (|0.05|), then block 6 (|-0.15|):
# block influence and sensitivity both rank 7 last, and 1:2 keeps 6 in the last group unless 7 is required.
ANGLES = [1.2, 0.2, -0.4, 0.9, -1.5, -0.3, -0.15, 0.05]
PLAIN_EPS = GaussianDiffusion(learn_sigma=False)


def image_batches(count=2, batch_size=8):
    generator = torch.Generator().manual_seed(0)
    return [(torch.rand(batch_size, 1, 8, 8, generator=generator) * 2 - 1, {}) for _ in range(count)]


@pytest.mark.parametrize("selector", [bi_score, sensitivity], ids=["bi_score", "sensitivity"])
def test_score_selectors_keep_the_required_block_and_fill_the_group_with_the_best_others(described, selector):
    net = TwoStreamNet([Rotation(angle) for angle in ANGLES])
    groups = [(1, 2)] * 4
    free = selector(net, PLAIN_EPS, image_batches(), groups)
    assert free.kept_blocks == [0, 3, 4, 6], "block 7 scores lowest: without the requirement it is dropped"
    kept = selector(net, PLAIN_EPS, image_batches(), groups, required_blocks=[7])
    assert kept.kept_blocks == [0, 3, 4, 7] and kept.scores == free.scores
    in_one_group = selector(net, PLAIN_EPS, image_batches(), [(4, 8)], required_blocks=[7])
    assert in_one_group.kept_blocks == [0, 3, 4, 7], "the three best of the others, and 7"
    with pytest.raises(ValueError, match=r"required_blocks=\[6, 7\]: group 3 \(blocks 6-7, \[1, 2\]\) keeps 1"):
        selector(net, PLAIN_EPS, image_batches(), groups, required_blocks=[6, 7])


def test_random_keeps_the_required_block_and_draws_the_rest():
    groups = [(2, 4), (2, 4)]
    selections = [random_blocks(8, groups, seed=seed, required_blocks=[7]).kept_blocks for seed in range(30)]
    assert all(7 in kept and len(kept) == 4 for kept in selections)
    assert {kept[2] for kept in selections} == {4, 5, 6}
    assert random_blocks(8, groups, seed=3, required_blocks=[7]).scores == random_blocks(8, groups, seed=3).scores


def test_fixed_lists_that_drop_a_required_block_are_refused():
    assert by_index(8, [0, 2, 5, 7], required_blocks=[7]).kept_blocks == [0, 2, 5, 7]
    with pytest.raises(ValueError, match=r"kept_blocks=\[0, 2, 4, 6\] drops blocks \[7\], which the model's family "
                                         r"requires .* Add them to kept_blocks"):
        by_index(8, [0, 2, 4, 6], required_blocks=[7])
    with pytest.raises(ValueError, match=r"kept_blocks=\[1, 2\] drops blocks \[7\]"):
        oracle(8, [1, 2], required_blocks=[7])
    assert oracle(8, required_blocks=[7]).kept_blocks == [0, 2, 5, 7]  # BK-SDM keeps the last block
    with pytest.raises(ValueError, match=r"BK-SDM's oracle list for 8 blocks \[0, 2, 5, 7\] drops blocks \[6\].*"
                                         r"Pass kept_blocks=\[\.\.\.\] that keeps them"):
        oracle(8, required_blocks=[6])


# ---------------------------------------------------------------------------- a diffusers SD3 in a user's module


class SD3Module(L.LightningModule):
    """A user's own module around a tiny SD3Transformer2DModel, trained to predict noise."""

    def __init__(self, diffusers):
        super().__init__()
        torch.manual_seed(0)
        self.transformer = diffusers.SD3Transformer2DModel(
            sample_size=4, patch_size=2, in_channels=2, out_channels=2, num_layers=4, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=8, caption_projection_dim=16, pooled_projection_dim=8,
            pos_embed_max_size=4)

    @staticmethod
    def inputs(seed):
        generator = torch.Generator().manual_seed(seed)
        return {"hidden_states": torch.randn(2, 2, 4, 4, generator=generator),
                "timestep": torch.randint(0, 1000, (2,), generator=generator),
                "encoder_hidden_states": torch.randn(2, 3, 8, generator=generator),
                "pooled_projections": torch.randn(2, 8, generator=generator)}

    def training_step(self, batch, batch_idx):
        prediction = self.transformer(**self.inputs(100 + self.global_step)).sample
        return (prediction - torch.randn_like(prediction)).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_a_diffusers_sd3_pruned_1_in_2_keeps_its_last_block_and_reloads_strictly(tmp_path):
    module = SD3Module(pytest.importorskip("diffusers"))
    model = module.transformer
    mask = DifferentiableBlockMask("transformer.transformer_blocks", pattern="1:2", plot=False)
    quick_trainer(tmp_path, max_steps=2, callbacks=[mask]).fit(module, train_dataloaders=index_loader(2))
    # The SD3 family requires the context-pre-only last block: the last group's only option keeps it.
    assert mask.gates.option_counts == [2, 1] and mask.kept_blocks[1] == 3

    shallow = prune_blocks(model.eval(), "transformer_blocks", mask.kept_blocks)
    assert shallow.config.num_layers == 2
    shallow.save_pretrained(tmp_path / "pruned")
    reloaded, info = type(model).from_pretrained(tmp_path / "pruned", output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    inputs = SD3Module.inputs(seed=7)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(**inputs).sample, shallow(**inputs).sample, rtol=1e-5, atol=1e-6)
