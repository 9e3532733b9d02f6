"""CoOptimizedWeightUpdate inside a real Lightning Trainer: what trains, what the model looks like afterwards, resume."""

import lightning as L
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from tinyfusion_pl.callbacks.block_mask import DifferentiableBlockMask
from tinyfusion_pl.callbacks.weight_update import CoOptimizedWeightUpdate
from tinyfusion_pl.models import DiT, SiT
from tinyfusion_pl.objectives import FlowMatching, GaussianDiffusion
from tinyfusion_pl.pruning.export import prune_blocks
from tinyfusion_pl.pruning.lora import LoRALinear

WIDTH = 8


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.fc1 = nn.Linear(WIDTH, 2 * WIDTH)
        self.fc2 = nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, x):
        return x + self.fc2(torch.tanh(self.fc1(self.norm(x))))


class Net(nn.Module):
    def __init__(self, depth: int = 3):
        super().__init__()
        self.embed = nn.Linear(3, WIDTH)
        self.blocks = nn.ModuleList(Block() for _ in range(depth))
        self.head = nn.Linear(WIDTH, 1)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class Regression(L.LightningModule):
    """A user's own module: MSE regression, AdamW over self.parameters() (filtered or not)."""

    def __init__(self, filter_trainable: bool = False, optimize: str = "all", depth: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.net = Net(depth).double()
        self.filter_trainable = filter_trainable
        self.optimize = optimize
        # Stands in for the block gates, which live outside the model (needed with method="frozen").
        self.outside_parameters = [nn.Parameter(torch.zeros(1, dtype=torch.float64))]

    def training_step(self, batch, batch_index):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y) + 0 * self.outside_parameters[0].sum()
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        parameters = list(self.net.head.parameters()) if self.optimize == "head" else list(self.parameters())
        if self.filter_trainable:
            parameters = [p for p in parameters if p.requires_grad]
        return torch.optim.AdamW(parameters + self.outside_parameters, lr=3e-2, weight_decay=0.01)


def regression_data(batches_per_epoch: int = 3) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8 * batches_per_epoch, 3, generator=generator, dtype=torch.float64)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


class Probe(L.Callback):
    """Records what the model looks like while training runs (before the weight update is taken out)."""

    def on_train_start(self, trainer, pl_module):
        self.block_linear_types = {
            name: type(module) for name, module in pl_module.net.blocks.named_modules() if name.count(".") == 1
        }
        self.trainable = [name for name, p in pl_module.named_parameters() if p.requires_grad]
        self.optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}

    def on_train_end(self, trainer, pl_module):
        self.parameters_at_end = {name: p.detach().clone() for name, p in pl_module.named_parameters()}
        self.gradients_at_end = {name: p.grad for name, p in pl_module.named_parameters()}
        self.optimizer_state = {id(p) for p in trainer.optimizers[0].state}
        self.named_ids = {id(p): name for name, p in pl_module.named_parameters()}


def fit(module, callbacks, max_steps=6, ckpt_path=None, enable_checkpointing=False, batches_per_epoch=3):
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=enable_checkpointing,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module, train_dataloaders=regression_data(batches_per_epoch), ckpt_path=ckpt_path)
    return trainer


def snapshot(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def mean_loss(module):
    x, y = regression_data().dataset.tensors
    with torch.no_grad():
        return nn.functional.mse_loss(module.net(x), y).item()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "qlora"}, r"method='qlora' is not one of \['lora', 'full', 'frozen'\]"),
        ({"blocks": ""}, r"blocks='' must be the dotted path to the block container, e.g. 'net.blocks'"),
        ({"merge": "yes"}, r"merge='yes' must be True or False"),
        ({"method": "frozen", "merge": True}, r"merge=True has nothing to merge with method='frozen'"),
        ({"rank": 0}, r"rank=0 must be an integer >= 1"),
        ({"alpha": -1.0}, r"alpha=-1.0 must be a number > 0"),
        ({"dropout": 1.5}, r"dropout=1.5 must be a probability in \[0, 1\)"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CoOptimizedWeightUpdate(**kwargs)


def test_every_bad_argument_is_reported_at_once():
    with pytest.raises(ValueError, match=r"method='x' .*; merge=1 .*; rank=0 .*; dropout=-1"):
        CoOptimizedWeightUpdate(method="x", merge=1, rank=0, dropout=-1)


def test_a_wrong_blocks_path_is_refused_in_setup_and_leaves_the_model_alone():
    module = Regression()
    with pytest.raises(ValueError, match=r"blocks='net.layers' does not resolve .*'net.blocks' \(3 blocks\)"):
        fit(module, [CoOptimizedWeightUpdate(blocks="net.layers")])
    assert all(p.requires_grad for p in module.parameters())


@pytest.mark.parametrize("filter_trainable", [False, True])
def test_lora_trains_only_adapters_and_gives_back_the_original_model(filter_trainable):
    module = Regression(filter_trainable=filter_trainable)
    module.net.embed.bias.requires_grad_(False)
    before = snapshot(module)
    flags = {name: p.requires_grad for name, p in module.named_parameters()}
    linears = {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear)}
    probe = Probe()

    fit(module, [CoOptimizedWeightUpdate(method="lora", rank=2, alpha=4, blocks="net.blocks"), probe])

    # While training: every Linear of the blocks wrapped, only adapters trainable and optimized.
    assert set(probe.block_linear_types) == {f"{i}.{layer}" for i in range(3) for layer in ("norm", "fc1", "fc2")}
    assert all(t is LoRALinear for name, t in probe.block_linear_types.items() if "fc" in name)
    assert probe.trainable == [f"net.blocks.{i}.{fc}.{ab}.weight" for i in range(3) for fc in ("fc1", "fc2") for ab in ("lora_a", "lora_b")]
    adapters = {name for name in probe.trainable}
    assert {probe.named_ids[i] for i in probe.optimized if i in probe.named_ids} >= adapters
    # Frozen weights really cost nothing: no gradient, no optimizer state.
    assert all(probe.gradients_at_end[name] is None for name in probe.gradients_at_end if name not in adapters)
    assert {probe.named_ids[i] for i in probe.optimizer_state if i in probe.named_ids} == adapters
    assert torch.count_nonzero(probe.parameters_at_end["net.blocks.1.fc2.lora_b.weight"]) > 0

    # Afterwards: the same plain Linear objects, bit-identical weights, the user's flags.
    assert all(module.get_submodule(name) is linear for name, linear in linears.items())
    assert not any(isinstance(m, LoRALinear) for m in module.modules())
    after = snapshot(module)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)
    assert {name: p.requires_grad for name, p in module.named_parameters()} == flags


def test_lora_alone_fine_tunes_a_model_and_merge_keeps_the_update():
    module = Regression()
    before = snapshot(module)
    loss_before = mean_loss(module)
    probe = Probe()

    fit(module, [CoOptimizedWeightUpdate(rank=2, alpha=4, blocks="net.blocks", merge=True), probe], max_steps=30)

    assert mean_loss(module) < 0.7 * loss_before
    end = probe.parameters_at_end
    for i in range(3):
        for fc in ("fc1", "fc2"):
            prefix = f"net.blocks.{i}.{fc}"
            expected = before[f"{prefix}.weight"] + 2.0 * end[f"{prefix}.lora_b.weight"] @ end[f"{prefix}.lora_a.weight"]
            torch.testing.assert_close(module.get_parameter(f"{prefix}.weight"), expected)
            assert torch.equal(module.get_parameter(f"{prefix}.bias"), before[f"{prefix}.bias"])
    for name in ("net.embed.weight", "net.head.weight", "net.blocks.0.norm.weight"):
        assert torch.equal(module.get_parameter(name), before[name])


def test_full_trains_the_blocks_and_by_default_restores_the_original_weights():
    module = Regression()
    module.net.head.requires_grad_(False)
    before = snapshot(module)
    probe = Probe()

    fit(module, [CoOptimizedWeightUpdate(method="full", blocks="net.blocks"), probe])

    block_names = [name for name in before if name.startswith("net.blocks.")]
    assert probe.trainable == ["net.embed.weight", "net.embed.bias", *block_names]
    assert not torch.equal(probe.parameters_at_end["net.blocks.0.fc1.weight"], before["net.blocks.0.fc1.weight"])
    after = snapshot(module)
    assert all(torch.equal(after[name], before[name]) for name in before)
    assert not module.net.head.weight.requires_grad and module.net.blocks[0].fc1.weight.requires_grad


def test_full_with_merge_keeps_the_trained_weights():
    module = Regression()
    probe = Probe()
    fit(module, [CoOptimizedWeightUpdate(method="full", blocks="net.blocks", merge=True), probe])
    after = snapshot(module)
    assert all(torch.equal(after[name], probe.parameters_at_end[name]) for name in after)


def test_frozen_trains_nothing_of_the_model():
    module = Regression()
    before = snapshot(module)
    probe = Probe()
    fit(module, [CoOptimizedWeightUpdate(method="frozen", blocks="net.blocks"), probe])
    assert probe.trainable == []
    assert all(torch.equal(probe.parameters_at_end[name], before[name]) for name in before)
    assert all(p.requires_grad for p in module.parameters())


def test_an_optimizer_without_the_adapters_is_refused_and_the_model_restored():
    module = Regression(optimize="head")
    before = snapshot(module)
    with pytest.raises(ValueError, match=r"optimizer does not hold 12 trainable parameters of 'net.blocks'.*self.parameters\(\)"):
        fit(module, [CoOptimizedWeightUpdate(rank=2, blocks="net.blocks")])
    assert not any(isinstance(m, LoRALinear) for m in module.modules())
    assert all(p.requires_grad for p in module.parameters())
    assert all(torch.equal(p, before[name]) for name, p in module.named_parameters())


def test_validate_alone_does_not_wrap_anything():
    module = Regression()
    module.validation_step = module.training_step
    callback = CoOptimizedWeightUpdate()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    trainer.validate(module, dataloaders=regression_data())
    assert callback.wrapped_layers == [] and not any(isinstance(m, LoRALinear) for m in module.modules())


def test_a_resumed_run_ends_with_the_adapters_of_an_uninterrupted_run(tmp_path):
    # One batch per epoch: every step sees the same data, however Lightning re-enters the epoch loop.
    def run(probe, max_steps, ckpt_path=None):
        checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / str(max_steps), every_n_train_steps=3, save_top_k=-1)
        callbacks = [CoOptimizedWeightUpdate(rank=2, alpha=4, blocks="net.blocks"), probe, checkpoints]
        fit(Regression(), callbacks, max_steps, ckpt_path, enable_checkpointing=True, batches_per_epoch=1)

    uninterrupted, stopped, resumed = Probe(), Probe(), Probe()
    run(uninterrupted, max_steps=6)
    run(stopped, max_steps=3)
    torch.manual_seed(123)  # fresh adapters start elsewhere; the checkpoint must bring them back
    run(resumed, max_steps=6, ckpt_path=tmp_path / "3" / "epoch=2-step=3.ckpt")

    adapters = [name for name in uninterrupted.parameters_at_end if "lora_" in name]
    assert len(adapters) == 12
    for name in adapters:
        torch.testing.assert_close(resumed.parameters_at_end[name], uninterrupted.parameters_at_end[name], rtol=0, atol=1e-12)
    halfway = stopped.parameters_at_end["net.blocks.0.fc1.lora_b.weight"]
    assert not torch.equal(halfway, uninterrupted.parameters_at_end["net.blocks.0.fc1.lora_b.weight"])


def test_state_dict_round_trip_and_a_mismatched_checkpoint():
    saved = CoOptimizedWeightUpdate(rank=4, alpha=8).state_dict()
    CoOptimizedWeightUpdate(rank=4, alpha=8).load_state_dict(saved)
    CoOptimizedWeightUpdate(rank=4, alpha=8).load_state_dict({})
    with pytest.raises(ValueError, match=r"trained with CoOptimizedWeightUpdate\(.*'alpha': 8.*this run uses .*'alpha': 16"):
        CoOptimizedWeightUpdate(rank=4, alpha=16).load_state_dict(saved)


# The two user setups: a DiT with DiT's Gaussian diffusion, a SiT with SiT's flow matching.
DENOISERS = {"dit": (DiT, GaussianDiffusion), "sit": (SiT, FlowMatching)}


class DenoiserModule(L.LightningModule):
    """A hand-built user module: a tiny DiT or SiT trained with its own objective, blocks at `denoiser.blocks`."""

    def __init__(self, kind: str = "dit"):
        super().__init__()
        torch.manual_seed(0)
        model_class, objective_class = DENOISERS[kind]
        self.denoiser = model_class(input_size=4, patch_size=2, in_channels=2, hidden_size=16, depth=4, num_heads=2,
                                    num_classes=3)
        with torch.no_grad():  # adaLN-Zero starts every block as the identity; random weights make them matter
            for parameter in self.denoiser.parameters():
                parameter.copy_(0.3 * torch.randn_like(parameter))
        self.objective = objective_class()

    def training_step(self, batch, batch_index):
        x, y = batch
        t = self.objective.sample_timesteps(x.shape[0], x.device)  # long steps (DiT) or float times (SiT)
        return self.objective.training_losses(self.denoiser, x, t, model_kwargs={"y": y})["loss"].mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.0)


def latent_data() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 2, 4, 4, generator=generator)
    y = torch.randint(0, 3, (16,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=8)


class TrainingRecord(L.Callback):
    """What the optimizer holds and what moved, read just before the callbacks take their changes back out."""

    def __init__(self, mask):
        self.mask = mask

    def on_fit_start(self, trainer, pl_module):
        self.initial_gate_logits = [logits.detach().clone() for logits in self.mask.gates.gate_logits]

    def on_train_end(self, trainer, pl_module):
        names = {id(p): name for name, p in pl_module.named_parameters()}
        gate_ids = {id(p) for p in self.mask.gates.gate_logits}
        stepped = [p for p in trainer.optimizers[0].state]
        self.stepped_model_parameters = sorted(names[id(p)] for p in stepped if id(p) in names)
        self.stepped_gates = sum(id(p) in gate_ids for p in stepped)
        self.gate_logits = [logits.detach().clone() for logits in self.mask.gates.gate_logits]
        self.adapters = {name: p.detach().clone() for name, p in pl_module.named_parameters() if "lora_" in name}
        # Exporting while the gate hooks and the adapters are still in place.
        self.export_during_fit = prune_blocks(pl_module.denoiser, blocks="blocks", keep=self.mask.kept_blocks)


@pytest.mark.parametrize("kind,method", [("dit", "lora"), ("dit", "frozen"), ("sit", "lora")])
def test_with_the_block_mask_only_gates_and_adapters_learn_and_the_export_has_the_original_weights(kind, method):
    torch.manual_seed(0)
    module = DenoiserModule(kind)
    model_class = DENOISERS[kind][0]
    before = snapshot(module)
    mask = DifferentiableBlockMask(blocks="denoiser.blocks", pattern="1:2", plot=False)
    record = TrainingRecord(mask)
    update = CoOptimizedWeightUpdate(method=method, **({"rank": 2} if method == "lora" else {}))  # the mask's blocks
    trainer = L.Trainer(
        max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[mask, update, record],
    )
    trainer.fit(module, train_dataloaders=latent_data())

    expected_adapters = sorted(
        f"denoiser.blocks.{i}.{layer}.{ab}.weight"
        for i in range(4)
        for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")
        for ab in ("lora_a", "lora_b")
    )
    assert record.stepped_model_parameters == (expected_adapters if method == "lora" else [])
    assert record.stepped_gates == 2
    assert all(not torch.equal(a, b) for a, b in zip(record.initial_gate_logits, record.gate_logits, strict=True))
    if method == "lora":
        assert all(torch.count_nonzero(record.adapters[name]) for name in expected_adapters if "lora_b" in name)

    # The model is back as it was: original weights, plain Linears, no hooks.
    after = snapshot(module)
    assert all(torch.equal(after[name], before[name]) for name in before)
    assert not any(isinstance(m, LoRALinear) for m in module.modules())
    assert not any(block._forward_hooks for block in module.denoiser.blocks)

    kept = mask.kept_blocks
    assert len(kept) == 2 and kept[0] in (0, 1) and kept[1] in (2, 3)
    shallow = prune_blocks(module.denoiser, blocks="blocks", keep=kept)
    assert type(shallow) is model_class
    reference = model_class(input_size=4, patch_size=2, in_channels=2, hidden_size=16, depth=2, num_heads=2,
                            num_classes=3)
    reference.load_state_dict(shallow.state_dict(), strict=True)
    for new_index, old_index in enumerate(kept):
        assert torch.equal(shallow.blocks[new_index].mlp.fc1.weight, before[f"denoiser.blocks.{old_index}.mlp.fc1.weight"])

    during_fit = record.export_during_fit
    assert not any(isinstance(m, LoRALinear) for m in during_fit.modules())
    assert not any(m._forward_hooks for m in during_fit.modules())
    reference.load_state_dict(during_fit.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(during_fit.state_dict().values(), shallow.state_dict().values(), strict=True))
