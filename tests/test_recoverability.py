"""experiment=recoverability on a shrunk model (four blocks under 1:2: four choices), run for real.

With logger=wandb (offline, no account) the study's table reaches one W&B run as recoverability.csv has it.
A study that stops continues in the same folder: the finished pieces are read back, never redone (in-process,
and with python train.py killed by SIGKILL in a slow test).
"""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from tests.test_configs import REPO
from tests.test_stage_prune import TINY, compose_run
from tinyfusion_pl.evaluation.statistics import kendall_tau, place
from tinyfusion_pl.stages import run_stage

SELECTORS = ('+compare.selectors={learnable: {selector: learnable, pattern: "1:2", keep_ratio: null, group_size: null},'
             ' frozen: {selector: learnable, pattern: "1:2", keep_ratio: null, group_size: null, weight_update: frozen},'
             ' bi_score: {selector: bi_score, pattern: "1:2", keep_ratio: null, group_size: null, progress: false},'
             ' oracle: {selector: oracle, kept_blocks: null}}')
SHRUNK = ["experiment=recoverability", "data.batch_size=16", "pretrain.max_steps=4", "pruning.max_steps=4", "pruning.calibration_batches=1",
          "recover.max_steps=3", "recover.calibration_batches=1", "sampling.steps=2", "evaluate.num_samples=40",
          "evaluate.batch_size=40", "recoverability.pattern=1:2", "recoverability.bootstrap=50",
          "recoverability.heldout_batches=1", "~compare.selectors", SELECTORS]
CHOICES = ["0-2", "0-3", "1-2", "1-3"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The whole shrunk study, run once in-process, with logger=wandb offline and no account (no API key, an
    empty netrc)."""
    root = tmp_path_factory.mktemp("study")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.delenv("WANDB_API_KEY", raising=False)
    (root / ".netrc").touch()
    mp.setenv("NETRC", str(root / ".netrc"))
    cfg = compose_run(root / "run", root / "cache", *SHRUNK, "logger=wandb", f"recoverability.study_dir={root / 'study'}")
    yield run_stage(cfg), root / "study", cfg
    mp.undo()


@pytest.mark.slow
def test_a_killed_study_continues_without_redoing_finished_choices(tmp_path):
    """python train.py killed (SIGKILL) once its first choice is finished, then run again in the same folder."""
    study_dir, cache = tmp_path / "study", tmp_path / "cache"
    command = [sys.executable, "train.py", *TINY, *SHRUNK, f"recoverability.study_dir={study_dir}"]
    env = dict(os.environ, TINYFUSION_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    process = subprocess.Popen([*command, f"hydra.run.dir={tmp_path / 'first'}"], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    choices = study_dir / "seed_0" / "choices"
    deadline = time.monotonic() + 600
    while not list(choices.glob("*.json")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = {path.name: path.stat().st_mtime_ns for path in choices.glob("*.json")}
    assert finished and len(finished) < 4, f"no choice finished, or all: {process.stderr.read()[-2000:]}"
    result = subprocess.run([*command, f"hydra.run.dir={tmp_path / 'second'}"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(path.stem for path in choices.glob("*.json")) == CHOICES
    for name, mtime in finished.items():
        assert (choices / name).stat().st_mtime_ns == mtime, f"{name} was computed again"
    assert (study_dir / "report.md").is_file()
    assert not list(study_dir.rglob(".*.json")), "a half-written file was left behind"


@pytest.mark.slow
def test_two_shards_through_the_joblib_launcher_complete_one_study(tmp_path):
    """A Hydra multirun whose two jobs (joblib launcher, if installed) share one study folder."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    study_dir = tmp_path / "study"
    env = dict(os.environ, TINYFUSION_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "train.py", "-m", *TINY, *SHRUNK, f"recoverability.study_dir={study_dir}",
         "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "recoverability.num_shards=2",
         "recoverability.shard=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(path.stem for path in (study_dir / "seed_0" / "choices").glob("*.json")) == CHOICES
    assert (study_dir / "report.md").is_file()


@pytest.mark.slow
def test_a_study_on_two_ddp_ranks_measures_what_one_process_with_the_global_batch_measures(tmp_path):
    """trainer=ddp (2 gloo ranks of 8 samples): every fit on both ranks, the samples shared out, files written once."""
    env = dict(os.environ, TINYFUSION_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    studies, outputs = {}, {}
    for name, overrides in (("ddp", ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                                     "trainer.precision=32-true", "data.batch_size=8"]), ("one", [])):
        studies[name] = tmp_path / name
        result = subprocess.run([sys.executable, "train.py", *TINY, *SHRUNK, *overrides, "evaluate.batch_size=20",
                                 f"hydra.run.dir={studies[name]}"], cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=1200)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[name] = result.stdout
    assert outputs["ddp"].count("Recoverability report: ") == 1 and outputs["ddp"].count("Recoverability study in") == 1
    for key in CHOICES:
        ddp, one = (json.loads((studies[name] / "seed_0" / "choices" / f"{key}.json").read_text())
                    for name in ("ddp", "one"))
        # the recovered models train on the same global batches; the losses outside training (calibration,
        # held out) are taken on batches of data.batch_size, so they differ with it and are not compared
        for measure in ("fid", "conditional_accuracy"):
            assert ddp[measure] == pytest.approx(one[measure], rel=1e-4, abs=1e-6), (key, measure)
    for selector in ("learnable", "frozen", "oracle"):
        ddp, one = (json.loads((studies[name] / "seed_0" / "selectors" / f"{selector}.json").read_text())
                    for name in ("ddp", "one"))
        assert ddp["kept_blocks"] == one["kept_blocks"], selector
    assert (studies["ddp"] / "report.md").is_file() and (studies["ddp"] / "train_ddp_process_1.log").is_file()
    assert not list(studies["ddp"].rglob(".*.partial-*"))


def test_the_study_writes_its_report_table_and_plot(study):
    result, study_dir, _ = study
    for name in ("report.md", "recoverability.csv", "recoverability.json", "calibration_vs_recovered_seed0.png"):
        assert (study_dir / name).is_file(), name
    assert (study_dir / "calibration_vs_recovered_seed0.png").read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader((study_dir / "recoverability.csv").open()))
    assert [row["kept_blocks"] for row in rows] == [key.replace("-", " ") for key in CHOICES]
    for row in rows:
        assert float(row["fid_low"]) <= float(row["fid"]) <= float(row["fid_high"])
        assert float(row["accuracy_low"]) <= float(row["conditional_accuracy"]) <= float(row["accuracy_high"])
    assert "oracle" in rows[CHOICES.index("0-3")]["chosen_by"]  # BK-SDM on four blocks keeps [0, 3]
    report = (study_dir / "report.md").read_text()
    assert "all 4 of the 4 admissible kept-sets" in report and "| learnable |" in report
    assert "Kendall's tau" in report and "![calibration against recovered, seed 0]" in report
    saved = json.loads((study_dir / "recoverability.json").read_text())
    assert set(saved["analysis"]["placements"]["0"]) == {"learnable", "frozen", "bi_score", "oracle"}
    assert not list((study_dir / "seed_0" / "runs").rglob("model.pt")), "checkpoints are dropped once measured"


def test_placements_and_tau_agree_with_the_measured_choices(study):
    result, study_dir, _ = study
    choices = {}
    for key in CHOICES:
        choices[key] = json.loads((study_dir / "seed_0" / "choices" / f"{key}.json").read_text())
    placements = result["analysis"]["placements"][0]
    for entry in placements.values():
        chosen = "-".join(map(str, entry["kept_blocks"]))
        fids = [choices[key]["fid"] for key in CHOICES]
        better = sum(value < choices[chosen]["fid"] for value in fids)
        assert entry["all"]["fid"]["rank"] == 1 + better
        assert entry["all"]["fid"]["regret"] == pytest.approx(choices[chosen]["fid"] - min(fids))
        assert entry["all"]["heldout_loss"] == {
            **place({key: choices[key]["heldout_loss"] for key in CHOICES}, chosen).as_dict(),
            "value": choices[chosen]["heldout_loss"]}
        assert entry["own"]["fid"]["size"] == 4  # every selector here picks among 1:2's four choices
    tau = result["analysis"]["rank_correlations"][0]["fid"]["tau"]
    assert tau == pytest.approx(kendall_tau([choices[key]["calibration_loss"] for key in CHOICES],
                                            [choices[key]["fid"] for key in CHOICES]))
    record = choices["0-2"]
    assert record["heldout_loss"] == pytest.approx(np.mean(record["heldout_losses"]))
    assert record["conditional_accuracy"] == pytest.approx(np.mean(record["correct"])) and len(record["correct"]) == 40


def test_a_rerun_redoes_only_the_missing_choices_and_other_settings_are_refused(study):
    result, study_dir, cfg = study
    seed_dir = study_dir / "seed_0"
    for folder in sorted((seed_dir / "runs").iterdir()):
        folder.rename(folder.with_name(f"old_{folder.name}"))
    kept = {key: (seed_dir / "choices" / f"{key}.json").stat().st_mtime_ns for key in CHOICES[:2]}
    for key in CHOICES[2:]:  # as if the study had stopped after two choices
        (seed_dir / "choices" / f"{key}.json").unlink()
    again = run_stage(OmegaConf.merge(cfg, {"logger": None}))  # W&B holds the first run's table alone
    assert sorted(path.name for path in (seed_dir / "runs").iterdir() if not path.name.startswith("old_")) \
        == [f"choice_{key}" for key in CHOICES[2:]], "only the missing choices run again"
    for key, mtime in kept.items():
        assert (seed_dir / "choices" / f"{key}.json").stat().st_mtime_ns == mtime
    assert [entry["kept_blocks"] for entry in again["analysis"]["placements"][0].values()] \
        == [entry["kept_blocks"] for entry in result["analysis"]["placements"][0].values()]
    changed = compose_run(study_dir.parent / "third", cfg.paths.cache_dir, *SHRUNK, "recover.max_steps=4",
                          f"recoverability.study_dir={study_dir}")
    with pytest.raises(ValueError, match="made with other settings.*Use a new recoverability.study_dir"):
        run_stage(changed)
    widened = compose_run(study_dir.parent / "fourth", cfg.paths.cache_dir, *SHRUNK, "+recover.new_option=null",
                          "+pruning.resume_from=auto", f"recoverability.study_dir={study_dir}")
    assert run_stage(widened)["analysis"]["placements"] == again["analysis"]["placements"]  # unset options: no change


def test_pieces_measured_on_other_teacher_weights_are_refused(study, tmp_path):
    """The same pretraining settings under the same cache key, other weights (a teacher pretrained again under
    another thread count differs in every weight): the study's pieces are not reused. The same weights saved
    again (other bytes: torch.save is not byte for byte repeatable) are the same teacher."""
    result, study_dir, cfg = study
    copy, cache = tmp_path / "study", tmp_path / "cache"
    shutil.copytree(study_dir, copy)
    shutil.copytree(cfg.paths.cache_dir, cache)
    teacher = copy / "seed_0" / "pretrain" / "model.pt"  # the seed's teacher, pretrained in its folder
    pieces = sorted((copy / "seed_0").rglob("*.json"))
    records = {path: json.loads(path.read_text()) for path in pieces if path.parent.name in ("choices", "selectors")}
    assert len(records) == 8 and len({record["teacher_weights"] for record in records.values()}) == 1

    checkpoint = torch.load(teacher, map_location="cpu", weights_only=False)
    torch.save(checkpoint, teacher)  # the same weights, written again
    runs = sorted((copy / "seed_0" / "runs").iterdir())
    written = {path: path.stat().st_mtime_ns for path in records}
    again = run_stage(compose_run(tmp_path / "again", cache, *SHRUNK, f"recoverability.study_dir={copy}"))
    assert again["analysis"]["placements"] == result["analysis"]["placements"]
    assert sorted((copy / "seed_0" / "runs").iterdir()) == runs, "nothing was pruned or recovered again"
    assert {path: path.stat().st_mtime_ns for path in records} == written

    for weights in (checkpoint["model"], checkpoint["ema"]):
        weights["final_layer.linear.bias"] += 1e-6  # the last digits of one tensor
    torch.save(checkpoint, teacher)
    for key in ("teacher", "choices/0-2"):  # missing pieces come first in the work: not measured on the new teacher
        (copy / "seed_0" / f"{key}.json").unlink()
    before = {path: path.read_bytes() for path in copy.rglob("*") if path.is_file()}
    with pytest.raises(ValueError, match=r"measured on other teacher weights .*: the teacher was replaced or pretrained "
                                         r"again\. Put back the teacher the study measured, or use a new "
                                         r"recoverability.study_dir"):
        run_stage(compose_run(tmp_path / "third", cache, *SHRUNK, f"recoverability.study_dir={copy}"))
    assert {path: path.read_bytes() for path in copy.rglob("*") if path.is_file()} == before, "nothing is rewritten"


@pytest.mark.parametrize("overrides,message", [
    (["recoverability.max_choices=0"], r"recoverability.max_choices=0 must be a positive integer"),
    (["recoverability.num_shards=2", "recoverability.shard=1"], r"set recoverability.study_dir to the folder they share"),
    (["recoverability.shard=3"], r"recoverability.shard=3 must be an integer in \[0, "),
    (["compare.seeds=[0,0]"], r"compare.seeds=\[0, 0\] must be a non-empty list of distinct integers"),
    (["recoverability.pattern=1:3"], r"pattern='1:3' needs a depth that is a multiple of M=3"),
])
def test_bad_study_settings_fail_before_anything_is_trained(overrides, message, tmp_path):
    cfg = compose_run(tmp_path / "run", tmp_path / "cache", *SHRUNK, *overrides)
    with pytest.raises(ValueError, match=message):
        run_stage(cfg)
    assert not (tmp_path / "cache" / "teachers").exists()


@pytest.mark.parametrize("experiment", ["recoverability", "recoverability_ablation"])
def test_every_selector_of_the_experiments_changes_only_existing_pruning_settings(experiment, tmp_path):
    cfg = compose_run(tmp_path / "run", tmp_path / "cache", f"experiment={experiment}")
    for name, changes in cfg.compare.selectors.items():
        assert set(changes) <= set(cfg.pruning) | {"num_keep", "kept_blocks", "seed", "progress"}, name
    if experiment == "recoverability_ablation":  # the base selectors stay, so one cached ground truth serves both
        assert {"learnable_lora", "bi_score", "steps_100", "gate_ema_0"} <= set(cfg.compare.selectors)


def csv_values(row: dict[str, str]) -> dict:
    """A recoverability.csv row with its values read back: seed an int, in_ground_truth a bool, empty cells None."""
    values = {}
    for column, text in row.items():
        if column == "seed":
            values[column] = int(text)
        elif column == "in_ground_truth":
            values[column] = {"True": True, "False": False}[text]
        elif column in ("kept_blocks", "chosen_by"):
            values[column] = text
        else:
            values[column] = float(text) if text else None
    return values


def test_wandb_holds_the_study_table_as_the_csv_has_it(study):
    """One W&B run (the study's report run) holds recoverability/choices: the CSV's columns, rows and values."""
    wandb_study = study[1].parent
    tables = sorted(wandb_study.rglob("offline-run-*/files/media/table/**/*.table.json"))
    assert [table.relative_to(wandb_study).parts[:3] for table in tables] == [("study", "report", "wandb")]
    (table,) = tables
    assert table.parent.name == "recoverability" and table.name.startswith("choices")
    holding = [run for run in wandb_study.rglob("offline-run-*")
               if b"recoverability/choices" in next(run.glob("run-*.wandb")).read_bytes()]
    assert holding == [table.parents[4]], "the table is logged to the study's report run, and only there"
    logged = json.loads(table.read_text())
    rows = list(csv.DictReader((wandb_study / "study" / "recoverability.csv").open()))
    columns = list(rows[0])
    assert logged["columns"] == columns
    expected = [csv_values(row) for row in rows]
    assert [dict(zip(columns, values, strict=True)) for values in logged["data"]] == expected
    # == takes 0 for False and 1 for 1.0: the types are W&B's column types, and must be the CSV's too
    assert [[type(value) for value in values] for values in logged["data"]] \
        == [[type(value) for value in row.values()] for row in expected]
    assert [row["kept_blocks"] for row in rows] == [key.replace("-", " ") for key in CHOICES]  # every choice
    assert {name for row in rows for name in row["chosen_by"].split()} == {"learnable", "frozen", "bi_score", "oracle"}
