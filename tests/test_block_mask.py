"""DifferentiableBlockMask through real Lightning Trainers: it learns, fits any module, resumes, cleans up."""

import copy
import json

import lightning as L
import matplotlib.image
import pytest
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, TensorDataset

from tests.conftest import quick_trainer, tiny_dit
from tinyfusion_pl.callbacks.block_mask import DifferentiableBlockMask
from tinyfusion_pl.callbacks.weight_update import CoOptimizedWeightUpdate
from tinyfusion_pl.data.digits import DigitsDataModule
from tinyfusion_pl.module import DiffusionModule
from tinyfusion_pl.pruning.export import prune_blocks

DIM = 16
PLANTED = [1, 2, 4, 7]  # the initial 2:4 decision keeps [0, 1] and [4, 5]: finding these must be learned


# ---------------------------------------------------------------------------- toy models


class ResidualBlock(nn.Module):
    """A conditioned residual MLP, called like a DiT block: block(x, c)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(DIM, 2 * DIM)
        self.cond = nn.Linear(DIM, 2 * DIM)
        self.fc2 = nn.Linear(2 * DIM, DIM)

    def forward(self, x, c):
        return x + self.fc2(torch.tanh(self.fc1(x) + self.cond(c)[:, None]))  # (B, T, D)


class ToyNet(nn.Module):
    def __init__(self, depth):
        super().__init__()
        self.blocks = nn.ModuleList(ResidualBlock() for _ in range(depth))

    def forward(self, x, c):
        for block in self.blocks:
            x = block(x, c)
        return x


def step_batch(step, batch_size=32):
    """Inputs that depend only on the step, so interrupted and uninterrupted runs see the same data."""
    generator = torch.Generator().manual_seed(10_000 + step)
    return torch.randn(batch_size, 4, DIM, generator=generator), torch.randn(batch_size, DIM, generator=generator)


def index_loader(length):
    return DataLoader(TensorDataset(torch.arange(length)), batch_size=1)


class PlantedModule(L.LightningModule):
    """Regresses the output of a known subset of its own blocks; every other block only does harm."""

    def __init__(self, planted=PLANTED, depth=8, train_blocks=False, lr=3e-3):
        super().__init__()
        self.net = ToyNet(depth)
        self.teacher = nn.ModuleList(copy.deepcopy(self.net.blocks[i]) for i in planted).requires_grad_(False)
        self.net.requires_grad_(train_blocks)
        self.bias = nn.Parameter(torch.zeros(DIM))
        self.lr = lr
        self.validation_outputs = []

    def target(self, x, c):
        with torch.no_grad():
            for block in self.teacher:
                x = block(x, c)
        return x

    def training_step(self, batch, batch_idx):
        x, c = step_batch(self.global_step)
        return (self.net(x, c) + self.bias - self.target(x, c)).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        x, c = step_batch(-1 - batch_idx)
        self.validation_outputs.append((x, c, self.net(x, c)))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def kept_composition(net, kept, x, c):
    """The net's output with only the kept blocks, calling .forward so that no hook is involved."""
    with torch.no_grad():
        for index in kept:
            x = net.blocks[index].forward(x, c)
    return x


# ---------------------------------------------------------------------------- construction


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"blocks": ""}, r"blocks='' must be the dotted path"),
        ({"pattern": "5:4"}, r"pattern='5:4' keeps N=5 of M=4 .* 1 <= N <= M"),
        ({"pattern": None}, r"No pattern given"),
        ({"pattern": None, "keep_ratio": 0.3, "group_size": 4}, r"realisable keep ratios are 0\.25, 0\.5"),
        ({"scaling": 0.0}, r"scaling=0\.0 must be a positive number .* or a \(start, end\) pair"),
        ({"tau": (4.0, -0.1)}, r"tau=\(4\.0, -0\.1\) must be a positive number"),
        ({"tau": "4"}, r"tau='4' must be a positive number"),
        ({"init_logit": float("nan")}, r"init_logit=nan must be a finite number"),
        ({"lr_multiplier": 0}, r"lr_multiplier=0 must be a positive number"),
        ({"ema_decay": 1.0}, r"ema_decay=1\.0 must be in \[0, 1\)"),
        ({"hidden_state": -1}, r"hidden_state=-1 must be the positional index"),
        ({"hidden_state": ""}, r"hidden_state='' must be the positional index"),
        ({"total_steps": 0}, r"total_steps=0 must be a positive integer or None"),
        ({"log_every_n_steps": 2.5}, r"log_every_n_steps=2\.5 must be a positive integer or None"),
        ({"seed": -3}, r"seed=-3 must be a non-negative integer or None"),
    ],
)
def test_invalid_arguments_are_refused_naming_the_argument(kwargs, message):
    arguments = {"blocks": "net.blocks", "pattern": "2:4", **kwargs}
    with pytest.raises(ValueError, match=message):
        DifferentiableBlockMask(**arguments)


def test_every_invalid_argument_is_reported_at_once():
    with pytest.raises(ValueError, match=r"(?s)pattern='0:2'.*tau=-1.*ema_decay=2"):
        DifferentiableBlockMask("net.blocks", pattern="0:2", tau=-1, ema_decay=2)


def test_the_initial_decision_is_known_before_fit_when_the_groups_are():
    mask = DifferentiableBlockMask("net.blocks", pattern=[[1, 2], [2, 4]])
    assert mask.kept_blocks == [0, 2, 3]
    assert mask.confidences == pytest.approx([1 / 2, 1 / 6])
    assert mask.decision()["history"] == []
    undecided = DifferentiableBlockMask("net.blocks", pattern="1:2")
    with pytest.raises(RuntimeError, match=r"does not know the depth of 'net.blocks' yet"):
        print(undecided.kept_blocks)


# ---------------------------------------------------------------------------- it learns


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_it_finds_the_planted_blocks(seed, tmp_path):
    L.seed_everything(seed)
    module = PlantedModule()
    mask = DifferentiableBlockMask("net.blocks", pattern="2:4", plot=False)
    trainer = quick_trainer(tmp_path, max_steps=80, callbacks=[mask])
    trainer.fit(module, train_dataloaders=index_loader(80))
    assert mask.kept_blocks == PLANTED
    assert min(mask.confidences) > 2 / 6, "confidence rose well above the uniform 1/6"


def test_validation_measures_the_pruned_model(tmp_path):
    L.seed_everything(0)
    module = PlantedModule()
    mask = DifferentiableBlockMask("net.blocks", pattern="2:4", plot=False)
    # one epoch of 12 steps, then one validation batch with the final decision
    trainer = quick_trainer(tmp_path, max_steps=12, limit_val_batches=1, callbacks=[mask])
    trainer.fit(module, train_dataloaders=index_loader(12), val_dataloaders=index_loader(1))
    assert len(module.validation_outputs) == 1
    x, c, output = module.validation_outputs[0]
    assert len(mask.kept_blocks) == 4
    assert torch.allclose(output, kept_composition(module.net, mask.kept_blocks, x, c), atol=1e-6)
    dense = kept_composition(module.net, range(8), x, c)
    assert not torch.allclose(output, dense, atol=1e-3), "the dense model would give another output"


def test_a_pruning_step_on_a_tiny_dit_is_validated_as_the_exported_shallow_model(tmp_path):
    L.seed_everything(0)
    module = DiffusionModule(tiny_dit(depth=4), ema_decay=None, lr=1e-3)
    data = DigitsDataModule(batch_size=16)
    mask = DifferentiableBlockMask("net.blocks", pattern="1:2", plot=False)
    trainer = quick_trainer(tmp_path, max_steps=3, callbacks=[mask])
    trainer.fit(module, datamodule=data)
    kept = mask.kept_blocks
    assert len(kept) == 2 and kept[0] in (0, 1) and kept[1] in (2, 3)

    validator = quick_trainer(tmp_path, max_steps=1, limit_val_batches=2, callbacks=[mask])
    masked = validator.validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    shallow = DiffusionModule(prune_blocks(module.net, blocks="blocks", keep=kept), ema_decay=None)
    plain = quick_trainer(tmp_path, max_steps=1, limit_val_batches=2)
    exported = plain.validate(shallow, datamodule=data, verbose=False)[0]["val/loss"]
    assert masked == pytest.approx(exported, rel=1e-5)
    assert not any(block._forward_hooks for block in module.net.blocks)


# ---------------------------------------------------------------------------- any user module


class UserModel(L.LightningModule):
    """Written the way a user would, knowing nothing of pruning: a torch TransformerEncoder under `encoder`."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, DIM)
        layer = nn.TransformerEncoderLayer(DIM, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=4, enable_nested_tensor=False)
        self.head = nn.Linear(DIM, 3)
        self.head.bias.requires_grad_(False)  # a choice of the user's that the callbacks must leave alone

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)))  # (B, T, 3)

    def training_step(self, batch, batch_idx):
        generator = torch.Generator().manual_seed(self.global_step)
        x = torch.randn(8, 5, 3, generator=generator)
        return (self(x) - x.flip(1)).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def hook_count(module):
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in module.modules()
    )


@pytest.mark.parametrize("with_weight_update", [False, True])
def test_a_hand_built_user_module_is_pruned_by_adding_the_callbacks_and_left_as_it_was(with_weight_update, tmp_path):
    L.seed_everything(0)
    module = UserModel()
    keys_before = list(module.state_dict())
    flags_before = {name: p.requires_grad for name, p in module.named_parameters()}
    hooks_before = hook_count(module)
    mask = DifferentiableBlockMask("encoder.layers", pattern=[[1, 2], [1, 2]])
    initial_logits = [logits.detach().clone() for logits in mask.gates.gate_logits]
    callbacks = [mask]
    if with_weight_update:
        callbacks.append(CoOptimizedWeightUpdate(method="lora", rank=4))  # adapts the mask's blocks
    trainer = quick_trainer(tmp_path, max_steps=6, callbacks=callbacks)
    trainer.fit(module, train_dataloaders=index_loader(6))

    kept = mask.kept_blocks
    assert len(kept) == 2 and kept[0] in (0, 1) and kept[1] in (2, 3)
    assert all(not torch.equal(a, b) for a, b in zip(initial_logits, mask.gates.gate_logits, strict=True))
    assert list(module.state_dict()) == keys_before
    assert {name: p.requires_grad for name, p in module.named_parameters()} == flags_before
    assert hook_count(module) == hooks_before
    assert not set(map(id, mask.gates.parameters())) & set(map(id, module.parameters()))
    assert (tmp_path / "decision_dynamics.png").is_file(), "no logger: the figure goes to default_root_dir"


def test_a_wrong_block_path_lists_the_containers_the_module_has(tmp_path):
    mask = DifferentiableBlockMask("net.blocks", pattern="1:2")
    with pytest.raises(ValueError, match=r"blocks='net.blocks' does not resolve.*'encoder.layers' \(4 blocks\)"):
        quick_trainer(tmp_path, max_steps=1, callbacks=[mask]).fit(UserModel(), train_dataloaders=index_loader(1))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"pattern": "2:4"}, r"'2:4' needs a depth that is a multiple of M=4, but the block container has 6"),
        ({"pattern": [[1, 2], [1, 2]]}, r"covers 4 blocks but the block container has 6"),
        ({"pattern": "1:2", "hidden_state": "h"}, r"hidden_state='h' is not an argument of ResidualBlock.forward"),
    ],
)
def test_setup_refuses_what_does_not_fit_the_model(kwargs, message, tmp_path):
    mask = DifferentiableBlockMask("net.blocks", **kwargs)
    with pytest.raises(ValueError, match=message):
        quick_trainer(tmp_path, max_steps=1, callbacks=[mask]).fit(
            PlantedModule(planted=[1, 2], depth=6), train_dataloaders=index_loader(1)
        )


class Endless(torch.utils.data.IterableDataset):
    def __iter__(self):
        while True:
            yield torch.zeros(1)


def test_a_run_of_unknown_length_asks_for_total_steps(tmp_path):
    mask = DifferentiableBlockMask("net.blocks", pattern="2:4", plot=False)
    trainer = quick_trainer(tmp_path, max_steps=-1, max_epochs=1, callbacks=[mask])
    with pytest.raises(ValueError, match=r"run length is -1 steps.*pass total_steps=\.\.\. to the callback"):
        trainer.fit(PlantedModule(), train_dataloaders=DataLoader(Endless(), batch_size=1))
    assert hook_count(trainer.lightning_module) == 0


def test_a_module_without_an_optimizer_is_refused(tmp_path):
    class NoOptimizer(PlantedModule):
        def configure_optimizers(self):
            return None

    mask = DifferentiableBlockMask("net.blocks", pattern="2:4", plot=False)
    with pytest.raises(RuntimeError, match=r"needs an optimizer .* configure_optimizers returned none"):
        quick_trainer(tmp_path, max_steps=1, callbacks=[mask]).fit(NoOptimizer(), train_dataloaders=index_loader(1))


def test_a_failing_fit_still_leaves_no_hooks(tmp_path):
    class FailingModule(PlantedModule):
        def training_step(self, batch, batch_idx):
            if self.global_step == 2:
                raise RuntimeError("user code failed")
            return super().training_step(batch, batch_idx)

    module = FailingModule()
    mask = DifferentiableBlockMask("net.blocks", pattern="2:4", plot=False)
    with pytest.raises(RuntimeError, match="user code failed"):
        quick_trainer(tmp_path, max_steps=5, callbacks=[mask]).fit(module, train_dataloaders=index_loader(5))
    assert hook_count(module) == 0


# ---------------------------------------------------------------------------- optimizer


SCHEDULERS = {
    "LambdaLR": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step),
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=6),
    "SequentialLR": lambda opt: torch.optim.lr_scheduler.SequentialLR(
        opt,
        [torch.optim.lr_scheduler.LinearLR(opt, 0.1, total_iters=2), torch.optim.lr_scheduler.CosineAnnealingLR(opt, 4)],
        milestones=[2],
    ),
    "CyclicLR": lambda opt: torch.optim.lr_scheduler.CyclicLR(opt, 1e-4, 1e-3, step_size_up=2),
    "ReduceLROnPlateau": lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", patience=0),
}


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_gates_get_their_own_group_at_the_lr_multiple_following_the_user_schedule(scheduler, tmp_path):
    class ScheduledModule(PlantedModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.05)
            config = {"scheduler": SCHEDULERS[scheduler](optimizer), "interval": "step", "monitor": "train_loss"}
            return {"optimizer": optimizer, "lr_scheduler": config}

    class GroupProbe(Callback):
        seen = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            gate_ids = {id(p) for p in mask.gates.gate_logits}
            holding = [
                (len(group["params"]), group["lr"], group["weight_decay"])  # copies: the groups change later
                for group in optimizer.param_groups
                if gate_ids & {id(p) for p in group["params"]}
            ]
            self.seen.append((optimizer.param_groups[0]["lr"], holding))

    mask = DifferentiableBlockMask("net.blocks", pattern="2:4", lr_multiplier=7.0, plot=False)
    probe = GroupProbe()
    quick_trainer(tmp_path, max_steps=6, callbacks=[mask, probe]).fit(
        ScheduledModule(), train_dataloaders=index_loader(6)
    )
    user_lrs = [user_lr for user_lr, _ in probe.seen]
    assert len(user_lrs) == 6 and len(set(user_lrs)) > 1, "the user's schedule moved the lr"
    if scheduler == "LambdaLR":
        assert user_lrs == pytest.approx([1e-3 * 0.5**step for step in range(6)])
    for user_lr, holding in probe.seen:
        assert len(holding) == 1
        gate_count, gate_lr, gate_weight_decay = holding[0]
        assert gate_count == 2 and gate_lr == pytest.approx(7.0 * user_lr) and gate_weight_decay == 0.0


def test_the_ema_moves_once_per_optimizer_step_under_gradient_accumulation(tmp_path):
    mask = DifferentiableBlockMask("net.blocks", pattern="2:4", log_every_n_steps=1, plot=False)
    trainer = quick_trainer(tmp_path, max_steps=3, accumulate_grad_batches=2, callbacks=[mask])
    trainer.fit(PlantedModule(), train_dataloaders=index_loader(6))
    assert [record["step"] for record in mask.decision()["history"]] == [0, 1, 2, 3]
    assert mask.state_dict()["draws"] == 6, "one per-sample gate draw per micro-batch"


# ---------------------------------------------------------------------------- logging and outputs


class RecordingLogger(Logger):
    """A minimal logger that can take images, as WandbLogger can."""

    def __init__(self, save_dir):
        super().__init__()
        self._save_dir = str(save_dir)
        self.metrics, self.images = {}, []

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    @property
    def save_dir(self):
        return self._save_dir

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.setdefault(step, {}).update(metrics)

    def log_image(self, key, images, step=None):
        self.images.append((key, images, step))


def test_logs_schedules_confidences_and_changes_and_writes_the_dynamics_figure(tmp_path):
    L.seed_everything(0)
    steps = 8
    logger = RecordingLogger(tmp_path / "run")
    mask = DifferentiableBlockMask("net.blocks", pattern="1:2", scaling=(50.0, 150.0), log_every_n_steps=1)
    trainer = quick_trainer(tmp_path, max_steps=steps, logger=logger, callbacks=[mask])
    trainer.fit(PlantedModule(planted=[1, 2], depth=4, lr=1e-2), train_dataloaders=index_loader(steps))

    history = mask.decision()["history"]
    assert [record["step"] for record in history] == list(range(steps + 1))
    logged = {step: metrics for step, metrics in logger.metrics.items() if "block_mask/tau" in metrics}
    assert sorted(logged) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        progress = (step - 1) / (steps - 1)  # logged after the step that used it
        metrics = logged[step]
        assert metrics["block_mask/tau"] == pytest.approx(4.0 + (0.1 - 4.0) * progress)
        assert metrics["block_mask/scaling"] == pytest.approx(50.0 + 100.0 * progress)
        previous, current = history[step - 1]["chosen_options"], history[step]["chosen_options"]
        assert metrics["block_mask/decision_changes"] == sum(a != b for a, b in zip(previous, current, strict=True))
        for group in range(2):
            assert metrics[f"block_mask/confidence/group_{group}"] == history[step]["confidences"][group]
            assert metrics[f"block_mask/choice/group_{group}"] == current[group]

    figure = tmp_path / "run" / "decision_dynamics.png"
    assert matplotlib.image.imread(figure).ndim == 3
    assert logger.images == [("block_mask/decision_dynamics", [str(figure)], steps)]
    assert sorted(path.name for path in figure.parent.iterdir()) == ["decision_dynamics.png"]


def test_decision_is_json_and_save_decision_writes_it(tmp_path):
    mask = DifferentiableBlockMask("net.blocks", pattern="2:4", log_every_n_steps=2, plot=False)
    quick_trainer(tmp_path, max_steps=5, callbacks=[mask]).fit(PlantedModule(), train_dataloaders=index_loader(5))
    decision = mask.decision()
    assert json.loads(json.dumps(decision)) == decision
    assert decision["kept_blocks"] == mask.kept_blocks
    assert decision["groups"] == [[2, 4], [2, 4]] and decision["pattern"] == "2:4" and decision["depth"] == 8
    assert sum(decision["group_kept_blocks"], []) == decision["kept_blocks"]
    assert decision["confidences"] == mask.confidences
    assert [record["step"] for record in decision["history"]] == [0, 2, 4, 5]
    assert decision["history"][-1]["chosen_options"] == decision["chosen_options"]

    path = mask.save_decision(tmp_path / "out" / "decision.json")
    assert json.loads(path.read_text()) == decision
    assert [p.name for p in path.parent.iterdir()] == ["decision.json"]


# ---------------------------------------------------------------------------- checkpoints


def run_planted(folder, max_steps, total_steps=None, ckpt_path=None, checkpoint=None):
    L.seed_everything(0)
    module = PlantedModule(train_blocks=True)
    mask = DifferentiableBlockMask("net.blocks", pattern="2:4", total_steps=total_steps, log_every_n_steps=2, plot=False)
    callbacks = [mask] + ([checkpoint] if checkpoint else [])
    trainer = quick_trainer(folder, max_steps=max_steps, callbacks=callbacks, enable_checkpointing=checkpoint is not None)
    trainer.fit(module, train_dataloaders=index_loader(100), ckpt_path=ckpt_path)
    return module, mask


def test_a_resumed_run_ends_exactly_where_the_uninterrupted_run_ends(tmp_path):
    full_module, full = run_planted(tmp_path / "full", max_steps=12)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=6, save_top_k=-1)
    _, first_half = run_planted(tmp_path / "first", max_steps=6, total_steps=12, checkpoint=checkpoint)
    assert not torch.equal(first_half.gates.gate_logits[0], full.gates.gate_logits[0])
    resumed_module, resumed = run_planted(tmp_path / "second", max_steps=12, ckpt_path=checkpoint.best_model_path)

    for a, b in zip(full.gates.gate_logits, resumed.gates.gate_logits, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(full.gates.ema_logits, resumed.gates.ema_logits, strict=True):
        assert torch.equal(a, b)
    assert resumed.kept_blocks == full.kept_blocks
    assert resumed.decision() == full.decision()
    full_weights, resumed_weights = full_module.state_dict(), resumed_module.state_dict()
    assert all(torch.equal(full_weights[name], resumed_weights[name]) for name in full_weights)


def test_load_state_dict_tolerates_missing_keys_and_refuses_other_groups():
    mask = DifferentiableBlockMask("net.blocks", pattern=[[2, 4], [1, 2]])
    mask.load_state_dict({})
    assert mask.kept_blocks == [0, 1, 4]
    ema = [torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0]), torch.tensor([0.0, 1.0])]
    mask.load_state_dict({"ema_logits": ema})
    assert mask.kept_blocks == [2, 3, 5]
    with pytest.raises(ValueError, match=r"has groups \[\(1, 2\)\], but this callback has \[\(2, 4\), \(1, 2\)\]"):
        mask.load_state_dict({"groups": [[1, 2]]})


class SaveDecisionOnEveryRank(Callback):
    """Each rank writes what its own copy of the mask decided (ddp_spawn: defined at module level to pickle)."""

    def __init__(self, folder):
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        mask = next(cb for cb in trainer.callbacks if isinstance(cb, DifferentiableBlockMask))
        mask.save_decision(self.folder / f"rank{trainer.global_rank}.json")
        torch.save([p.detach() for p in mask.gates.gate_logits], self.folder / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_ranks_agree_on_the_decision(tmp_path):
    L.seed_everything(0)
    mask = DifferentiableBlockMask("net.blocks", pattern="2:4", log_every_n_steps=5, plot=False)
    trainer = quick_trainer(
        tmp_path, max_steps=20, strategy="ddp_spawn", devices=2, callbacks=[mask, SaveDecisionOnEveryRank(tmp_path)]
    )
    trainer.fit(PlantedModule(), train_dataloaders=index_loader(40))
    decisions = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    logits = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    assert decisions[0] == decisions[1]
    assert all(torch.equal(a, b) for a, b in zip(*logits, strict=True))
    assert decisions[0]["history"][-1]["confidences"] != decisions[0]["history"][0]["confidences"]
