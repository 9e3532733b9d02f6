"""Every config file composes and instantiates; train.py runs for real."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from tinyfusion_pl.families import family_of

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


def group_options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.mark.parametrize("model", group_options("model"))
def test_every_model_config_builds_its_registry_entry(model):
    cfg = compose_train([f"model={model}", "paths.run_dir=unused"])
    with torch.device("meta"):  # XL-sized entries: shapes only, no memory
        net = instantiate(cfg.model)
    family = family_of(net)
    classes = cfg.model.get("num_classes", cfg.model.get("num_embeds_ada_norm", cfg.model.get("class_num")))
    assert family.num_classes(net) == classes
    assert family.sample_shape(net)[0] == cfg.model.get("in_channels", cfg.model.get("vae_embed_dim"))


@pytest.mark.parametrize("data", group_options("data"))
def test_every_data_config_instantiates(data, tmp_path):
    for folder in ("imagenet256_features", "imagenet256_labels"):
        (tmp_path / folder).mkdir()
    np.save(tmp_path / "imagenet256_features" / "0.npy", np.zeros((2, 4, 32, 32), dtype=np.float32))
    np.save(tmp_path / "imagenet256_labels" / "0.npy", np.array([3]))
    cfg = compose_train([f"data={data}", f"data.root={tmp_path}"] if data == "latents" else [f"data={data}"])
    datamodule = instantiate(cfg.data)
    assert datamodule.batch_size == cfg.data.batch_size


@pytest.mark.parametrize("trainer", group_options("trainer"))
def test_every_trainer_config_instantiates_on_cpu(trainer, tmp_path):
    overrides = [f"trainer={trainer}", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true"]
    if trainer == "fsdp":  # FSDPStrategy needs CUDA; its own test checks the strategy
        overrides.append("trainer.strategy=auto")
    cfg = compose_train(overrides)
    built = instantiate(cfg.trainer, default_root_dir=str(tmp_path), logger=False, max_steps=1)
    assert built.max_steps == 1 and built.gradient_clip_val == 1.0


@pytest.mark.parametrize("logger", group_options("logger"))
def test_every_logger_config_instantiates(logger, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_train([f"logger={logger}"])
    loggers = [instantiate(node, save_dir=str(tmp_path)) for node in (cfg.logger or {}).values()]
    assert len(loggers) == (0 if logger == "none" else 1)


@pytest.mark.parametrize("callbacks", group_options("callbacks"))
def test_every_callbacks_config_instantiates(callbacks):
    cfg = compose_train([f"callbacks={callbacks}"])
    assert all(instantiate(node) is not None for node in (cfg.callbacks or {}).values())


def test_objective_config_follows_the_model():
    cfg = compose_train(["model.learn_sigma=false"])
    assert instantiate(cfg.objective).learn_sigma is False


def run_train(*overrides: str, cache_dir: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, TINYFUSION_CACHE=str(cache_dir), WANDB_MODE="offline", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "train.py", *overrides], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def test_train_py_pretrain_writes_checkpoint_samples_and_metrics(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    result = run_train("stage=pretrain", "pretrain.max_steps=4", "+model.depth=1", "sampling.samples_per_class=1",
                       "sampling.steps=2", "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}",
                       cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = run_dir / "pretrain"
    checkpoint = torch.load(folder / "model.pt", weights_only=False)
    assert {"model", "ema", "config"} <= set(checkpoint)
    assert len({key.split(".")[1] for key in checkpoint["model"] if key.startswith("blocks.")}) == 1
    assert (folder / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert '"conditional_accuracy"' in (folder / "metrics.json").read_text()
    assert not list(folder.glob(".*.tmp")) and not list(folder.glob(".model*"))


def test_run_stage_rejects_an_unknown_stage():
    from tinyfusion_pl.stages import run_stage

    with pytest.raises(ValueError, match="stage='bogus' is not one of"):
        run_stage(compose_train(["stage=bogus", "paths.run_dir=unused"]))


def test_fsdp_config_shards_one_unit_per_block_of_the_family_or_of_named_classes():
    from tinyfusion_pl.models.dit import DiTBlock
    from tinyfusion_pl.strategies import FamilyBlockWrapPolicy

    cfg = compose_train(["trainer=fsdp", "trainer.strategy.activation_checkpointing=true"])
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy.kwargs["auto_wrap_policy"], FamilyBlockWrapPolicy)
    assert isinstance(strategy._activation_checkpointing_kwargs["auto_wrap_policy"], FamilyBlockWrapPolicy)
    cfg = compose_train(["trainer=fsdp", "trainer.strategy.activation_checkpointing=true",
                         "trainer.strategy.wrap_blocks=[tinyfusion_pl.models.dit.DiTBlock]"])
    strategy = instantiate(cfg.trainer.strategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {DiTBlock}
    assert strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {DiTBlock}


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_every_experiment_composes_and_builds_its_model(experiment):
    cfg = compose_train([f"experiment={experiment}", "paths.run_dir=unused"])
    with torch.device("meta"):
        net = instantiate(cfg.model)
    blocks = sum(family_of(net).block_counts(net))
    assert blocks == cfg.model.get("depth", blocks)
    instantiate(cfg.objective)
