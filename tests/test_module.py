"""DiffusionModule: training lowers the loss, EMA follows the weights, sampling, checkpoints, bad input."""

import lightning as L
import pytest
import torch
import torch.nn as nn
from lightning.pytorch.loggers import CSVLogger

from tests.conftest import quick_trainer, tiny_dit
from tinyfusion_pl.data import DigitsDataModule
from tinyfusion_pl.evaluation.sampling import batch_seed
from tinyfusion_pl.module import DiffusionModule, load_weights
from tinyfusion_pl.objectives import GaussianDiffusion


def fixed_loss(module: DiffusionModule, batch) -> float:
    """The diffusion loss on fixed timesteps and noise, so two evaluations are comparable."""
    with torch.no_grad():
        module.net.eval()
        loss = module.diffusion_terms(batch, generator=torch.Generator().manual_seed(1))["loss"].mean().item()
        module.net.train()
    return loss


def test_a_few_training_steps_lower_the_loss(tmp_path):
    L.seed_everything(0)
    datamodule = DigitsDataModule(batch_size=64)
    datamodule.setup()
    batch = next(iter(datamodule.val_dataloader()))
    module = DiffusionModule(tiny_dit(), lr=1e-3, ema_decay=None)
    before = fixed_loss(module, batch)
    logger = CSVLogger(tmp_path, name="logs")
    quick_trainer(tmp_path, max_steps=60, logger=logger, log_every_n_steps=5).fit(module, datamodule=datamodule)
    after = fixed_loss(module, batch)
    assert after < 0.7 * before
    header = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "train/mse", "train/vb", "train/samples_per_s"} <= set(header)


class RecordWeights(L.Callback):
    def __init__(self):
        self.history = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.history.append({k: v.detach().clone() for k, v in pl_module.net.state_dict().items()})


def test_ema_is_the_exponential_average_of_the_weights_after_each_step(tmp_path):
    decay = 0.6
    module = DiffusionModule(tiny_dit(depth=1), lr=1e-2, ema_decay=decay)
    recorder = RecordWeights()
    quick_trainer(tmp_path, max_steps=4, callbacks=[recorder]).fit(module, datamodule=DigitsDataModule(batch_size=16))
    # callbacks run before the module's on_train_batch_end, so history[k] holds the weights averaged at step k
    expected = recorder.history[0]
    for weights in recorder.history[1:]:
        expected = {k: decay * expected[k] + (1 - decay) * weights[k] if weights[k].is_floating_point() else weights[k]
                    for k in weights}
    for name, value in module.ema.module.state_dict().items():
        torch.testing.assert_close(value, expected[name], msg=name)
    assert not any(p.requires_grad for p in module.ema.parameters())


def test_sample_uses_ema_weights_with_cfg_and_restores_train_mode():
    torch.manual_seed(0)
    module = DiffusionModule(tiny_dit(), ema_decay=0.9)
    with torch.no_grad():
        for p in module.ema.module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    labels = torch.tensor([0, 3, 7])
    module.net.train()
    kwargs = dict(steps=5, method="ddim", cfg_scale=2.0)
    ema_samples = module.sample(labels, seed=0, **kwargs)
    again = module.sample(labels, seed=0, **kwargs)
    raw_samples = module.sample(labels, use_ema=False, seed=0, **kwargs)
    assert ema_samples.shape == (3, 1, 8, 8)
    torch.testing.assert_close(ema_samples, again)  # eval mode: no random label drops
    assert not torch.allclose(ema_samples, raw_samples)
    assert module.net.training


def test_sample_equals_the_objective_sampler_on_the_ema_net():
    module = DiffusionModule(tiny_dit(), ema_decay=0.9)
    labels = torch.tensor([1, 2])
    samples = module.sample(labels, steps=4, method="ddim", seed=3)
    generator = torch.Generator().manual_seed(batch_seed(3, 0))  # the stream of the batch that starts at image 0
    noise = torch.randn(2, 1, 8, 8, generator=generator)
    net = module.ema.module.eval()
    expected = GaussianDiffusion().sample(net, noise, model_kwargs={"y": labels}, steps=4, method="ddim",
                                          generator=generator)
    torch.testing.assert_close(samples, expected)


def test_init_checkpoint_accepts_reference_and_lightning_layouts(tmp_path):
    module = DiffusionModule(tiny_dit(), ema_decay=0.9)
    with torch.no_grad():
        for p in module.ema.module.parameters():
            p.add_(1.0)
    reference = {"model": module.net.state_dict(), "ema": module.ema.module.state_dict()}
    torch.save(reference, tmp_path / "reference.pt")
    from_ema = DiffusionModule(tiny_dit(), init_checkpoint=str(tmp_path / "reference.pt"))
    from_model = DiffusionModule(tiny_dit(), init_checkpoint=str(tmp_path / "reference.pt"), init_from="model")
    for name, value in module.ema.module.state_dict().items():
        torch.testing.assert_close(from_ema.net.state_dict()[name], value)
        torch.testing.assert_close(from_model.net.state_dict()[name], module.net.state_dict()[name])
    lightning_checkpoint = {"state_dict": module.state_dict()}
    plain = tiny_dit()
    load_weights(plain, lightning_checkpoint)
    for name, value in module.ema.module.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[name], value)


def test_ema_refuses_a_net_whose_structure_changed(tmp_path):
    module = DiffusionModule(tiny_dit(depth=1), ema_decay=0.9)
    module.net.blocks[0].attn.extra = nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="ema_decay=None for pruning runs"):
        quick_trainer(tmp_path, max_steps=1).fit(module, datamodule=DigitsDataModule(batch_size=8))


class NaNOnSecondStep(nn.Module):
    """Wraps a DiT and poisons its output on the second training call."""

    def __init__(self):
        super().__init__()
        self.dit = tiny_dit(depth=1)
        self.calls = 0

    def forward(self, x, t, y):
        self.calls += 1
        out = self.dit(x, t, y)
        return out * float("nan") if self.calls == 2 else out


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    module = DiffusionModule(NaNOnSecondStep(), ema_decay=None, skip_nonfinite_steps=True, lr=1e-2)
    quick_trainer(tmp_path, max_steps=3).fit(module, datamodule=DigitsDataModule(batch_size=8))
    assert module.nonfinite_steps == 1
    assert all(torch.isfinite(p).all() for p in module.net.parameters())


class AlwaysNaN(nn.Module):
    """A DiT whose every output is NaN: a run that has diverged for good."""

    def __init__(self):
        super().__init__()
        self.dit = tiny_dit(depth=1)

    def forward(self, x, t, y):
        return self.dit(x, t, y) * float("nan")


@pytest.mark.parametrize("max_steps", [3, 30])  # judged at the end of a short run, after 10 steps of a long one
def test_a_run_of_mostly_nonfinite_steps_stops_naming_the_likely_causes(tmp_path, max_steps):
    module = DiffusionModule(AlwaysNaN(), ema_decay=None, skip_nonfinite_steps=True, lr=1e-2)
    with pytest.raises(RuntimeError, match=r"training steps had a non-finite loss .* learning rate \(lr=0.01\) is "
                                           r"too high.*precision \(32-true\)"):
        quick_trainer(tmp_path, max_steps=max_steps).fit(module, datamodule=DigitsDataModule(batch_size=8))
    assert module.nonfinite_steps == min(max_steps, 10) == module.attempted_steps


def test_max_nonfinite_fraction_is_checked():
    with pytest.raises(ValueError, match=r"max_nonfinite_fraction=1.5 must be a number in \[0, 1\]"):
        DiffusionModule(tiny_dit(depth=1), max_nonfinite_fraction=1.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"lr": 0.0}, "lr=0.0 must be > 0"), ({"lr_schedule": "step"}, "lr_schedule='step' is not one of"),
     ({"ema_decay": 1.0}, r"ema_decay=1.0 must be in \[0, 1\)"), ({"init_from": "best"}, "init_from='best'")],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DiffusionModule(tiny_dit(depth=1), **kwargs)


def test_cosine_schedule_decays_to_min_lr(tmp_path):
    module = DiffusionModule(tiny_dit(depth=1), lr=2e-4, min_lr=1e-4, lr_schedule="cosine", ema_decay=None)
    trainer = quick_trainer(tmp_path, max_steps=10)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=8))
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-4)


def test_the_count_of_skipped_steps_goes_on_after_a_resume():
    module = DiffusionModule(tiny_dit(depth=1), ema_decay=None, skip_nonfinite_steps=True)
    module.nonfinite_steps, module.attempted_steps = 3, 40
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    resumed = DiffusionModule(tiny_dit(depth=1), ema_decay=None, skip_nonfinite_steps=True)
    resumed.on_load_checkpoint(checkpoint)
    assert (resumed.nonfinite_steps, resumed.attempted_steps) == (3, 40)  # 3 of 40 is no divergence to stop at
    resumed.on_load_checkpoint({})  # a checkpoint from before the count was saved
    assert resumed.nonfinite_steps == 0
