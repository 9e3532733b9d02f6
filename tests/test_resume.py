"""Resume after a crash: `python train.py stage=<stage>` killed with SIGKILL and resumed with `<stage>.resume_from=auto`
ends exactly where an uninterrupted run ends; a stage's outputs are one set that later stages check."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tinyfusion_pl.callbacks.random_state import random_state, set_random_state
from tinyfusion_pl.io import begin_output_set
from tinyfusion_pl.stages import run_stage
from tinyfusion_pl.stages.evaluate import pruned_checkpoint

REPO = Path(__file__).resolve().parents[1]

# The embedded default shrunk to seconds: 64 images a batch are 25 steps an epoch, so a run of 40 steps killed at
# its first checkpoint (step 10) resumes in the middle of an epoch and crosses into the next, where validation runs.
SHRUNK = ["++model.depth=4", "data.batch_size=64", "pretrain.max_steps=40", "pruning.max_steps=40",
          "recover.max_steps=40", "pruning.calibration_batches=1", "recover.calibration_batches=1",
          "sampling.samples_per_class=0", "logger=none", "++trainer.enable_progress_bar=false",
          "++trainer.check_val_every_n_epoch=1", "callbacks.checkpoint.every_n_train_steps=10"]


def train_command(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "train.py", *SHRUNK, f"hydra.run.dir={run_dir}", *overrides]


def environment(cache_dir: Path) -> dict[str, str]:
    return dict(os.environ, TINYFUSION_CACHE=str(cache_dir), WANDB_MODE="offline", OMP_NUM_THREADS="1",
                PYTHONPATH=str(REPO))


def run_train(command: list[str], cache_dir: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, env=environment(cache_dir), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def kill_at_first_checkpoint(command: list[str], checkpoint: Path, cache_dir: Path) -> int:
    """Start train.py, SIGKILL it (and the ranks it launched) as soon as its first periodic checkpoint exists;
    the checkpoint's step."""
    process = subprocess.Popen(command, cwd=REPO, env=environment(cache_dir), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.killpg(process.pid, signal.SIGKILL)  # its own session: train.py and every rank it started
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL, "train.py ended before it could be killed in the middle"
    return lightning_state(checkpoint)["global_step"]


def lightning_state(path: Path) -> dict:
    """A Lightning checkpoint as one dict; a sharded one (trainer=fsdp2: a folder) with its shards gathered."""
    if not path.is_dir():
        return torch.load(path, map_location="cpu", weights_only=False)
    with tempfile.TemporaryDirectory() as folder:
        dcp_to_torch_save(path, Path(folder) / "whole.pt")
        gathered = torch.load(Path(folder) / "whole.pt", map_location="cpu", weights_only=False)
    return {**torch.load(path / "meta.pt", map_location="cpu", weights_only=False), **gathered}


def assert_same_tensors(a, b) -> None:
    """Nested dicts/lists of tensors and plain values, equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_tensors(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_tensors(x, y)
    else:
        assert a == b


def kill_and_resume(tmp_path: Path, cache_dir: Path, stage: str, option: str, *overrides: str) -> tuple[Path, Path]:
    """An uninterrupted run and a run killed at its first checkpoint then resumed with option=auto."""
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    run_train(train_command(uninterrupted, f"stage={stage}", *overrides), cache_dir)
    folder = {"pruning": "prune"}.get(option.split(".")[0], option.split(".")[0])
    step = kill_at_first_checkpoint(train_command(resumed, f"stage={stage}", *overrides),
                                    resumed / folder / "checkpoints" / "last.ckpt", cache_dir)
    assert step == 10
    assert not (resumed / folder / "manifest.json").exists()  # nothing of the stage's outputs was written
    run_train(train_command(resumed, f"stage={stage}", f"{option}=auto", *overrides), cache_dir)
    return uninterrupted / folder, resumed / folder


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.slow
def test_a_prune_killed_mid_run_and_resumed_ends_as_an_uninterrupted_one(tmp_path, cache_dir):
    uninterrupted, resumed = kill_and_resume(tmp_path, cache_dir, "prune", "pruning.resume_from")
    assert json.loads((resumed / "decision.json").read_text()) == json.loads((uninterrupted / "decision.json").read_text())
    final, final_resumed = (lightning_state(folder / "checkpoints" / "last.ckpt") for folder in (uninterrupted, resumed))
    assert final["global_step"] == final_resumed["global_step"] == 40
    mask_key = next(key for key in final["callbacks"] if key.startswith("DifferentiableBlockMask"))
    for name in ("gate_logits", "ema_logits", "history", "draws"):  # the gates and their EMA, bit for bit
        assert_same_tensors(final["callbacks"][mask_key][name], final_resumed["callbacks"][mask_key][name])
    lora = [name for name in final["state_dict"] if "lora_" in name]
    assert lora and all(torch.equal(final["state_dict"][name], final_resumed["state_dict"][name]) for name in lora)
    assert_same_tensors(final["state_dict"], final_resumed["state_dict"])
    assert_same_tensors(final["optimizer_states"], final_resumed["optimizer_states"])
    assert_same_tensors(lightning_state(uninterrupted / "pruned.pt"), lightning_state(resumed / "pruned.pt"))


# The other architectures' embedded defaults at the same size (MAR: 2 encoder + 2 decoder blocks; diffusers' DiT
# and SD3 through their adapters).
OTHER_FAMILIES = {"sit_digits": ["experiment=sit_digits"],
                  "mar_digits": ["experiment=mar_digits", "~model.depth", "++model.encoder_depth=2",
                                 "++model.decoder_depth=2"],
                  "diffusers_digits": ["experiment=diffusers_digits"],  # diffusers' DiT, class-conditional
                  "diffusers_sd3_digits": ["experiment=diffusers_sd3_digits"]}  # SD3 on stand-in captions


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(OTHER_FAMILIES))
def test_a_prune_of_another_family_killed_and_resumed_ends_as_an_uninterrupted_one(tmp_path, cache_dir, family):
    # SiT draws float times for flow matching; MAR draws orders, masks and its diffusion head's times and noise.
    uninterrupted, resumed = kill_and_resume(tmp_path, cache_dir, "prune", "pruning.resume_from",
                                             *OTHER_FAMILIES[family])
    assert json.loads((resumed / "decision.json").read_text()) == json.loads((uninterrupted / "decision.json").read_text())
    final, final_resumed = (lightning_state(folder / "checkpoints" / "last.ckpt") for folder in (uninterrupted, resumed))
    assert final["global_step"] == final_resumed["global_step"] == 40
    states, resumed_states = ({key: value for key, value in checkpoint["callbacks"].items()  # not its folder
                               if not key.startswith("ModelCheckpoint")} for checkpoint in (final, final_resumed))
    assert_same_tensors(states, resumed_states)  # gates, their EMA and history, every rank's random state
    assert_same_tensors(final["state_dict"], final_resumed["state_dict"])
    assert_same_tensors(final["optimizer_states"], final_resumed["optimizer_states"])


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_a_prune_on_two_ranks_killed_mid_run_and_resumed_ends_as_an_uninterrupted_one(tmp_path, cache_dir, strategy):
    # Two CPU ranks (gloo): the checkpoint holds each rank's random state, gathered from both. fsdp2 writes a
    # folder of shards; the gate group's optimizer state, which its sharded optimizer state cannot hold, is the
    # mask's to keep.
    ranks = [f"trainer={strategy}", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
    uninterrupted, resumed = kill_and_resume(tmp_path, cache_dir, "prune", "pruning.resume_from", *ranks)
    assert json.loads((resumed / "decision.json").read_text()) == json.loads((uninterrupted / "decision.json").read_text())
    final, final_resumed = (lightning_state(folder / "checkpoints" / "last.ckpt") for folder in (uninterrupted, resumed))
    assert (uninterrupted / "checkpoints" / "last.ckpt").is_dir() == (strategy == "fsdp2")
    assert len(final["callbacks"]["RandomStateCheckpoint"]["ranks"]) == 2
    states, resumed_states = ({key: value for key, value in checkpoint["callbacks"].items()
                               if not key.startswith("ModelCheckpoint")} for checkpoint in (final, final_resumed))
    mask_key = next(key for key in states if key.startswith("DifferentiableBlockMask"))
    assert all(state["exp_avg_sq"].abs().sum() > 0 for state in states[mask_key]["gate_optimizer_state"])
    assert_same_tensors(states, resumed_states)
    assert_same_tensors(final["state_dict"], final_resumed["state_dict"])
    optimizer = "optimizer_0" if strategy == "fsdp2" else "optimizer_states"
    assert_same_tensors(final[optimizer], final_resumed[optimizer])
    assert_same_tensors(lightning_state(uninterrupted / "pruned.pt"), lightning_state(resumed / "pruned.pt"))
    assert not list(resumed.rglob(".*.partial-*"))


@pytest.mark.slow
def test_a_recovery_killed_mid_run_and_resumed_ends_as_an_uninterrupted_one(tmp_path, cache_dir):
    pruned = tmp_path / "pruned"
    run_train(train_command(pruned, "stage=prune"), cache_dir)
    uninterrupted, resumed = kill_and_resume(tmp_path, cache_dir, "recover", "recover.resume_from",
                                             f"recover.pruned={pruned / 'prune'}")
    final, final_resumed = (torch.load(folder / "model.pt", weights_only=False) for folder in (uninterrupted, resumed))
    assert_same_tensors(final["model"], final_resumed["model"])
    assert_same_tensors(final["ema"], final_resumed["ema"])
    metrics = [json.loads((folder / "metrics.json").read_text()) for folder in (uninterrupted, resumed)]
    assert metrics[0]["calibration_loss"] == metrics[1]["calibration_loss"] and metrics[1]["steps"] == 40


@pytest.mark.slow
def test_a_pretraining_killed_mid_run_and_resumed_ends_as_an_uninterrupted_one(tmp_path, tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("pretrain_cache")  # each run pretrains: no teacher to reuse
    uninterrupted, resumed = kill_and_resume(tmp_path, cache_dir, "pretrain", "pretrain.resume_from")
    final, final_resumed = (torch.load(folder / "model.pt", weights_only=False) for folder in (uninterrupted, resumed))
    assert_same_tensors(final["model"], final_resumed["model"])
    assert_same_tensors(final["ema"], final_resumed["ema"])


# ---------------------------------------------------------------------------------------- fast checks, in process


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def tiny(run_dir: Path, cache_dir: Path, *extra: str):
    return compose_train([f"paths.run_dir={run_dir}", f"paths.cache_dir={cache_dir}", "+model.depth=4",
                          "data.batch_size=16", "pretrain.max_steps=20", "sampling.samples_per_class=0",
                          "logger=none", "trainer.enable_progress_bar=false", *extra])


class CrashAfterStep(L.Callback):
    """Raises once the Trainer has taken `step` steps: a crash in the middle of a run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("crash")


def test_the_shipped_checkpoint_interval_fires_inside_every_default_run():
    for experiment in ([], ["experiment=tinydit_d14"]):
        cfg = compose_train(["paths.run_dir=unused", *experiment])
        interval = cfg.callbacks.checkpoint.every_n_train_steps
        assert 0 < interval < min(cfg.pruning.max_steps, cfg.recover.max_steps, cfg.pretrain.max_steps)


def test_the_random_state_comes_back_from_a_weights_only_load(tmp_path):
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    torch.save({"ranks": [random_state()]}, tmp_path / "state.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    set_random_state(torch.load(tmp_path / "state.pt", weights_only=True)["ranks"][0])
    assert torch.equal(torch.rand(3), expected[0]) and (np.random.rand(3) == expected[1]).all()
    assert random.random() == expected[2]


def test_a_crashed_prune_resumed_with_auto_ends_as_an_uninterrupted_one(tmp_path, cache_dir):
    shrunk = ["stage=prune", "pruning.max_steps=6", "callbacks.checkpoint.every_n_train_steps=2",
              "pruning.calibration_batches=1"]
    run_stage(tiny(tmp_path / "whole", cache_dir, *shrunk))
    crash = ["+callbacks.crash._target_=tests.test_resume.CrashAfterStep", "+callbacks.crash.step=3"]
    with pytest.raises(RuntimeError, match="crash"):
        run_stage(tiny(tmp_path / "crashed", cache_dir, *shrunk, *crash))
    assert lightning_state(tmp_path / "crashed" / "prune" / "checkpoints" / "last.ckpt")["global_step"] == 2
    run_stage(tiny(tmp_path / "crashed", cache_dir, *shrunk, "pruning.resume_from=auto"))
    whole, resumed = (tmp_path / name / "prune" for name in ("whole", "crashed"))
    assert json.loads((whole / "decision.json").read_text()) == json.loads((resumed / "decision.json").read_text())
    final, final_resumed = (lightning_state(folder / "checkpoints" / "last.ckpt") for folder in (whole, resumed))
    assert final["tinyfusion_pl"]["stage"] == "prune" and final["global_step"] == 6
    states, resumed_states = ({key: value for key, value in checkpoint["callbacks"].items()  # but where it was saved
                               if not key.startswith("ModelCheckpoint")} for checkpoint in (final, final_resumed))
    assert_same_tensors(states, resumed_states)  # the gates, their EMA, the random state
    loaders = [checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] for checkpoint in (final, final_resumed)]
    assert loaders[0] == loaders[1] and loaders[0][0]["position"] == 6  # where in the data each run stands
    assert_same_tensors(final["state_dict"], final_resumed["state_dict"])  # LoRA adapters included


@pytest.fixture(scope="module")
def prune_outputs(tmp_path_factory, cache_dir) -> tuple[Path, Path]:
    """Two prune folders of the same teacher (baseline selectors: no training): blocks [0, 3] and [1, 2]."""
    oracle, by_index = tmp_path_factory.mktemp("oracle"), tmp_path_factory.mktemp("by_index")
    run_stage(tiny(oracle, cache_dir, "stage=prune", "pruning=oracle", "callbacks=none"))
    run_stage(tiny(by_index, cache_dir, "stage=prune", "pruning=by_index", "pruning.kept_blocks=[1,2]",
                   "pruning.num_keep=2", "callbacks=none"))
    return oracle / "prune", by_index / "prune"


def test_a_crashed_recovery_resumed_with_auto_ends_with_the_weights_and_ema_of_an_uninterrupted_one(
    tmp_path, cache_dir, prune_outputs
):
    shrunk = ["stage=recover", f"recover.pruned={prune_outputs[0]}", "recover.max_steps=6",
              "callbacks.checkpoint.every_n_train_steps=2", "recover.calibration_batches=1"]
    run_stage(tiny(tmp_path / "whole", cache_dir, *shrunk))
    crash = ["+callbacks.crash._target_=tests.test_resume.CrashAfterStep", "+callbacks.crash.step=3"]
    with pytest.raises(RuntimeError, match="crash"):
        run_stage(tiny(tmp_path / "crashed", cache_dir, *shrunk, *crash))
    run_stage(tiny(tmp_path / "crashed", cache_dir, *shrunk, "recover.resume_from=auto"))
    final, final_resumed = (torch.load(tmp_path / name / "recover" / "model.pt", weights_only=False)
                            for name in ("whole", "crashed"))
    assert_same_tensors(final["model"], final_resumed["model"])
    assert_same_tensors(final["ema"], final_resumed["ema"])  # the EMA of step 2 is in the step-2 checkpoint
    elsewhere = [f"recover.pruned={prune_outputs[1]}" if option.startswith("recover.pruned") else option
                 for option in shrunk]
    with pytest.raises(ValueError, match=r"last.ckpt was trained on other inputs than this run's: recover.pruned's "
                                         r"decision.json \(sha256\) was \w{12}\.\.\., is \w{12}\.\.\. now\. Resume with"):
        run_stage(tiny(tmp_path / "crashed", cache_dir, *elsewhere, "recover.resume_from=auto"))


def test_auto_without_a_checkpoint_names_the_folder_and_the_fix(tmp_path):
    for stage, option, folder in (("pretrain", "pretrain.resume_from", "pretrain"),
                                  ("prune", "pruning.resume_from", "prune")):
        with pytest.raises(FileNotFoundError, match=rf"{option}=auto found no checkpoint in "
                                                   rf"{tmp_path}/{folder}/checkpoints\. .*hydra.run.dir=<the run folder>"):
            run_stage(tiny(tmp_path, tmp_path / "cache", f"stage={stage}", f"{option}=auto"))
    with pytest.raises(ValueError, match=r"pruning.resume_from=x: pruning.selector=oracle trains nothing"):
        run_stage(tiny(tmp_path, tmp_path / "cache", "stage=prune", "pruning=oracle", "+pruning.resume_from=x"))


def test_a_checkpoint_of_another_stage_or_no_checkpoint_at_all_is_refused(tmp_path, cache_dir):
    run_stage(tiny(tmp_path, cache_dir, "stage=pretrain", "pretrain.max_steps=2",
                   "callbacks.checkpoint.every_n_train_steps=2"))
    checkpoints = tmp_path / "pretrain" / "checkpoints"
    assert [path.name for path in checkpoints.iterdir()] == ["last.ckpt"]
    with pytest.raises(ValueError, match=rf"pruning.resume_from={checkpoints}/last.ckpt is a checkpoint of "
                                         r"stage=pretrain, not of stage=prune\. Pass one from <run>/prune/checkpoints/"):
        run_stage(tiny(tmp_path, cache_dir, "stage=prune", f"pruning.resume_from={checkpoints / 'last.ckpt'}"))
    model = tmp_path / "pretrain" / "model.pt"
    with pytest.raises(ValueError, match=r"model.pt is not a Lightning checkpoint .*pretrain.module.init_checkpoint"):
        run_stage(tiny(tmp_path, cache_dir, "stage=pretrain", f"pretrain.resume_from={model}"))
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes((checkpoints / "last.ckpt").read_bytes()[:5000])  # a copy cut short
    with pytest.raises(ValueError, match=r"cut.ckpt cannot be read as a checkpoint .*drop pretrain.resume_from"):
        run_stage(tiny(tmp_path, cache_dir, "stage=pretrain", f"pretrain.resume_from={cut}"))
    # a sharded checkpoint (trainer=fsdp2) is a folder whose meta.pt holds the record; without it, it is not whole
    fsdp2 = ["trainer=fsdp2", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true"]
    sharded = tmp_path / "sharded.ckpt"
    sharded.mkdir()
    with pytest.raises(ValueError, match=r"sharded.ckpt is a folder without meta.pt, so not a whole sharded checkpoint"):
        run_stage(tiny(tmp_path, cache_dir, "stage=pretrain", *fsdp2, f"pretrain.resume_from={sharded}"))
    (sharded / "meta.pt").write_bytes((checkpoints / "last.ckpt").read_bytes())  # all but the shards
    with pytest.raises(ValueError, match=rf"pruning.resume_from={sharded} is a checkpoint of stage=pretrain, not"):
        run_stage(tiny(tmp_path, cache_dir, "stage=prune", *fsdp2, f"pruning.resume_from={sharded}"))
    # each kind resumes only under the trainer that writes it
    with pytest.raises(ValueError, match=rf"resume_from={sharded} is a folder of shards that trainer=fsdp2 writes, and "
                                         r"this run's trainer reads the other kind\. Resume with the trainer"):
        run_stage(tiny(tmp_path, cache_dir, "stage=pretrain", f"pretrain.resume_from={sharded}"))
    with pytest.raises(ValueError, match=r"last.ckpt is one file, not trainer=fsdp2's shards, and this run's trainer"):
        run_stage(tiny(tmp_path, cache_dir, "stage=pretrain", *fsdp2,
                       f"pretrain.resume_from={checkpoints / 'last.ckpt'}"))


def test_recover_refuses_a_prune_output_half_rewritten_by_a_killed_run_and_clears_its_strays(
    tmp_path, cache_dir, prune_outputs
):
    folder = tmp_path / "run" / "prune"
    shutil.copytree(prune_outputs[0], folder)  # a finished prune: blocks [0, 3]
    begin_output_set(folder, "prune")  # what a prune killed between writing pruned.pt and decision.json leaves
    shutil.copy(prune_outputs[1] / "pruned.pt", folder / "pruned.pt")
    killed_writer = ("import os, signal, sys\nfrom tinyfusion_pl.io import atomic_path\n"
                     "with atomic_path(sys.argv[1]) as temporary:\n    temporary.write_bytes(b'half')\n"
                     "    os.kill(os.getpid(), signal.SIGKILL)\n")
    subprocess.run([sys.executable, "-c", killed_writer, str(tmp_path / "run" / "recover" / "model.pt")],
                   env=environment(cache_dir))
    strays = list((tmp_path / "run" / "recover").glob(".model.partial-*.pt"))
    assert len(strays) == 1
    result = subprocess.run([sys.executable, "train.py", "stage=recover", f"hydra.run.dir={tmp_path / 'run'}",
                             "+model.depth=4", "logger=none"], cwd=REPO, env=environment(cache_dir),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    assert (f"{folder} holds a half-written stage=prune output: the run that wrote it stopped before finishing "
            "(files there now: decision.json, pruned.pt). Run stage=prune again with hydra.run.dir=") in result.stderr
    assert not strays[0].exists() and not (tmp_path / "run" / "recover" / "model.pt").exists()
    with pytest.raises(ValueError, match=r"half-written stage=prune output.*pruning.resume_from=auto continues"):
        pruned_checkpoint(tiny(tmp_path / "run", cache_dir, "stage=evaluate"))  # nor does evaluate take it
