"""Every mistake in the README's "Bad input" table: one message that names the fix, and no partial output.

One row per mistake, run through `run_stage` on the real composed config (fast: the checks stop the run before
anything trains), and a representative few through `python train.py`, as a user sees them: the message on stderr,
no traceback, a non-zero exit status, and a run folder holding nothing but Hydra's record of the config.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from tests.conftest import tiny_dit
from tests.test_configs import CONF, REPO
from tests.test_stage_prune import TINY, compose_run
from tinyfusion_pl import UsageError
from tinyfusion_pl.models import build_dit
from tinyfusion_pl.pruning.lora import inject_lora
from tinyfusion_pl.stages import run_stage
from tinyfusion_pl.stages.added_settings import CONF_DIR, check_added_settings, known_settings
from tinyfusion_pl.stages.checks import check_config

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="the mistake is asking for a GPU this machine lacks")
# Hydra's own record of a run (the composed config and its log): a refused run leaves nothing else.
HYDRA_RECORD = {".hydra", "train.log"}


def write_latents(root: Path, shape: tuple[int, ...], labels: list[int]) -> Path:
    for folder in ("imagenet256_features", "imagenet256_labels"):
        (root / folder).mkdir(parents=True)
    for index, label in enumerate(labels):
        np.save(root / "imagenet256_features" / f"{index}.npy", np.zeros(shape, dtype=np.float32))
        np.save(root / "imagenet256_labels" / f"{index}.npy", np.array([label]))
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """The files the rows give: a tiny teacher, broken and foreign checkpoints, bad latents, a pruned run."""
    root = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    teacher = tiny_dit(depth=4)
    torch.save(teacher.state_dict(), root / "teacher.pt")
    (root / "corrupt.pt").write_bytes((root / "teacher.pt").read_bytes()[:5000])  # a download cut short
    torch.save(build_dit("DiT-Mini/2", input_size=8, in_channels=1, num_classes=10).state_dict(), root / "wrong_size.pt")
    inject_lora(teacher.blocks, rank=2)  # what a prune run's Lightning checkpoint holds: adapters around the blocks
    torch.save({"state_dict": {f"net.{key}": value for key, value in teacher.state_dict().items()}},
               root / "prune_step.ckpt")
    (root / "a_file").write_text("not a folder")
    write_latents(root / "latents_4ch", (2, 4, 8, 8), [0, 1, 2, 3])
    write_latents(root / "latents_label12", (2, 1, 8, 8), [0, 1, 12, 3])
    write_latents(root / "latents_20classes", (2, 1, 8, 8), [0, 1, 2, 19])
    pruned = root / "pruned_run"
    run_stage(compose_run(pruned, root / "cache", f"teacher.checkpoint={root / 'teacher.pt'}", "stage=prune",
                          "pruning=by_index", "pruning.kept_blocks=[0,3]", "pruning.calibration_batches=1"))
    broken = root / "broken_decision" / "prune"
    broken.mkdir(parents=True)
    (broken / "pruned.pt").write_bytes((pruned / "prune" / "pruned.pt").read_bytes())
    (broken / "decision.json").write_text('{"kept_blocks": [0, ')
    half = root / "half_written" / "prune"  # a prune killed between its first and last write
    half.mkdir(parents=True)
    for name in ("pruned.pt", "decision.json"):
        (half / name).write_bytes((pruned / "prune" / name).read_bytes())
    (half / "manifest.json").write_text('{"stage": "prune", "complete": false, "files": {}}')
    (root / "sharded" / "last.ckpt").mkdir(parents=True)  # what trainer=fsdp2 writes: a folder of shards
    return {"root": str(root), "teacher": str(root / "teacher.pt"), "pruned": str(pruned / "prune"),
            **{path.stem if path.is_file() else path.name: str(path) for path in root.iterdir()},
            "broken_decision": str(broken), "half_written": str(half),
            "sharded_checkpoint": str(root / "sharded" / "last.ckpt"), "pruned_files": ",".join(sorted(contents(pruned / "prune")))}


LATENTS = ["stage=pretrain", "data=latents", "model.input_size=8", "data.num_classes=10", "data.num_workers=0", "data.batch_size=2",
           "data.val_fraction=0"]
RECOVER = ["stage=recover", "recover.pruned={pruned}", "recover.calibration_batches=1"]

# (mistake, overrides, what the message must say); {name} is a file of the `inputs` fixture
ROWS = [
    ("unknown stage", ["stage=prun"], r"stage='prun' is not one of \[.*'prune'"),
    ("unknown model name", ["stage=prune", "model.name=DiT-Huge/2"],
     r"unknown DiT model name='DiT-Huge/2'; valid names: DiT-XL/2"),
    ("a model setting the model does not take", ["stage=prune", "+model.dpeth=4"],
     r"unexpected keyword argument 'dpeth'.*Remove the setting or correct its name"),
    ("a teacher checkpoint that does not exist", ["stage=prune", "teacher.checkpoint=/nonexistent/teacher.pt"],
     r"teacher.checkpoint=/nonexistent/teacher.pt does not exist"),
    ("a corrupt checkpoint", ["stage=prune", "teacher.checkpoint={corrupt}"],
     r"could not read checkpoint .*corrupt.pt.*not a torch checkpoint or it is damaged.*Write or download it again"),
    ("a file that is no checkpoint", ["stage=prune", "teacher.checkpoint={pruned}/decision.json"],
     r"could not read checkpoint .*decision.json"),
    ("a checkpoint of another model size", ["stage=prune", "teacher.checkpoint={wrong_size}"],
     r"(?s)does not fit this DiT.*shape mismatches.*fits DiT-Mini/2.*set model.name to the entry that fits it"),
    ("a checkpoint of the wrong stage (a prune run's, with LoRA adapters)", ["stage=prune", "teacher.checkpoint={prune_step}"],
     r"(?s)unexpected keys.*lora.*a pruning run \(stage=prune\).*prune/pruned.pt"),
    ("a real model with no teacher checkpoint", ["stage=prune", "model=dit_xl_2", "data=latents",
                                                 "data.root=/nonexistent", "teacher.checkpoint=null"],
     r"needs a teacher for model=DiT-XL/2: pass teacher.checkpoint=/path/to/model.pt"),
    ("teacher.name without its checkpoint", [*RECOVER, "teacher.name=DiT-D7/2", "teacher.checkpoint=null"],
     r"teacher.name=DiT-D7/2 needs its weights: pass teacher.checkpoint"),
    ("a pattern that does not fit the depth", ["stage=prune", "pruning=learnable_7_14"],
     r"pattern='7:14' needs a depth that is a multiple of M=14, but the block container has 4 blocks"),
    ("an invalid pattern", ["stage=prune", "pruning=learnable_2_4", "pruning.pattern=3:2"],
     r"pattern='3:2' keeps N=3 of M=2 blocks per group; N must satisfy 1 <= N <= M"),
    ("a keep ratio outside (0, 1]", ["stage=prune", "pruning.keep_ratio=1.5"], r"keep_ratio=1.5 must be a number in \(0, 1\]"),
    ("a keep ratio outside (0, 1] in a pipeline, before its teacher is trained",
     ["stage=pipeline", "teacher.checkpoint=null", "pruning.keep_ratio=7"], r"keep_ratio=7 must be a number in \(0, 1\]"),
    ("a keep ratio that gives no whole block count", ["stage=prune", "pruning=bi_score", "pruning.keep_ratio=0.3"],
     r"keep_ratio=0.3 with all 4 blocks in one group would keep 1.2 blocks"),
    ("a keep ratio beside a pattern", ["stage=prune", "pruning=learnable_2_4", "pruning.keep_ratio=0.25"],
     r"pattern='2:4' and keep_ratio=0.25.*were both given"),
    ("an unknown selector", ["stage=prune", "pruning.selector=magnitude"], r"pruning.selector='magnitude' is not one of"),
    ("by_index without the blocks", ["stage=prune", "pruning=by_index"],
     r"pruning.kept_blocks must be given .*python train.py pruning.kept_blocks=\.\.\."),
    ("a block index that does not exist", ["stage=prune", "pruning=by_index", "pruning.kept_blocks=[0,9]"],
     r"kept_blocks=\[0, 9\] holds \[9\], outside the model's 4 blocks"),
    ("an unknown weight update", ["stage=prune", "pruning.weight_update=qlora"],
     r"method='qlora' is not one of \['lora', 'full', 'frozen'\]"),
    ("a LoRA rank of 0", ["stage=prune", "pruning.rank=0"], r"rank=0 must be an integer >= 1"),
    ("a temperature that is not a number", ["stage=prune", "pruning.tau=abc"], r"tau='abc' must be a positive number"),
    ("negative steps", ["stage=prune", "pruning.max_steps=-5"], r"pruning.max_steps=-5 must be a whole number >= 1"),
    ("no calibration batches", ["stage=prune", "pruning.calibration_batches=0"],
     r"pruning.calibration_batches=0 must be a whole number >= 1"),
    ("recover without prune", ["stage=recover"], r"lacks pruned.pt, decision.json. Run stage=prune in this run folder"),
    ("a corrupt decision.json", ["stage=recover", "recover.pruned={broken_decision}"],
     r"decision.json cannot be read .*Run stage=prune again"),
    ("a half-written prune output", ["stage=recover", "recover.pruned={half_written}"],
     r"holds a half-written stage=prune output"),
    ("resuming from a checkpoint that does not exist", ["stage=pretrain", "pretrain.resume_from=/nonexistent/last.ckpt"],
     r"pretrain.resume_from=/nonexistent/last.ckpt does not exist. Pass a checkpoint from <run>/pretrain/checkpoints/"),
    ("resuming from a model file instead of a Lightning checkpoint", ["stage=pretrain", "pretrain.resume_from={teacher}"],
     r"is not a Lightning checkpoint .*use teacher.checkpoint or pretrain.module.init_checkpoint"),
    ("resume_from=auto with nothing to resume", ["stage=pretrain", "pretrain.resume_from=auto"],
     r"pretrain.resume_from=auto found no checkpoint in .*hydra.run.dir=<the run folder>"),
    ("resuming fsdp2's sharded checkpoint under another trainer",
     ["stage=pretrain", "pretrain.resume_from={sharded_checkpoint}"],
     r"is a folder of shards that trainer=fsdp2 writes, and this run's trainer reads the other kind\. Resume with"),
    ("evaluate without prune", ["stage=evaluate"],
     r"holds neither recover/model.pt nor prune/pruned.pt.*evaluate.models=\[teacher\]"),
    ("an unknown distillation method", [*RECOVER, "distill.method=logits"], r"distill.method='logits' is not one of"),
    ("an unknown layer pairing", [*RECOVER, "distill.pairing=closest"], r"pairing='closest' is not one of"),
    ("a teacher whose hidden states do not fit the student", [*RECOVER, "teacher.checkpoint={wrong_size}",
                                                              "teacher.name=DiT-Mini/2", "distill.pairing=reference"],
     r"(?s)does not fit the pruned student for distill=masked_kd: student hidden state .*pass distill=kd"),
    ("an objective the model's family does not train", ["stage=pretrain", "model=mar_digits", "~model.depth"],
     r"model=MAR-Tiny is trained and sampled only by its own objective, objective=mar; got GaussianDiffusion"),
    ("a sampler method typo", ["stage=pipeline", "sampling.method=ddmi"],
     r"method='ddmi' is invalid: expected one of \('ddpm', 'ddim'\)"),
    ("a sampler option the objective lacks", ["stage=pipeline", "experiment=sit_digits", "+sampling.eta=0.5"],
     r"FlowMatching has no sampler option 'eta'"),
    ("negative sampler steps", ["stage=pipeline", "sampling.steps=-3"], r"steps=-3 is invalid"),
    ("a guidance scale below 1", ["stage=pipeline", "sampling.cfg_scale=0.5"], r"sampling.cfg_scale=0.5 must be a number >= 1"),
    ("a negative grid size", ["stage=pretrain", "sampling.samples_per_class=-1"],
     r"sampling.samples_per_class=-1 must be a whole number >= 0"),
    ("num_samples 0", ["stage=evaluate", "evaluate.models=[teacher]", "evaluate.num_samples=0"],
     r"evaluate.num_samples=0 must be a whole number >= 1"),
    ("Inception FID without reference images", ["stage=evaluate", "evaluate.models=[teacher]", "evaluate.fid=inception"],
     r"evaluate.fid=inception needs real images"),
    ("an unknown FID mode", ["stage=evaluate", "evaluate.models=[teacher]", "evaluate.fid=kid"],
     r"evaluate.fid='kid' is not one of \('auto', 'digits', 'inception', 'none'\)"),
    ("a reference .npz that does not exist", ["stage=evaluate", "evaluate.models=[teacher]",
                                              "evaluate.reference_npz=/nonexistent/ref.npz"],
     r"evaluate.reference_npz=/nonexistent/ref.npz is not a file"),
    ("evaluation on a GPU the machine lacks", ["stage=evaluate", "evaluate.models=[teacher]", "evaluate.device=cuda"],
     r"evaluate.device=cuda but no CUDA device is available; use evaluate.device=cpu or auto"),
    ("a pruned checkpoint that does not exist", ["stage=evaluate", "evaluate.pruned_checkpoint=/nonexistent/model.pt"],
     r"evaluate.pruned_checkpoint=/nonexistent/model.pt does not exist"),
    ("a folder given as a checkpoint", ["stage=prune", "teacher.checkpoint={root}"],
     r"checkpoint path=.* does not exist or is not a file"),
    ("a validation fraction outside (0, 1)", ["stage=pretrain", "data.val_fraction=1.5"],
     r"val_fraction=1.5 must be in \(0, 1\)"),
    ("an unknown model to evaluate", ["stage=evaluate", "evaluate.models=[student]"],
     r"evaluate.models=\['student'\] is invalid"),
    ("a batch larger than the data", ["stage=pretrain", "data.batch_size=4096"],
     r"data.batch_size=4096 is larger than the 1617 training samples.*Lower data.batch_size to at most 1617"),
    ("a batch size of 0", ["stage=pretrain", "data.batch_size=0"], r"batch_size=0 must be >= 1"),
    ("an image size the digits lack", ["stage=pretrain", "data.image_size=12"], r"image_size=12 is not supported"),
    ("latents with the digits model", ["stage=pretrain", "data=latents", "data.root=/nonexistent"],
     r"(?s)model.input_size cannot be resolved: .*data.image_size.*data=latents goes with model=dit_xl_2"),
    ("latents that do not exist", ["stage=pretrain", "data=latents", "model.input_size=8", "data.root=/nonexistent"],
     r"/nonexistent/imagenet256_features does not exist. Point data.root at the folder"),
    ("latents without data.root", ["stage=pretrain", "data=latents", "model.input_size=8"], r"data.root must be given"),
    ("latents of the wrong shape for the model", [*LATENTS, "data.root={latents_4ch}"],
     r"samples have shape \(4, 8, 8\) .*model=DiT-Tiny/2 takes \(1, 8, 8\)"),
    ("a label out of range in the data", [*LATENTS, "data.root={latents_label12}"],
     r"2.npy holds label 12, outside \[0, 10\). Set data.num_classes"),
    ("more classes in the data than the model has", [*LATENTS, "data.root={latents_20classes}", "data.num_classes=20"],
     r"the data has 20 classes but model=DiT-Tiny/2 has num_classes=10.*model.num_classes=20"),
    ("fsdp on a CPU-only machine", ["stage=pretrain", "trainer=fsdp"],
     r"trainer=fsdp \(Lightning's FSDPStrategy\) needs CUDA GPUs.*trainer=fsdp2 trainer.accelerator=cpu"),
    ("more GPUs than the machine has", ["stage=pretrain", "trainer=gpu", "trainer.devices=4"],
     r"trainer \(accelerator=gpu, devices=4.*cannot run on this machine"),
    ("an unknown precision", ["stage=pretrain", "trainer.precision=17"], r"cannot run on this machine: .*17"),
    ("a negative checkpoint interval", ["stage=pretrain", "callbacks=default", "callbacks.checkpoint.every_n_train_steps=-1"],
     r"callbacks.checkpoint cannot be built: .*every_n_train_steps"),
    ("an unknown W&B mode", ["stage=pretrain", "logger=wandb", "logger.wandb.mode=offlin"],
     r"logger.wandb.mode='offlin' must be 'online', 'offline' or 'disabled'"),
    ("an output folder that cannot be written", ["stage=pretrain", "paths.run_dir={a_file}/run"],
     r"paths.run_dir=.*a_file/run cannot be created: .*a_file is a file, not a folder. .*hydra.run.dir="),
    ("a cache folder that cannot be written", ["stage=prune", "paths.cache_dir={a_file}/cache"],
     r"paths.cache_dir=.*cannot be created: .*a_file is a file, not a folder. .*TINYFUSION_CACHE="),
    ("a seed that is not a number", ["stage=pretrain", "seed=abc"], r"seed='abc' must be an integer"),
    ("a negative learning rate", ["stage=pretrain", "pretrain.module.lr=-1"], r"lr=-1 must be > 0"),
    ("a learning-rate schedule typo", ["stage=pretrain", "pretrain.module.lr_schedule=cosin"],
     r"lr_schedule='cosin' is not one of"),
    ("compare_selectors without its experiment", ["stage=compare_selectors"],
     r"needs compare.selectors: use experiment=compare_selectors"),
]
GPU_ROWS = {"fsdp on a CPU-only machine", "more GPUs than the machine has", "evaluation on a GPU the machine lacks"}


def fill(overrides: list[str], inputs: dict[str, str]) -> list[str]:
    return [override.format(**inputs) for override in overrides]


def contents(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*")} if folder.exists() else set()


@pytest.mark.parametrize("mistake,overrides,message",
                         [pytest.param(*row, id=row[0], marks=[NO_GPU] if row[0] in GPU_ROWS else []) for row in ROWS])
def test_each_mistake_gets_one_message_with_the_fix_and_no_partial_output(mistake, overrides, message, inputs, tmp_path):
    run_dir, cache_dir = tmp_path / "run", tmp_path / "cache"
    overrides = fill(overrides, inputs)
    teacher = [] if any(override.startswith("teacher.checkpoint=") for override in overrides) \
        else [f"teacher.checkpoint={inputs['teacher']}"]
    cfg = compose_run(run_dir, cache_dir, *teacher, *overrides)
    with pytest.raises(UsageError, match=message):
        run_stage(cfg)
    assert contents(run_dir) == set() and contents(cache_dir) == set()  # nothing written, nothing cached
    assert ",".join(sorted(contents(Path(inputs["pruned"])))) == inputs["pruned_files"]  # inputs untouched


# --------------------------------------------------------------------------- keys added with +, in a Hydra job

# Only a Hydra job knows which keys its command line added (HydraConfig's overrides.task): these rows run
# run_stage inside a job's config, set as Hydra's run_job sets it.
ADDED_ROWS = [
    ("a misspelt key added with +", ["stage=prune", "+pruning.keep_ration=0.3"],
     r"^\+pruning.keep_ration is not a setting of pruning \(did you mean pruning.keep_ratio\?\)\. Nothing reads it"),
    ("a misspelt section added with +", ["stage=prune", "+prunning.keep_ratio=0.3"],
     r"^\+prunning.keep_ratio is not a section of the config \(did you mean pruning\?\)"),
    ("a misspelt Trainer argument added with +", ["stage=pretrain", "+trainer.detect_anomali=true"],
     r"^\+trainer.detect_anomali is not a setting of trainer \(did you mean trainer.detect_anomaly\?\)"),
    ("a misspelt module argument added with ++", ["stage=pretrain", "++pretrain.module.min_rl=1e-5"],
     r"^\+\+pretrain.module.min_rl is not a setting of pretrain.module \(did you mean pretrain.module.min_lr\?\)"),
]


def compose_job(run_dir: Path, cache_dir: Path, *overrides: str):
    """The config of a Hydra job started with `overrides`, as the task function sees it (hydra node removed)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True,
                      overrides=[f"paths.run_dir={run_dir}", f"paths.cache_dir={cache_dir}", *TINY, *overrides])
    return cfg


@pytest.fixture
def hydra_job():
    """Run inside a Hydra job: set its HydraConfig as Hydra's run_job does, and clear it afterwards."""
    def enter(cfg):
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg
    yield enter
    HydraConfig.instance().cfg = None


@pytest.mark.parametrize("mistake,overrides,message", [pytest.param(*row, id=row[0]) for row in ADDED_ROWS])
def test_a_key_added_with_plus_that_nothing_reads_is_refused_naming_the_closest(mistake, overrides, message, inputs,
                                                                                tmp_path, hydra_job):
    run_dir, cache_dir = tmp_path / "run", tmp_path / "cache"
    cfg = hydra_job(compose_job(run_dir, cache_dir, f"teacher.checkpoint={inputs['teacher']}", *overrides))
    with pytest.raises(UsageError, match=message):
        run_stage(cfg)
    assert contents(run_dir) == set() and contents(cache_dir) == set()


# Every `+` that the README, the tests, conf/ comments and benchmarks use, and the kinds of key a user may add.
LEGAL_ADDITIONS = [
    ([], "+pruning.seed=3"),                          # a key of another option of the group (pruning=random)
    ([], "++pruning.progress=false"),
    ([], "+pruning.resume_from=auto"),
    ([], "+model.mlp_ratio=2.0"),                     # DiT's constructor, through build_dit's **kwargs
    (["model=mar_digits"], "++model.decoder_depth=2"),
    (["model=diffusers_flux"], "+model.num_classes=10"),  # build_diffusers passes any option on
    ([], "+trainer.detect_anomaly=true"),             # a Lightning Trainer argument
    ([], "++trainer.check_val_every_n_epoch=2"),
    ([], "+recover.module.kd_weight=0.5"),            # DistillationModule's, beside DiffusionModule's
    ([], "+pretrain.module.betas=[0.9,0.99]"),
    (["logger=csv"], "+logger.csv.version=3"),                  # CSVLogger's
    (["callbacks=default"], "+callbacks.checkpoint.every_n_epochs=1"), # ModelCheckpoint's
    ([], "+callbacks.crash._target_=tests.test_resume.CrashAfterStep"),  # a new callback
    ([], "+callbacks.crash.step=3"),
    ([], "+sampling.eta=0.5"),                        # a sampler option: the objective checks it
    ([], "+compare.selectors={a: {selector: random}}"),
]


@pytest.mark.parametrize("before,addition", LEGAL_ADDITIONS, ids=[row[1] for row in LEGAL_ADDITIONS])
def test_legitimate_additions_pass(before, addition, tmp_path):
    cfg = compose_run(tmp_path / "run", tmp_path / "cache", *before, addition)
    check_added_settings(cfg, [*before, addition])
    # Hydra's own keys, and group options (Hydra checks those), are not this check's business
    check_added_settings(cfg, [*before, addition, "+hydra.job.env_set.TOKEN=1", "hydra/launcher=joblib",
                               "+hydra/launcher=joblib", "+data=digits"])


def test_every_optional_key_the_code_reads_is_a_known_key():
    """A key read with cfg.<section>.get("key") or OmegaConf.select(cfg, "a.b") may be added with +: it must be in
    some conf/ file or in CODE_SETTINGS, or the + check would refuse a key the code reads."""
    source = "\n".join(path.read_text() for path in [*(REPO / "tinyfusion_pl").rglob("*.py"), REPO / "train.py"])
    read = {f"{section}.{key}".lstrip(".") for section, key in
            re.findall(r"\bcfg((?:\.[a-z_]+)*)\.get\(\"([a-z_]+)\"", source)}
    read |= set(re.findall(r"OmegaConf\.select\(cfg, \"([a-z_.]+)\"", source))
    assert {"pruning.resume_from", "teacher.name", "compare.selectors"} <= read  # the pattern finds them
    known = known_settings(CONF_DIR)
    assert not [key for key in read if key not in known], sorted(read - known)


def test_without_hydra_there_are_no_additions_to_check(tmp_path, inputs):
    """run_stage from Python: the key is simply in the config, as in any other DictConfig, and the check passes."""
    cfg = compose_run(tmp_path / "run", tmp_path / "cache", f"teacher.checkpoint={inputs['teacher']}",
                      "stage=prune", "+pruning.keep_ration=0.3")
    assert not HydraConfig.initialized()
    check_config(cfg)  # what run_stage runs first


def test_there_are_at_least_30_distinct_mistakes_and_the_readme_lists_each():
    readme = (REPO / "README.md").read_text()
    rows = ROWS + ADDED_ROWS
    assert len({row[0] for row in rows}) == len(rows) >= 30
    missing = [row[0] for row in rows if f"| {row[0]} |" not in readme]
    assert not missing, f"README's bad-input table lacks {missing}"


# --------------------------------------------------------------------------- through train.py, as a user

SUBPROCESS_ROWS = [
    ("an unknown config group option", ["model=dit_huge"], r"Could not find 'model/dit_huge'.*Available options"),
    ("a misspelt setting", ["pruning.keep_ration=0.3"], r"Key 'keep_ration' is not in struct"),
    ("a misspelt key added with +", ["experiment=smoke", "+pruning.keep_ration=0.3"],
     r"^Error: \+pruning.keep_ration is not a setting of pruning \(did you mean pruning.keep_ratio\?\)"),
    ("unknown model name", ["stage=prune", "model.name=DiT-Huge/2"], r"unknown DiT model name='DiT-Huge/2'"),
    ("recover without prune", ["stage=recover"], r"lacks pruned.pt, decision.json. Run stage=prune"),
    ("a corrupt checkpoint", ["stage=prune", "teacher.checkpoint={corrupt}"], r"could not read checkpoint"),
    ("fsdp on a CPU-only machine", ["stage=prune", "trainer=fsdp"], r"needs CUDA GPUs.*trainer=fsdp2"),
    ("a sampler method typo", ["sampling.method=ddmi"], r"method='ddmi' is invalid"),
    ("an output folder that cannot be written", ["hydra.run.dir={a_file}/run"],
     r"hydra.run.dir=.*a_file/run cannot be created: .*is a file, not a folder"),
]


def run_train(overrides: list[str], run_dir: Path, cache_dir: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    environment.update(TINYFUSION_CACHE=str(cache_dir), OMP_NUM_THREADS="1", **env)
    run_folder = [] if any(override.startswith("hydra.run.dir=") for override in overrides) \
        else [f"hydra.run.dir={run_dir}"]
    return subprocess.run([sys.executable, "train.py", *overrides, *run_folder], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=300)


# Each train.py process costs about 7 s of CPU (importing Lightning): three run in the default suite, the rest
# with -m slow (every row is also checked through run_stage above, or by Hydra before train.py's code runs).
DEFAULT_SUITE_ROWS = {"an unknown config group option", "unknown model name", "recover without prune",
                      "a misspelt key added with +"}


def subprocess_marks(mistake: str) -> list[pytest.MarkDecorator]:
    return ([NO_GPU] if mistake in GPU_ROWS else []) + ([] if mistake in DEFAULT_SUITE_ROWS else [pytest.mark.slow])


@pytest.mark.parametrize("mistake,overrides,message",
                         [pytest.param(*row, id=row[0], marks=subprocess_marks(row[0])) for row in SUBPROCESS_ROWS])
def test_train_py_shows_the_message_without_a_traceback(mistake, overrides, message, inputs, tmp_path):
    run_dir, cache_dir = tmp_path / "run", tmp_path / "cache"
    overrides = fill(overrides, inputs)
    if not any(override.startswith("teacher.checkpoint=") for override in overrides):
        overrides.append(f"teacher.checkpoint={inputs['teacher']}")
    result = run_train(overrides, run_dir, cache_dir)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert re.search(message, result.stderr, re.DOTALL), result.stderr[-3000:]
    assert {path.split("/")[0] for path in contents(run_dir)} <= HYDRA_RECORD  # Hydra's record of the config only
    assert not cache_dir.exists()


def test_hydra_full_error_shows_the_traceback(inputs, tmp_path):
    result = run_train(["stage=recover", f"teacher.checkpoint={inputs['teacher']}"], tmp_path / "run",
                       tmp_path / "cache", HYDRA_FULL_ERROR="1")
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "MissingInputError" in result.stderr
    assert "lacks pruned.pt, decision.json" in result.stderr
