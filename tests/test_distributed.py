"""Two real CPU ranks (gloo), started by Lightning's launcher as train.py starts them: once-only work on rank zero,
agreement checks, shares of the samples, FID over the ranks, and non-finite steps skipped by every rank together."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.ddp_worker import data_parallel_mar, data_parallel_pruning, fid_case
from tests.test_stage_prune import compose_run
from tinyfusion_pl.stages import run_stage

REPO = Path(__file__).resolve().parents[1]


def python_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if key not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)
    return env


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    result = subprocess.run([sys.executable, str(REPO / "tests" / "ddp_worker.py"), str(out)], cwd=REPO,
                            env=python_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return out, [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def test_once_only_work_runs_on_rank_zero_and_every_rank_gets_its_result(ranks):
    out, seen = ranks
    assert [rank["world_size"] for rank in seen] == [2, 2]
    assert (out / "once.txt").read_text() == "written\n"  # one line: rank 1 never ran it
    assert [rank["once_result"] for rank in seen] == [0, 0]  # rank zero's result, on both


def test_an_error_on_rank_zero_stops_every_rank(ranks):
    _, seen = ranks
    assert seen[0]["zero_error"] == "ZeroDivisionError: division by zero"
    assert seen[1]["zero_error"] == ("RuntimeError: global rank zero failed while the other ranks waited for it: "
                                     "ZeroDivisionError: division by zero")


def test_a_decision_that_differs_between_ranks_stops_every_rank(ranks):
    _, seen = ranks
    for rank, entry in enumerate(seen):
        assert entry["mismatch"].startswith("The test decision is not the same on every rank (rank 0: [0, 1, 0]; "
                                            f"rank {rank}: [0, 1, {rank}])")


def test_ranks_take_whole_units_and_gather_them_in_order(ranks):
    _, seen = ranks
    assert [entry["share"] for entry in seen] == [[0, 6], [6, 10]]  # 4 units of 3: two each
    assert [entry["gathered"] for entry in seen] == [list(range(10))] * 2


def test_fid_over_the_ranks_shares_is_the_fid_of_all_samples(ranks):
    _, seen = ranks
    scorer, samples = fid_case()
    expected = scorer.score(samples)
    assert seen[0]["fid"] == seen[1]["fid"] == pytest.approx(expected, rel=1e-5)


def test_a_nonfinite_loss_on_one_rank_is_skipped_by_every_rank(ranks):
    _, seen = ranks
    assert [(entry["nonfinite_steps"], entry["attempted_steps"]) for entry in seen] == [(1, 4), (1, 4)]
    assert seen[0]["weights_finite"] and seen[1]["weights_finite"]
    assert seen[0]["weights_sum"] == seen[1]["weights_sum"]  # the ranks stepped together


def test_a_failure_of_the_launching_rank_ends_the_ranks_it_launched():
    # the output pipes stay open, and so the run unfinished, until rank one ends too: 300 s if nobody ends it
    result = subprocess.run([sys.executable, str(REPO / "tests" / "rank_failure_worker.py")], cwd=REPO,
                            env=python_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "rank zero fails alone" in result.stderr
    assert "rank one finished its work" not in result.stdout


@pytest.mark.parametrize(("family", "weight_update", "estimator", "run"), [
    ("dit", "lora", "straight_through", "pruned"),
    ("diffusers_dit", "lora", "straight_through", "diffusers_dit"),
    ("dit", "frozen", "straight_through", "frozen"),
    ("dit", "lora", "score_function", "score_function"),
])
def test_pruning_on_two_ranks_learns_what_one_process_learns_from_the_global_batch(ranks, family, weight_update,
                                                                                   estimator, run):
    # The loader deals one order out over the ranks and every draw (times, noise, label drops, gate masks) is
    # made for the global batch, each rank taking its samples' rows: only float summation order differs. With the
    # weights frozen only the gates train (the model, with nothing to train, is not wrapped in DDP). The score
    # function's baseline is the global batch's mean loss.
    if family == "diffusers_dit":
        pytest.importorskip("diffusers")
    out, _ = ranks
    two_ranks = torch.load(out / f"{run}_two_ranks.pt")
    settings = {"family": family, "weight_update": weight_update, "estimator": estimator}
    one_process = data_parallel_pruning(devices=1, batch_size=16, **settings)
    half_batch = data_parallel_pruning(devices=1, batch_size=8, **settings)  # what one rank alone would learn

    def largest_difference(run):
        tensors = [*zip(run["gate_logits"], two_ranks["gate_logits"], strict=True),
                   *((run["trainable"][name], two_ranks["trainable"][name]) for name in two_ranks["trainable"])]
        return max(float((a - b).abs().max()) for a, b in tensors)

    assert two_ranks["trainable"].keys() == one_process["trainable"].keys()
    assert len(one_process["trainable"]) > 10
    assert two_ranks["kept_blocks"] == one_process["kept_blocks"]
    assert largest_difference(one_process) < 1e-5
    assert largest_difference(half_batch) > 1e-4  # the comparison can tell another batch apart


def test_mar_on_two_ranks_trains_as_one_process_with_the_global_batch(ranks):
    # MAR's objective draws orders, masks and its head's steps and noise itself: for the global batch too.
    out, _ = ranks
    two_ranks = torch.load(out / "mar_two_ranks.pt")
    one_process = data_parallel_mar(devices=1, batch_size=16)
    half_batch = data_parallel_mar(devices=1, batch_size=8)
    assert two_ranks.keys() == one_process.keys()
    assert max(float((two_ranks[name] - one_process[name]).abs().max()) for name in two_ranks) < 1e-5
    assert max(float((two_ranks[name] - half_batch[name]).abs().max()) for name in two_ranks) > 1e-4


# --------------------------------------------------------------------------- train.py under trainer=ddp

SMOKE_DDP = ["experiment=smoke", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
             "trainer.precision=32-true", "trainer.enable_progress_bar=false", "logger=wandb"]


def train(folder: Path, cache: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = python_env(TINYFUSION_CACHE=str(cache), WANDB_MODE="offline", NETRC=str(folder / "no.netrc"))
    env.pop("WANDB_API_KEY", None)
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *overrides], cwd=folder, env=env,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_the_pipeline_under_ddp_writes_one_folder_once_and_evaluates_like_one_process(tmp_path):
    cache = tmp_path / "cache"
    result = train(tmp_path, cache, *SMOKE_DDP)
    # no hydra.run.dir given: both ranks still share one timestamped folder
    (run_dir,) = (tmp_path / "outputs" / "pipeline").iterdir()
    assert result.stdout.count("Report: ") == 1
    assert (run_dir / "train_ddp_process_1.log").is_file()  # rank 1 ran, in the same folder
    for stage in ("pretrain", "prune", "recover", "report"):  # only rank zero created W&B runs, in one group
        (wandb_run,) = (run_dir / stage / "wandb").glob("offline-run-*")
        (records,) = wandb_run.glob("run-*.wandb")
        assert str(run_dir).encode() in records.read_bytes(), stage
    decision = json.loads((run_dir / "prune" / "decision.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["kept_blocks"] == decision["kept_blocks"]
    assert not list(run_dir.rglob(".*.tmp*")) and not [p for p in run_dir.rglob(".*") if p.name != ".hydra"
                                                        and ".hydra" not in p.parts]

    # the same two models evaluated by one process: the same images, the same scores
    single = tmp_path / "single"
    single.mkdir()
    train(single, cache, "experiment=smoke", "stage=evaluate", f"paths.run_dir={single / 'run'}",
          f"teacher.checkpoint={decision['teacher']}", f"evaluate.pruned_checkpoint={run_dir / 'recover' / 'model.pt'}")
    alone = json.loads((single / "run" / "evaluate" / "metrics.json").read_text())
    for name in ("teacher", "pruned"):
        with np.load(run_dir / "evaluate" / f"samples_{name}.npz") as ddp, \
                np.load(single / "run" / "evaluate" / f"samples_{name}.npz") as one:
            assert np.array_equal(ddp["arr_0"], one["arr_0"]) and np.array_equal(ddp["labels"], one["labels"])
        assert metrics[name]["fid"] == pytest.approx(alone[name]["fid"], rel=1e-5)
        assert metrics[name]["conditional_accuracy"] == pytest.approx(alone[name]["conditional_accuracy"])


# every other family's embedded default, shrunk by experiment=smoke (MAR: 2 encoder + 2 decoder blocks)
FAMILY_EXPERIMENTS = {"sit": ["experiment=[sit_digits,smoke]"],
                      "mar": ["experiment=[mar_digits,smoke]", "~model.depth", "++model.encoder_depth=2",
                              "++model.decoder_depth=2"],
                      "diffusers_dit": ["experiment=[diffusers_digits,smoke]"],
                      "diffusers_sd3": ["experiment=[diffusers_sd3_digits,smoke]"]}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
@pytest.mark.parametrize("family", sorted(FAMILY_EXPERIMENTS))
def test_every_family_runs_the_whole_pipeline_on_two_ranks_and_reports_once(tmp_path, family, strategy):
    # fsdp2: MAR's objective calls the net's methods and its head besides forward (the family names them, so that
    # they gather the sharded weights); the EMA update runs on sharded weights and whole buffers alike
    if family.startswith("diffusers"):
        pytest.importorskip("diffusers")
    run_dir = tmp_path / "run"
    result = train(tmp_path, tmp_path / "cache", *FAMILY_EXPERIMENTS[family], f"trainer={strategy}",
                   "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
                   "trainer.enable_progress_bar=false", "logger=none", f"hydra.run.dir={run_dir}")
    assert result.stdout.count("Report: ") == 1
    assert (run_dir / "train_ddp_process_1.log").is_file()  # rank 1 ran, in the same folder
    decision = json.loads((run_dir / "prune" / "decision.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["kept_blocks"] == decision["kept_blocks"] and metrics["pruned"]["fid"] is not None
    for stage in ("pretrain", "prune", "recover"):
        assert json.loads((run_dir / stage / "manifest.json").read_text())["complete"], stage
    assert not list(run_dir.rglob(".*.partial-*"))


@pytest.mark.slow
def test_a_ddp_prune_through_train_py_exports_what_one_process_with_the_global_batch_exports(tmp_path):
    cache, runs = tmp_path / "cache", {}
    for name, overrides in (("ddp", ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                                     "trainer.precision=32-true", "data.batch_size=32"]),
                            ("one", ["data.batch_size=64"]), ("half", ["data.batch_size=32"])):
        runs[name] = tmp_path / name
        train(tmp_path, cache, "experiment=smoke", "stage=prune", "pruning.max_steps=20",
              "trainer.enable_progress_bar=false", f"hydra.run.dir={runs[name]}", *overrides)

    def exported(name):
        decision = json.loads((runs[name] / "prune" / "decision.json").read_text())
        weights = torch.load(runs[name] / "prune" / "pruned.pt", map_location="cpu")
        return decision["kept_blocks"], decision["confidences"], weights  # confidences: the gates' softmax

    ddp, one, half = exported("ddp"), exported("one"), exported("half")
    assert ddp[0] == one[0]
    np.testing.assert_allclose(ddp[1], one[1], atol=1e-5)
    assert ddp[2].keys() == one[2].keys()
    assert max(float((ddp[2][key] - one[2][key]).abs().max()) for key in ddp[2]) < 1e-5
    assert not np.allclose(half[1], one[1], atol=1e-4)  # the comparison tells another batch apart


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without CUDA")
def test_fsdp_on_a_machine_without_gpus_stops_before_anything_runs_and_names_the_fix(tmp_path):
    cfg = compose_run(tmp_path / "run", tmp_path / "cache", "trainer=fsdp")
    with pytest.raises(ValueError, match=r"trainer=fsdp \(Lightning's FSDPStrategy\) needs CUDA GPUs.*trainer=fsdp2 "
                                         r"trainer.accelerator=cpu"):
        run_stage(cfg)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_fsdp2_prunes_with_lora_on_two_ranks_and_exports_what_one_process_exports(tmp_path):
    cache = tmp_path / "cache"
    fsdp2 = tmp_path / "fsdp2"
    train(tmp_path, cache, "experiment=smoke", "stage=prune", "trainer=fsdp2", "trainer.accelerator=cpu",
          "trainer.devices=2", "trainer.precision=32-true", "trainer.enable_progress_bar=false",
          f"hydra.run.dir={fsdp2}")
    decision = json.loads((fsdp2 / "prune" / "decision.json").read_text())
    assert decision["selector"] == "learnable"
    # one process exports the same decision from the same teacher
    alone = tmp_path / "alone"
    train(tmp_path, cache, "experiment=smoke", "stage=prune", "pruning=by_index",
          f"pruning.kept_blocks={decision['kept_blocks']}".replace(" ", ""), f"hydra.run.dir={alone}")
    sharded = torch.load(fsdp2 / "prune" / "pruned.pt", weights_only=True)
    plain = torch.load(alone / "prune" / "pruned.pt", weights_only=True)
    assert sharded.keys() == plain.keys()
    assert all(type(value) is torch.Tensor and torch.equal(value, plain[name]) for name, value in sharded.items())


@pytest.mark.slow
@pytest.mark.parametrize("family", ["dit", "mar"])
def test_fsdp2_prunes_with_full_weight_updates_as_one_process_with_the_global_batch(tmp_path, family):
    # weight_update=full: every sharded weight trains beside the whole gate logits (mixed trainable and frozen
    # parameters: the embedders stay frozen); the gates must follow the trajectory of one process. MAR's objective
    # runs the sharded net through its methods and its head besides forward.
    cache, runs = tmp_path / "cache", {}
    experiment = ["experiment=smoke"] if family == "dit" else FAMILY_EXPERIMENTS[family]
    for name, overrides in (("fsdp2", ["trainer=fsdp2", "trainer.accelerator=cpu", "trainer.devices=2",
                                       "trainer.precision=32-true", "data.batch_size=32"]),
                            ("one", ["data.batch_size=64"])):
        runs[name] = tmp_path / name
        train(tmp_path, cache, *experiment, "stage=prune", "pruning.weight_update=full",
              "pruning.max_steps=20", "trainer.enable_progress_bar=false", f"hydra.run.dir={runs[name]}", *overrides)
    sharded, alone = (json.loads((runs[name] / "prune" / "decision.json").read_text()) for name in ("fsdp2", "one"))
    assert sharded["kept_blocks"] == alone["kept_blocks"]
    np.testing.assert_allclose(sharded["confidences"], alone["confidences"], atol=1e-5)
    assert [entry["chosen_options"] for entry in sharded["history"]] == \
        [entry["chosen_options"] for entry in alone["history"]]
    np.testing.assert_allclose([entry["confidences"] for entry in sharded["history"]],
                               [entry["confidences"] for entry in alone["history"]], atol=1e-5)


@pytest.mark.slow
def test_fsdp2_pretrains_diffusers_dit_with_its_shared_embedder_as_one_process_with_the_global_batch(tmp_path):
    # every block of diffusers' DiT calls one shared embedder: a shard unit of its own, trained like the rest
    pytest.importorskip("diffusers")
    weights = {}
    for name, overrides in (("fsdp2", ["trainer=fsdp2", "trainer.accelerator=cpu", "trainer.devices=2",
                                       "trainer.precision=32-true", "data.batch_size=32"]),
                            ("one", ["data.batch_size=64"])):
        train(tmp_path, tmp_path / f"cache_{name}", *FAMILY_EXPERIMENTS["diffusers_dit"], "stage=pretrain",
              "trainer.enable_progress_bar=false", "logger=none", f"hydra.run.dir={tmp_path / name}", *overrides)
        weights[name] = torch.load(tmp_path / name / "pretrain" / "model.pt", map_location="cpu", weights_only=True)
    shared = "model.transformer_blocks.0.norm1.emb.timestep_embedder.linear_1.weight"
    for part in ("model", "ema"):
        sharded, alone = weights["fsdp2"][part], weights["one"][part]
        assert sharded.keys() == alone.keys() and shared in sharded
        assert max(float((sharded[key] - alone[key]).abs().max()) for key in sharded) < 1e-4, part
    model, ema = weights["one"]["model"], weights["one"]["ema"]
    assert float((model[shared] - ema[shared]).abs().max()) > 1e-5  # it trained (the EMA lags behind)


@pytest.mark.slow
def test_compare_selectors_under_ddp_writes_one_comparison_of_every_selector(tmp_path):
    run_dir = tmp_path / "run"
    result = train(tmp_path, tmp_path / "cache", "experiment=[compare_selectors,smoke]", *SMOKE_DDP[1:-1],
                   "logger=none", "~compare.selectors.random_2", "~compare.selectors.random_3",
                   f"hydra.run.dir={run_dir}")
    assert result.stdout.count("Comparison: ") == 1
    names = ["learnable", "bi_score", "sensitivity", "oracle", "random_0", "random_1"]
    rows = list(csv.DictReader((run_dir / "comparison.csv").open()))
    assert [row["selector"] for row in rows] == names
    for name, row in zip(names, rows, strict=True):
        decision = json.loads((run_dir / name / "prune" / "decision.json").read_text())
        assert row["kept_blocks"] == " ".join(map(str, decision["kept_blocks"])), name
        assert (run_dir / name / "recover" / "model.pt").is_file() and (run_dir / name / "evaluate").is_dir()
    assert (run_dir / "train_ddp_process_1.log").is_file()  # rank 1 ran, in the same folder
    assert not list(run_dir.rglob(".*.tmp*"))


@pytest.mark.slow
def test_a_sweep_under_ddp_keeps_one_folder_per_job_and_groups_its_wandb_runs(tmp_path):
    result = train(tmp_path, tmp_path / "cache", "-m", *SMOKE_DDP, "stage=prune", "pruning.keep_ratio=0.25,0.5")
    # Lightning re-runs `train.py -m ...` for rank 1, which runs the same jobs in step, in rank zero's sweep folder
    (sweep,) = (tmp_path / "multirun" / "prune").iterdir()
    assert sorted(path.name for path in sweep.iterdir() if path.is_dir()) == ["0", "1"]
    for job, ratio in enumerate(("0.25", "0.5")):
        folder = sweep / str(job)
        assert (folder / "train_ddp_process_1.log").is_file() and (folder / "prune" / "decision.json").is_file()
        (wandb_run,) = (folder / "prune" / "wandb").glob("offline-run-*")
        (records,) = wandb_run.glob("run-*.wandb")
        assert f"multirun/prune/{sweep.name}".encode() in records.read_bytes()  # the sweep's group
        assert f'"pruning.keep_ratio":"{ratio}"'.encode() in records.read_bytes()  # the swept value, in the config
    assert "Launching 2 jobs locally" in result.stdout + result.stderr
